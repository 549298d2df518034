"""returner.worker.Worker in-process against a real redis-server and real shared memory:
frames of every layout, bad input, hostile ids, duplicates, poison deliveries, recovery
of pending entries, and a prompt stop."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import simplejpeg

from returner.metrics import Metrics
from returner.settings import Settings
from returner.stream import Consumer
from returner.worker import Worker
from tests.conftest import (
    CLEAN_DOT_FILES,
    Frames,
    dot_files,
    psnr,
    random_frame,
    read_results,
    upstream_segment,
    wait_for,
)

MakeSettings = Callable[..., Settings]


@dataclass
class Running:
    """A worker serving in a thread of this process."""

    worker: Worker
    metrics: Metrics
    stream: Consumer
    stop: threading.Event
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
        def done_or_dead() -> bool:
            assert not self.errors, f"worker raised {self.errors[0]!r}"
            assert self.thread.is_alive(), "worker thread ended early"
            return bool(condition())

        wait_for(done_or_dead, timeout, what=what)

    def settled(self, n: int) -> None:
        self.wait(lambda: self.worker.tally.settled >= n, f"{n} settled deliveries")

    def count(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value("returner_tasks_total", {"outcome": outcome})
        return value or 0.0


@contextlib.contextmanager
def running(settings: Settings) -> Iterator[Running]:
    """Start a worker; on leaving, set its stop event and check the thread ended."""
    assert settings.redis_url is not None
    stream = Consumer.from_settings(settings, settings.redis_url)
    metrics, stop = Metrics(), threading.Event()
    worker = Worker(settings, stream, metrics, stop)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            worker.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, name="worker", daemon=True)
    harness = Running(worker, metrics, stream, stop, thread, errors)
    thread.start()
    try:
        yield harness
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive(), "worker did not stop within 10 s"
    assert not errors, f"worker raised {errors[0]!r}"


def shm_name(message: bytes) -> str:
    name: str = json.loads(message)["shm_info"]["shm_name"]
    return name


def message(shm: str, shape: Any, request_id: Any, image_id: Any, **overrides: Any) -> bytes:
    """A task message with any field replaced; `info_<key>` replaces a shm_info field."""
    size = int(np.prod(shape)) if isinstance(shape, list) else 0
    info: dict[str, Any] = {"shm_name": shm, "shape": shape, "dtype": "uint8", "size": size}
    doc: dict[str, Any] = {"request_id": request_id, "image_id": image_id, "shm_info": info}
    for key, value in overrides.items():
        if key.startswith("info_"):
            info[key[5:]] = value
        else:
            doc[key] = value
    return json.dumps(doc).encode()


def assert_drained(r: redis.Redis, settings: Settings) -> None:
    stream_key = f"{{{settings.hosting_tasks_queue}}}:stream"
    assert r.llen(settings.hosting_tasks_queue) == 0
    assert r.xlen(stream_key) == 0
    assert r.xpending(stream_key, settings.consumer_group)["pending"] == 0


def dead_letters(r: redis.Redis, settings: Settings) -> list[dict[bytes, bytes]]:
    rows: Any = r.xrange(f"{{{settings.hosting_tasks_queue}}}:dead")
    return [fields for _, fields in rows]


def jpegs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jpg"))


def by_request(results: list[dict[str, Any]]) -> dict[str | None, dict[str, Any]]:
    return {rec["request_id"]: rec for rec in results}


# -- frames of every layout ----------------------------------------------------------

# (shape, explicit channel order or None for the default)
LAYOUTS: list[tuple[tuple[int, ...], str | None]] = [
    ((48, 80), None),
    ((48, 80), "GRAY"),
    ((61, 37, 1), None),
    ((61, 37, 1), "GRAY"),
    ((64, 96, 3), "RGB"),
    ((64, 96, 3), "BGR"),
    ((64, 96, 3), None),
    ((50, 70, 4), "RGBA"),
    ((50, 70, 4), "BGRA"),
    ((50, 70, 4), None),
]


def effective_order(shape: tuple[int, ...], given: str | None, default: str) -> str:
    if given:
        return given
    if len(shape) == 2 or shape[2] == 1:
        return "GRAY"
    return default[:3] + ("A" if shape[2] == 4 else "")


def stored(truth: np.ndarray, order: str, seed: int) -> np.ndarray:
    """The true picture laid out in `order`, with random alpha where there is one."""
    if order == "GRAY":
        return truth
    frame = truth[..., ::-1] if order.startswith("BGR") else truth
    if order.endswith("A"):
        alpha = np.random.default_rng(seed).integers(0, 256, (*truth.shape[:2], 1), np.uint8)
        frame = np.concatenate([frame, alpha], axis=-1)
    return np.ascontiguousarray(frame)


@pytest.mark.parametrize("default_order", ["RGB", "BGR", "BGRA"])
def test_every_layout_completes_in_true_colours(
    make_settings: MakeSettings,
    frames: Frames,
    r: redis.Redis,
    output_dir: Path,
    default_order: str,
) -> None:
    settings = make_settings(CHANNEL_ORDER=default_order)
    pushed = datetime.now(UTC).replace(microsecond=0)
    truths: dict[str, np.ndarray] = {}
    names = []
    for i, (shape, given) in enumerate(LAYOUTS):
        order = effective_order(shape, given, default_order)
        truth_shape = shape if order == "GRAY" else (*shape[:2], 3)
        truths[f"req-{i}"] = random_frame(truth_shape, seed=i)
        msg = frames.task(stored(truths[f"req-{i}"], order, i), f"req-{i}", f"img-{i}", given)
        names.append(shm_name(msg))
        r.rpush(settings.hosting_tasks_queue, msg)

    with running(settings) as run:
        run.settled(len(LAYOUTS))

    done = datetime.now(UTC)
    assert run.worker.tally.completed == len(LAYOUTS)
    assert run.count("completed") == len(LAYOUTS)
    results = read_results(output_dir)
    assert len(results) == len(LAYOUTS)
    for rec in results:
        assert rec["status"] == "completed", rec
        name = re.fullmatch(r"img-(\d+)_(\d{8}_\d{6})\.jpg", Path(rec["file_path"]).name)
        assert name is not None and f"req-{name[1]}" == rec["request_id"], rec
        stamp = datetime.strptime(name[2], "%Y%m%d_%H%M%S").replace(tzinfo=UTC)
        assert pushed <= stamp <= done, rec
        assert datetime.fromisoformat(rec["timestamp"]).utcoffset() is not None
        truth = truths[rec["request_id"]]
        data = Path(rec["file_path"]).read_bytes()
        if truth.ndim == 3 and truth.shape[2] == 3:
            decoded = simplejpeg.decode_jpeg(data, colorspace="RGB")
        else:
            decoded = simplejpeg.decode_jpeg(data, colorspace="GRAY").reshape(truth.shape)
        assert decoded.shape == truth.shape
        assert psnr(decoded, truth) >= 30, rec["request_id"]
    assert not [n for n in names if frames.exists(n)]
    assert_drained(r, settings)


# -- bad input -----------------------------------------------------------------------


def bad_messages(frames: Frames) -> tuple[list[bytes], list[str]]:
    """Every class of bad message, and the valid segment names they name (to be unlinked)."""
    small = np.zeros((16, 16, 3), np.uint8)
    gray = np.zeros((16, 16), np.uint8)
    big = np.zeros((120, 100, 3), np.uint8)  # 12000 pixels > MAX_PIXELS=10000
    real = [frames.put(x) for x in (small, small, small, small, small, gray, big, small)]
    missing = f"img_shm_{uuid.uuid4().hex}"
    sq = [16, 16, 3]
    bad = [
        b"\xff\xfe not json at all",
        b"[1, 2, 3]",
        json.dumps({"request_id": "bad-missing"}).encode(),
        json.dumps({"request_id": "bad-no-info", "image_id": "i"}).encode(),
        message(missing, sq, "bad-no-size", "i", info_size=None),
        message(missing, sq, 5, "i"),  # request_id not a string
        message(missing, sq, "bad-image-type", ["i"]),
        message(missing, "16x16x3", "bad-shape-type", "i", info_size=768),
        message(missing, sq, "bad-size-type", "i", info_size="768"),
        message(missing, [16.0, 16, 3], "bad-float-shape", "i"),
        message(missing, [16], "bad-rank", "i"),
        message(missing, [16, 16, 2], "bad-channels", "i"),
        message(real[0], sq, "bad-size", "i", info_size=16 * 16 * 3 + 1),
        message(real[1], [16, 16, 4], "bad-short-segment", "i"),
        message(real[2], sq, "bad-dtype", "i", info_dtype="float32"),
        message(real[3], sq, "bad-order", "i", channel_order="XYZ"),
        message(real[4], sq, "bad-order-rgba", "i", channel_order="RGBA"),
        message(real[5], [16, 16], "bad-order-rgb", "i", channel_order="RGB"),
        message(missing, sq, "bad-missing-segment", "i"),
        message(real[6], [120, 100, 3], "bad-too-big", "i"),
        message(real[7], sq, "bad-order-gray", "i", channel_order="GRAY"),
        message(missing, [0, 16, 3], "bad-zero-side", "i"),
        message(missing, [-16, 16, 3], "bad-negative", "i", info_size=768),
        message(missing, [70000, 70000, 3], "bad-huge", "i"),
        message(missing, [True, 16, 3], "bad-bool-shape", "i", info_size=48),
        message(missing, sq, "bad-info-type", "i", shm_info="img_shm_00"),
        b"null",
        b"[" * 100_000,  # nested too deep for the JSON parser
        b'{"request_id": "\xff", "image_id": "i"}',  # a JSON string that is not UTF-8
    ]
    return bad, real


def readable_ids(raw: bytes) -> tuple[str | None, str | None]:
    """The ids a results entry can carry for a message: strings, else null."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(doc, dict):
        return None, None
    rid, iid = doc.get("request_id"), doc.get("image_id")
    return (rid if isinstance(rid, str) else None), (iid if isinstance(iid, str) else None)


def test_bad_messages_fail_and_are_dead_lettered(
    make_settings: MakeSettings,
    frames: Frames,
    r: redis.Redis,
    output_dir: Path,
) -> None:
    settings = make_settings(MAX_PIXELS=10_000)
    bad, unlinkable = bad_messages(frames)
    foreign = upstream_segment(16 * 16 * 3, name=f"foreign_{uuid.uuid4().hex}")
    foreign.close()
    frames.names.append(foreign.name)
    bad.append(message(foreign.name, [16, 16, 3], "bad-pattern", "i"))
    bad.append(message("img_shm_ab/../cd", [16, 16, 3], "bad-slash", "i"))
    good = [
        frames.task(random_frame((32, 48, 3), seed=i), f"good-{i}", f"g{i}")
        for i in range(len(bad) + 1)
    ]
    for i, msg in enumerate(bad):
        r.rpush(settings.hosting_tasks_queue, good[i], msg)
    r.rpush(settings.hosting_tasks_queue, good[-1])

    with running(settings) as run:
        run.settled(len(bad) + len(good))

    results = read_results(output_dir)
    failed = [rec for rec in results if rec["status"] == "failed"]
    completed = [rec for rec in results if rec["status"] == "completed"]
    assert len(failed) == len(bad)
    assert all(rec["file_path"] is None and rec["error"] for rec in failed)
    assert Counter((rec["request_id"], rec["image_id"]) for rec in failed) == Counter(
        readable_ids(msg) for msg in bad
    )
    assert sorted(rec["request_id"] for rec in completed) == sorted(
        f"good-{i}" for i in range(len(good))
    )
    assert all(Path(rec["file_path"]).is_file() for rec in completed)
    letters = dead_letters(r, settings)
    # a message over MAX_TASK_BYTES (the one nested 200k deep) keeps its first KiB
    kept = [m if len(m) <= settings.max_task_bytes else m[:1024] for m in bad]
    assert Counter(d[b"task"] for d in letters) == Counter(kept)
    assert all(d[b"error"] and d[b"deliveries"] == b"1" for d in letters)
    assert run.worker.tally.failed == len(bad)
    assert run.worker.tally.completed == len(good)
    assert run.count("failed") == len(bad)
    assert run.count("completed") == len(good)
    assert not [n for n in unlinkable if frames.exists(n)], "bad tasks' segments kept"
    assert not [m for m in good if frames.exists(shm_name(m))]
    assert frames.exists(foreign.name), "a segment outside SHM_NAME_PATTERN was touched"
    assert_drained(r, settings)


# -- hostile image ids ---------------------------------------------------------------

HOSTILE_IDS = [
    "../x",
    "/abs",
    "..",
    ".",
    "",
    "a" * 400,
    "a" * 399 + "b",
    "nul\x00byte",
    "caf\u00e9/\u540d",
    "a/../../b",
    "back\\slash",
    "line\nbreak",
    ".hidden",
    "\u00e9" * 200,
    "%2E%2E",
    "lone\ud800surrogate",
    "same",
    "same",
]


def test_hostile_image_ids_stay_inside_output_dir(
    make_settings: MakeSettings,
    frames: Frames,
    r: redis.Redis,
    output_dir: Path,
    tmp_path: Path,
) -> None:
    settings = make_settings()
    messages = [
        frames.task(random_frame((24, 24, 3), seed=i), f"req-{i}", image_id)
        for i, image_id in enumerate(HOSTILE_IDS)
    ]
    r.rpush(settings.hosting_tasks_queue, *messages)

    with running(settings) as run:
        run.settled(len(messages))

    records = by_request(read_results(output_dir))
    assert len(records) == len(HOSTILE_IDS)
    for i, image_id in enumerate(HOSTILE_IDS):
        rec = records[f"req-{i}"]
        if rec["status"] == "failed":
            assert rec["file_path"] is None and rec["error"], image_id
            continue
        assert rec["status"] == "completed" and rec["image_id"] == image_id
        path = Path(rec["file_path"])
        assert path.parent == output_dir.resolve(), (image_id, path)
        assert path.is_file() and len(path.name.encode()) <= 255
    done = [rec["file_path"] for rec in records.values() if rec["status"] == "completed"]
    assert len(set(done)) == len(done), "two image ids collapsed to one file"
    # The contract makes ids safe for a file name rather than rejecting them, unless they
    # are not text at all (a lone surrogate), which makes the task fail with null ids.
    failed = {rec["image_id"] for rec in records.values() if rec["status"] == "failed"}
    assert failed <= {"", None}
    surrogate = HOSTILE_IDS.index("lone\ud800surrogate")
    assert records[f"req-{surrogate}"]["status"] == "failed"
    assert [p.parent for p in jpegs(tmp_path)] == [output_dir.resolve()] * len(done)
    assert not [m for m in messages if frames.exists(shm_name(m))]
    assert_drained(r, settings)


# -- duplicates ----------------------------------------------------------------------


@pytest.mark.parametrize("same_batch", [False, True], ids=["later", "same-batch"])
def test_a_duplicate_task_is_settled_without_writing(
    make_settings: MakeSettings,
    frames: Frames,
    r: redis.Redis,
    output_dir: Path,
    same_batch: bool,
) -> None:
    settings = make_settings()
    first = frames.task(random_frame((32, 32, 3), seed=1), "req-dup", "img-dup")
    second = frames.task(random_frame((32, 32, 3), seed=2), "req-dup", "img-dup")
    queue = settings.hosting_tasks_queue
    r.rpush(queue, *([first, second] if same_batch else [first]))

    with running(settings) as run:
        if not same_batch:
            run.settled(1)
            listing = sorted(os.listdir(output_dir))
            r.rpush(queue, second)
        run.settled(2)

    results = read_results(output_dir)
    assert [rec["status"] for rec in results] == ["completed"]
    assert run.worker.tally.completed == 1 and run.worker.tally.duplicate == 1
    assert run.count("duplicate") == 1 and run.count("completed") == 1
    assert len(jpegs(output_dir)) == 1
    assert not frames.exists(shm_name(first)) and not frames.exists(shm_name(second))
    if not same_batch:
        assert sorted(n for n in os.listdir(output_dir) if n.endswith(".jpg")) == [
            n for n in listing if n.endswith(".jpg")]
    assert_drained(r, settings)


def test_an_event_and_the_record_of_a_delivery_carry_the_same_timestamp(
    make_settings: MakeSettings, frames: Frames, r: redis.Redis, output_dir: Path
) -> None:
    """One timestamp per settled delivery: the commit's, shared by its record and its
    event, for completed and failed tasks alike."""
    settings = make_settings()
    good = frames.task(random_frame((32, 32, 3), seed=3), "req-ts", "img-good")
    bad = message("img_shm_0123abcd", [8, 8, 3], "req-ts", "img-bad")  # no such segment
    r.rpush(settings.hosting_tasks_queue, good, bad)

    with running(settings) as run:
        run.settled(2)

    recorded = {rec["image_id"]: rec["timestamp"] for rec in read_results(output_dir)}
    events_key = f"{{{settings.hosting_tasks_queue}}}:events"
    emitted = {f[b"image_id"].decode(): f[b"timestamp"].decode() for _, f in r.xrange(events_key)}
    assert set(recorded) == {"img-good", "img-bad"}
    assert emitted == recorded


# -- poison deliveries ---------------------------------------------------------------


def test_too_many_deliveries_are_dead_lettered_and_keep_the_segment(
    make_settings: MakeSettings,
    frames: Frames,
    r: redis.Redis,
    redis_url: str,
    output_dir: Path,
) -> None:
    settings = make_settings(MAX_DELIVERIES=3, CLAIM_MIN_IDLE_MS=100)
    poison = frames.task(random_frame((32, 32, 3)), "req-poison", "img-poison")
    r.rpush(settings.hosting_tasks_queue, poison)
    crashed = Consumer(
        redis.Redis.from_url(redis_url),
        settings.hosting_tasks_queue,
        settings.consumer_group,
        "crashed-1",
    )
    crashed.stream.ensure_group()
    assert len(crashed.fetch(1)) == 1
    for _ in range(3):  # three restarts that died while re-reading their history
        crashed.own_pending("0", 10)

    with running(settings) as run:
        run.settled(1)

    [letter] = dead_letters(r, settings)
    assert letter[b"task"] == poison
    assert int(letter[b"deliveries"]) == 5
    assert letter[b"error"]
    assert run.worker.tally.dead_lettered == 1 and run.worker.tally.settled == 1
    assert run.count("dead_lettered") == 1 and run.count("completed") == 0
    assert frames.exists(shm_name(poison)), "a dead-lettered valid frame lost its segment"
    assert jpegs(output_dir) == []
    assert not [rec for rec in read_results(output_dir) if rec["status"] == "completed"]
    assert_drained(r, settings)


def test_a_delivery_at_max_deliveries_is_still_processed(
    make_settings: MakeSettings,
    frames: Frames,
    r: redis.Redis,
    redis_url: str,
    output_dir: Path,
) -> None:
    settings = make_settings(MAX_DELIVERIES=3, CLAIM_MIN_IDLE_MS=100)
    msg = frames.task(random_frame((32, 32, 3)), "req-last-try", "img-last-try")
    r.rpush(settings.hosting_tasks_queue, msg)
    crashed = Consumer(
        redis.Redis.from_url(redis_url),
        settings.hosting_tasks_queue,
        settings.consumer_group,
        "crashed-1",
    )
    crashed.stream.ensure_group()
    assert len(crashed.fetch(1)) == 1
    crashed.own_pending("0", 10)  # delivery 2; the claim makes it 3 == MAX_DELIVERIES

    with running(settings) as run:
        run.settled(1)

    assert run.worker.tally.completed == 1 and run.count("dead_lettered") == 0
    assert [rec["status"] for rec in read_results(output_dir)] == ["completed"]
    assert dead_letters(r, settings) == []
    assert_drained(r, settings)


def test_a_finished_task_delivered_again_is_a_duplicate_not_a_failure(
    make_settings: MakeSettings,
    frames: Frames,
    r: redis.Redis,
    output_dir: Path,
) -> None:
    settings = make_settings()
    msg = frames.task(random_frame((32, 32, 3)), "req-again", "img-again")
    r.rpush(settings.hosting_tasks_queue, msg)

    with running(settings) as run:
        run.settled(1)
        assert not frames.exists(shm_name(msg))
        r.rpush(settings.hosting_tasks_queue, msg)  # same bytes; its segment is gone
        run.settled(2)

    assert run.worker.tally.duplicate == 1 and run.worker.tally.failed == 0
    assert [rec["status"] for rec in read_results(output_dir)] == ["completed"]
    assert dead_letters(r, settings) == []
    assert len(jpegs(output_dir)) == 1
    assert_drained(r, settings)


def test_the_duplicate_check_comes_before_the_delivery_limit(
    make_settings: MakeSettings,
    frames: Frames,
    r: redis.Redis,
    redis_url: str,
    output_dir: Path,
) -> None:
    settings = make_settings(MAX_DELIVERIES=2, CLAIM_MIN_IDLE_MS=100)
    queue = settings.hosting_tasks_queue
    msg = frames.task(random_frame((32, 32, 3)), "req-done", "img-done")
    r.rpush(queue, msg)
    with running(settings) as first:
        first.settled(1)
    # A consumer that crashed after the commit but before the ack, several times over.
    r.rpush(queue, msg)
    crashed = Consumer(redis.Redis.from_url(redis_url), queue, settings.consumer_group, "crashed-1")
    assert len(crashed.fetch(1)) == 1
    for _ in range(3):
        crashed.own_pending("0", 10)

    with running(settings) as second:
        second.settled(1)

    assert second.worker.tally.duplicate == 1 and second.count("dead_lettered") == 0
    assert dead_letters(r, settings) == []
    assert [rec["status"] for rec in read_results(output_dir)] == ["completed"]
    assert_drained(r, settings)


def test_a_stream_deleted_under_a_running_worker_is_recreated(
    make_settings: MakeSettings,
    frames: Frames,
    r: redis.Redis,
    output_dir: Path,
) -> None:
    settings = make_settings()
    queue = settings.hosting_tasks_queue
    first = frames.task(random_frame((32, 32, 3), seed=1), "req-1", "img-1")
    second = frames.task(random_frame((32, 32, 3), seed=2), "req-2", "img-2")
    r.rpush(queue, first)

    with running(settings) as run:
        run.settled(1)
        r.delete(f"{{{queue}}}:stream")
        r.rpush(queue, second)
        run.settled(2)

    assert run.worker.tally.completed == 2
    assert sorted(rec["request_id"] for rec in read_results(output_dir)) == ["req-1", "req-2"]
    assert not frames.exists(shm_name(second))
    assert_drained(r, settings)


def xautoclaim_calls(r: redis.Redis) -> int:
    stats: dict[str, Any] = r.info("commandstats").get("cmdstat_xautoclaim") or {}
    return int(stats.get("calls", 0))


def test_a_claim_pass_on_a_deleted_stream_does_not_stall_the_worker(
    make_settings: MakeSettings,
    frames: Frames,
    r: redis.Redis,
    output_dir: Path,
) -> None:
    settings = make_settings(CLAIM_MIN_IDLE_MS=100)  # a claim pass about every second
    queue = settings.hosting_tasks_queue
    msg = frames.task(random_frame((32, 32, 3)), "req-after", "img-after")

    with running(settings) as run:
        run.wait(lambda: r.info("clients")["blocked_clients"] >= 1, "the worker waiting")
        r.delete(f"{{{queue}}}:stream")  # the next step after this wait is a claim pass
        claims = xautoclaim_calls(r)
        run.wait(lambda: xautoclaim_calls(r) > claims, "a claim pass after the deletion")
        r.rpush(queue, msg)
        run.wait(
            lambda: run.worker.tally.settled >= 1, "the task pushed after the deletion", timeout=15
        )

    assert [rec["status"] for rec in read_results(output_dir)] == ["completed"]
    assert_drained(r, settings)


# -- recovery ------------------------------------------------------------------------


def test_entries_of_a_dead_consumer_are_claimed_and_completed(
    make_settings: MakeSettings,
    frames: Frames,
    r: redis.Redis,
    redis_url: str,
    output_dir: Path,
) -> None:
    settings = make_settings(CLAIM_MIN_IDLE_MS=200)
    messages = [
        frames.task(random_frame((32, 40, 3), seed=i), f"req-{i}", f"img-{i}") for i in range(4)
    ]
    r.rpush(settings.hosting_tasks_queue, *messages)
    dead = Consumer(
        redis.Redis.from_url(redis_url),
        settings.hosting_tasks_queue,
        settings.consumer_group,
        "dead-1",
    )
    dead.stream.ensure_group()
    assert len(dead.fetch(10)) == 4
    taken = time.monotonic()

    with running(settings) as run:
        run.settled(4)
        elapsed = time.monotonic() - taken

    assert elapsed >= 0.2, "entries were taken from a consumer before CLAIM_MIN_IDLE_MS"
    assert run.worker.tally.completed == 4
    results = read_results(output_dir)
    assert sorted(rec["request_id"] for rec in results) == [f"req-{i}" for i in range(4)]
    assert all(rec["status"] == "completed" for rec in results)
    assert not [m for m in messages if frames.exists(shm_name(m))]
    assert_drained(r, settings)


def test_own_pending_entries_of_an_earlier_run_are_finished_first(
    make_settings: MakeSettings,
    frames: Frames,
    r: redis.Redis,
    redis_url: str,
    output_dir: Path,
) -> None:
    settings = make_settings()  # CLAIM_MIN_IDLE_MS 60 s: nothing is claimed here
    queue = settings.hosting_tasks_queue
    earlier = [
        frames.task(random_frame((32, 32, 3), seed=i), f"old-{i}", f"img-old-{i}") for i in range(3)
    ]
    r.rpush(queue, *earlier)
    previous_run = Consumer(
        redis.Redis.from_url(redis_url), queue, settings.consumer_group, settings.consumer_name
    )
    previous_run.stream.ensure_group()
    assert len(previous_run.fetch(10)) == 3
    later = [
        frames.task(random_frame((32, 32, 3), seed=9 + i), f"new-{i}", f"img-new-{i}")
        for i in range(2)
    ]
    r.rpush(queue, *later)

    with running(settings) as run:
        run.settled(5)

    results = read_results(output_dir)
    assert [rec["request_id"] for rec in results[:3]] == ["old-0", "old-1", "old-2"]
    assert sorted(rec["request_id"] for rec in results[3:]) == ["new-0", "new-1"]
    assert all(rec["status"] == "completed" for rec in results)
    assert not [m for m in earlier + later if frames.exists(shm_name(m))]
    assert_drained(r, settings)


# -- stopping ------------------------------------------------------------------------


def test_stop_returns_promptly_and_settles_what_is_in_hand(
    make_settings: MakeSettings,
    frames: Frames,
    r: redis.Redis,
    output_dir: Path,
) -> None:
    settings = make_settings(BATCH_SIZE=2)
    queue = settings.hosting_tasks_queue
    messages = [
        frames.task(random_frame((240, 320, 3), seed=i), f"req-{i}", f"img-{i}") for i in range(60)
    ]
    r.rpush(queue, *messages)

    with running(settings) as run:
        run.settled(2)
        asked = time.monotonic()
        run.stop.set()
        run.thread.join(timeout=10)
        took = time.monotonic() - asked

    assert took < 3, f"run() took {took:.1f}s to return after stop"
    stream_key = f"{{{queue}}}:stream"
    assert r.xpending(stream_key, settings.consumer_group)["pending"] == 0
    settled = run.worker.tally.settled
    assert settled == run.worker.tally.completed < len(messages)
    results = read_results(output_dir)
    assert len(results) == settled and all(rec["status"] == "completed" for rec in results)
    assert r.llen(queue) + r.xlen(stream_key) == len(messages) - settled
    assert sum(frames.exists(shm_name(m)) for m in messages) == len(messages) - settled
    assert dot_files(output_dir) == CLEAN_DOT_FILES


def test_stop_while_idle_returns_promptly(make_settings: MakeSettings, r: redis.Redis) -> None:
    settings = make_settings()

    with running(settings) as run:
        run.wait(lambda: r.info("clients")["blocked_clients"] >= 1, "the worker blocking")
        asked = time.monotonic()
        run.stop.set()
        run.thread.join(timeout=10)
        took = time.monotonic() - asked

    assert took < 3, f"run() took {took:.1f}s to return after stop"
    assert run.worker.tally.settled == 0
