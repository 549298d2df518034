"""Hostile messages against a worker in this process, real Redis, real shared memory and
a real results store: none stops the worker, none is echoed at length, none writes raw
control characters into a text log."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from returner.logs import TextFormatter
from returner.settings import Settings
from returner.stream import Keys
from tests.conftest import Frames, random_frame, read_results, read_view, wait_for
from tests.test_worker import assert_drained, running

MakeSettings = Callable[..., Settings]


def missing(request_id: str, image_id: str, **info: object) -> bytes:
    doc = {"request_id": request_id, "image_id": image_id,
           "shm_info": {"shm_name": "img_shm_0badc0de", "shape": [4, 4, 3], "dtype": "uint8",
                        "size": 48, **info}}
    return json.dumps(doc).encode()


def test_a_lone_surrogate_id_with_a_missing_segment_is_settled(
    make_settings: MakeSettings, r: redis.Redis, output_dir: Path
) -> None:
    """Finding 1: dead-lettering this task once killed every worker that took it."""
    settings = make_settings()
    r.rpush(settings.hosting_tasks_queue, missing("req-s", "evil\ud800x"),
            missing("evil\udfffreq", "img"))
    with running(settings) as run:
        run.settled(2)
    records = read_results(output_dir)
    assert [(rec["status"], rec["request_id"], rec["image_id"]) for rec in records] == [
        ("failed", "req-s", None), ("failed", None, "img")]
    keys = Keys.for_queue(settings.hosting_tasks_queue)
    assert r.xlen(keys.dead) == 2 and r.xlen(keys.events) == 2
    assert_drained(r, settings)


def test_oversized_values_are_cut_and_oversized_messages_kept_short(
    make_settings: MakeSettings, r: redis.Redis, output_dir: Path, frames: Frames
) -> None:
    """Finding 2: a 3 MB dtype and a 2 MB element were echoed and kept whole."""
    settings = make_settings()
    queue = settings.hosting_tasks_queue
    good = [frames.task(random_frame((16, 16, 3), seed=i), f"req-{i}", f"img-{i}")
            for i in range(146)]
    r.rpush(queue, *good[:70])
    r.rpush(queue, missing("req-dtype", "img", dtype="u" * 3_000_000))  # over MAX_TASK_BYTES
    r.rpush(queue, b"[" + b"0," * 1_000_000 + b"0]")  # a 2 MB element
    r.rpush(queue, missing("req-long", "img", dtype="x" * 20_000))  # fits, echoed cut
    r.rpush(queue, missing("req-shape", "img", shape=list(range(5000))))
    r.rpush(queue, *good[70:])
    with running(settings) as run:
        run.settled(150)

    records = {rec["request_id"]: rec for rec in read_results(output_dir)}
    assert len(records) == 150 - 1  # the 2 MB element has no ids: one null request_id
    assert all(len(rec["error"]) < 300 for rec in records.values() if rec.get("error"))
    assert "over MAX_TASK_BYTES" in records[None]["error"]
    assert "...(+" in records["req-long"]["error"] and "...(+" in records["req-shape"]["error"]
    wait_for(lambda: len(read_view(output_dir)) == 150, what="the view")
    assert (output_dir / "results.json").stat().st_size < 100_000
    dead = Keys.for_queue(queue).dead
    assert r.xlen(dead) == 4
    assert int(r.memory_usage(dead) or 0) < 1_000_000
    kept = {len(fields[b"task"]) for _, fields in r.xrange(dead)}
    assert max(kept) <= 65_536 and 1024 in kept  # the oversized ones keep their first KiB


def test_dead_letters_are_capped(make_settings: MakeSettings, r: redis.Redis) -> None:
    settings = make_settings(DEAD_LETTERS_MAXLEN=10)
    r.rpush(settings.hosting_tasks_queue, *[b"not json %d" % i for i in range(300)])
    with running(settings) as run:
        run.settled(300)
    # MAXLEN ~ trims whole macro-nodes (100 entries by default), never below the cap.
    assert 10 <= r.xlen(Keys.for_queue(settings.hosting_tasks_queue).dead) <= 110


def test_a_far_future_entry_id_is_saved(
    make_settings: MakeSettings, r: redis.Redis, output_dir: Path, frames: Frames
) -> None:
    """Finding 8: an entry ID past the year 9999 crashed the process in file_name."""
    settings = make_settings()
    keys = Keys.for_queue(settings.hosting_tasks_queue)
    r.xgroup_create(keys.stream, settings.consumer_group, id="0", mkstream=True)
    task = frames.task(random_frame((16, 16, 3)), "req-far", "img-far")
    r.xadd(keys.stream, {"task": task}, id="999999999999999-0")
    with running(settings) as run:
        run.settled(1)
    [record] = read_results(output_dir)
    assert record["status"] == "completed"
    assert Path(record["file_path"]).name == "img-far_99991231_235959.jpg"


@pytest.mark.parametrize("value", ["line\nforged INFO entry", "\x1b[2J\x1b[31mred", "nul\x00",
                                   "c1\x85\x9b"])
def test_text_logs_escape_control_characters(value: str) -> None:
    """Finding 7: ids went raw into text logs."""
    record = logging.LogRecord("returner", logging.INFO, __file__, 1, "task %s/%s", (value, "i"),
                               None)
    line = TextFormatter("%(levelname)s %(message)s").format(record)
    assert "\n" not in line and "\x1b" not in line and "\x00" not in line
    assert not any(0x80 <= ord(c) < 0xA0 for c in line)
    assert line.startswith("INFO task ")
