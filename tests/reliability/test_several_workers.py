"""Three `returner run` processes share one group and one OUTPUT_DIR; one is killed with
-9 while it holds work and is not restarted. The others take its entries over within
seconds, and the shared outputs lose nothing, double nothing and leave no orphan."""

from __future__ import annotations

import itertools
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import redis

from returner.producer import task_message
from returner.stream import Keys
from tests.conftest import Frames, count_records, random_frame, read_results, wait_for
from tests.e2e.conftest import Service

SHAPE = (96, 128, 3)
TASKS = 600
BAD = 12  # tasks whose segment does not exist: recorded as failed, dead-lettered
BEFORE_START = 150
CONSUMERS = ("w1", "w2", "w3")
GROUP = "returner"
SEED = 31_337

Aim = Callable[[str, list[str]], bool]  # (worker, the entries it holds) -> kill it now?


def message(frames: Frames, palette: list[np.ndarray], i: int, bad: int = BAD) -> bytes:
    if i < bad:  # a valid name that no renderer ever created
        return task_message(f"img_shm_{uuid.uuid4().hex}", SHAPE, "req", f"bad_{i}")
    return frames.task(palette[i % len(palette)], "req", f"img_{i}")


class Producer(threading.Thread):
    """Pushes tasks in small bursts while the workers run."""

    def __init__(self, r: redis.Redis, queue: str, messages: list[bytes], rng: random.Random,
                 burst: int = 15) -> None:
        super().__init__(daemon=True)
        self.r, self.queue, self.messages, self.rng = r, queue, messages, rng
        self.burst = burst
        self.error: BaseException | None = None
        self.a_third_in = threading.Event()

    def run(self) -> None:
        try:
            for start in range(0, len(self.messages), self.burst):
                self.r.rpush(self.queue, *self.messages[start:start + self.burst])
                if start >= len(self.messages) // 3:
                    self.a_third_in.set()
                time.sleep(self.rng.uniform(0.03, 0.12))
        except BaseException as exc:  # reported by the test
            self.error = exc


def start_workers(service: Callable[..., Service], service_env: dict[str, str]
                  ) -> dict[str, Service]:
    workers = {name: service({**service_env, "CONSUMER_NAME": name,
                              "CONSUMER_TIMEOUT_MS": "3000"}).start() for name in CONSUMERS}
    for svc in workers.values():
        svc.wait_ready()
    return workers


def frozen(svc: Service) -> bool:
    assert svc.proc is not None
    stat = Path(f"/proc/{svc.proc.pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def held(r: redis.Redis, stream: str, consumer: str) -> list[str]:
    rows: Any = r.xpending_range(stream, GROUP, "-", "+", 1000, consumername=consumer)
    return [row["message_id"].decode() for row in rows]


def kill_holding_work(workers: dict[str, Service], r: redis.Redis, stream: str,
                      rng: random.Random, aim: Aim, until: threading.Thread
                      ) -> tuple[str, int]:
    """Kill -9 a worker at a random moment while it holds entries; (its name, tries).

    A worker seen holding entries is frozen (SIGSTOP) so the test can check that it
    still holds some and that `aim` agrees, then killed with a plain SIGKILL wherever
    it happened to be; otherwise it goes on (SIGCONT). Gives up once `until` ends.
    """
    for attempt in itertools.count(1):
        holders = [n for n in workers if held(r, stream, n)]
        if holders:
            name = rng.choice(holders)
            svc = workers[name]
            svc.signal(signal.SIGSTOP)
            wait_for(partial(frozen, svc), timeout=5, interval=0.001, what="the worker frozen")
            time.sleep(0.01)  # let Redis run whatever the worker sent before it froze
            ids = held(r, stream, name)
            if ids and aim(name, ids):
                svc.kill9()
                return name, attempt
            svc.signal(signal.SIGCONT)
        assert until.is_alive(), f"no worker caught where aimed in {attempt} tries"
        time.sleep(rng.uniform(0.0, 0.01))
    raise AssertionError("unreachable")


def recorded(out: Path, ids: list[str]) -> list[str]:
    """The JPEGs that completed records of these (unacknowledged) entries name: their
    worker is past its commit, renaming them or about to acknowledge."""
    wanted = set(ids)
    return [e["file_path"] for e in read_results(out)
            if e["entry_id"] in wanted and e["file_path"]]


def test_several_workers(service: Callable[..., Service], service_env: dict[str, str],
                         r: redis.Redis, queue: str, output_dir: Path, frames: Frames) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    keys = Keys.for_queue(queue)
    palette = [random_frame(SHAPE, seed=s) for s in range(8)]
    messages = [message(frames, palette, i) for i in range(TASKS)]
    rng.shuffle(messages)
    r.rpush(queue, *messages[:BEFORE_START])
    workers = start_workers(service, service_env)
    producer = Producer(r, queue, messages[BEFORE_START:], rng)
    producer.start()

    assert producer.a_third_in.wait(timeout=60), "the producer is stuck"
    victim, tries = kill_holding_work(workers, r, keys.stream, rng, lambda *_: True, producer)
    killed_at = time.monotonic()
    time.sleep(0.05)  # anything the victim sent before dying is applied by now
    orphaned = held(r, keys.stream, victim)
    window = [p for p in recorded(output_dir, orphaned) if not Path(p).exists()]
    wait_for(lambda: not held(r, keys.stream, victim), timeout=30, what="the takeover")
    takeover_s = time.monotonic() - killed_at
    producer.join()
    assert producer.error is None, producer.error
    survivors = {n: s for n, s in workers.items() if n != victim}

    def settled() -> bool:
        return (r.llen(queue) == 0 and r.xpending(keys.stream, GROUP)["pending"] == 0
                and count_records(output_dir) >= TASKS)

    wait_for(settled, timeout=60, what="every task settled")
    codes = {n: s.stop() for n, s in survivors.items()}
    elapsed = time.monotonic() - started

    results = read_results(output_dir)
    completed = Counter(e["image_id"] for e in results if e["status"] == "completed")
    failed = Counter(e["image_id"] for e in results if e["status"] == "failed")
    good = {f"img_{i}" for i in range(BAD, TASKS)}
    bad = {f"bad_{i}" for i in range(BAD)}
    lost = len(good - set(completed)) + len(bad - set(failed))
    duplicates = sum(n - 1 for n in completed.values())
    referenced = Counter(Path(e["file_path"]).name for e in results if e["file_path"])
    on_disk = {p.name for p in output_dir.glob("*.jpg")}
    orphans = sorted(on_disk - set(referenced))
    missing = sorted(set(referenced) - on_disk)
    logs = {n: s.logs(None) for n, s in workers.items()}
    done_by = {n: logs[n].count(" completed -> ") for n in CONSUMERS}
    stale = len(list(output_dir.glob(".tmp/*/*")))

    print(f"\nseveral workers: {TASKS} tasks ({BAD} bad), 3 workers, {victim} killed holding "
          f"{len(orphaned)} entries ({len(window)} JPEGs not yet renamed; caught at try "
          f"{tries}), taken over in {takeover_s:.1f}s; lost {lost}, duplicate completed "
          f"{duplicates}, results {len(results)} = {len(completed)} completed + "
          f"{sum(failed.values())} failed, orphans {len(orphans)}, completions by worker "
          f"{done_by}, exit codes {codes}, stale temp files {stale}, {elapsed:.1f}s")

    assert orphaned, "the victim held nothing when killed"
    assert lost == 0, (sorted(good - set(completed))[:10], sorted(bad - set(failed)))
    assert duplicates == 0, [k for k, n in completed.items() if n > 1]
    assert not set(completed) & bad and not set(failed) & good
    assert len(results) == len(completed) + sum(failed.values()), "an entry was lost or doubled"
    # a bad task can be recorded failed twice only if the victim died before dead-lettering it
    assert sum(failed.values()) <= BAD + len(orphaned)
    assert r.xlen(keys.dead) == BAD and r.xlen(keys.stream) == 0
    for entry_id in orphaned:  # each was settled by a survivor
        assert any(f"(entry {entry_id})" in logs[n] for n in survivors), entry_id
    assert any(f"consumer {victim} silent" in logs[n] for n in survivors), "no takeover logged"
    assert takeover_s < 10, f"taken over only after {takeover_s:.1f}s"
    assert codes == dict.fromkeys(survivors, 0), codes
    assert all(done_by[n] > 0 for n in survivors), f"the work was not spread: {done_by}"
    assert max(referenced.values()) == 1, "a JPEG referenced by two entries"
    assert not any(frames.exists(n) for n in frames.names)
    assert orphans == [], f"orphan JPEGs {orphans}"
    assert missing == [], f"records of missing JPEGs {missing} (unplaced at the kill: {window})"


def test_worker_killed_inside_its_commit(service: Callable[..., Service],
                                         service_env: dict[str, str], r: redis.Redis,
                                         queue: str, output_dir: Path, frames: Frames) -> None:
    """The kill aimed after the commit that records the JPEGs and before the ack: while
    the renames that put them in place run, or just after.

    The victim is not restarted, so no start-up sweep runs: the survivors, taking its
    entries over as duplicates or sweeping its temp directory, must finish its moves, so
    that every completed record's JPEG exists and no JPEG is an orphan.
    """
    count = 900
    rng = random.Random(SEED + 1)
    keys = Keys.for_queue(queue)
    palette = [random_frame(SHAPE, seed=s) for s in range(8)]
    messages = [message(frames, palette, i, bad=0) for i in range(count)]
    workers = start_workers(service, service_env)
    producer = Producer(r, queue, messages, rng, burst=30)
    producer.start()

    window: list[str] = []
    unplaced: list[str] = []

    def between_commit_and_ack(_: str, ids: list[str]) -> bool:
        window[:] = recorded(output_dir, ids)
        unplaced[:] = [p for p in window if not Path(p).exists()]
        return bool(window)

    assert producer.a_third_in.wait(timeout=60), "the producer is stuck"
    victim, tries = kill_holding_work(workers, r, keys.stream, rng, between_commit_and_ack,
                                      producer)
    producer.join()
    wait_for(lambda: r.llen(queue) == 0 and r.xpending(keys.stream, GROUP)["pending"] == 0,
             timeout=60, what="every task settled")
    survivors = {n: s for n, s in workers.items() if n != victim}
    codes = {n: s.stop() for n, s in survivors.items()}

    results = read_results(output_dir)
    completed = Counter(e["image_id"] for e in results if e["status"] == "completed")
    referenced = {Path(e["file_path"]).name for e in results if e["file_path"]}
    on_disk = {p.name for p in output_dir.glob("*.jpg")}
    orphans, missing = sorted(on_disk - referenced), sorted(referenced - on_disk)
    print(f"\nkilled inside its commit: {count} tasks, {victim} killed at try {tries} with "
          f"{len(window)} JPEGs recorded but not acknowledged, {len(unplaced)} of them not yet "
          f"renamed; lost {count - len(completed)}, "
          f"duplicate completed {sum(n - 1 for n in completed.values())}, orphans "
          f"{len(orphans)}, missing {len(missing)}, exit codes {codes}")

    assert set(completed) == {f"img_{i}" for i in range(count)}
    assert max(completed.values()) == 1
    assert codes == dict.fromkeys(survivors, 0), codes
    assert not any(frames.exists(n) for n in frames.names)
    assert orphans == [], f"{len(orphans)} orphan JPEGs, e.g. {orphans[:3]}"
    assert missing == [], f"records of missing JPEGs {missing[:3]} (unplaced: {unplaced[:3]})"
    assert all(Path(e["file_path"]).name in on_disk for e in results if e["file_path"])
