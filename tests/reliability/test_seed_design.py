"""The seed module's design against `returner run`, under the same `kill -9` schedule.

The seed loop (BLPOP one task, copy the frame, encode, write the file, load + append +
rewrite results.json in place) is rebuilt here as a small script, with simplejpeg in
place of OpenCV so no extra dependency is needed. Its losses are timing dependent, so
they are only counted and printed; the returner's are asserted to be zero.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis

from returner.stream import Keys
from tests.conftest import Frames, random_frame, read_results, wait_for
from tests.e2e.conftest import Service
from tests.e2e.test_crash import ResultsReader, completed_ids
from tests.reliability.test_crash_storm import SHAPE, push_tasks

TASKS = 300
KILLS = 10
SEED = 4_242

# The seed's worker loop as its README describes it (and benchmarks/harness.py
# `original_design` reproduces): an error in one task is logged and the loop goes on.
SCRIPT = r"""
import json, sys
from datetime import datetime
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
import redis
import simplejpeg

url, queue, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
results = out / "results.json"
client = redis.Redis.from_url(url)
print("ready", flush=True)
while True:
    popped = client.blpop([queue], timeout=0.5)
    if popped is None:
        print("idle", flush=True)
        continue
    try:
        task = json.loads(popped[1])
        info = task["shm_info"]
        shm = SharedMemory(name=info["shm_name"])
        image = np.ndarray(info["shape"], dtype=np.uint8, buffer=shm.buf).copy()
        shm.close()
        shm.unlink()
        stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
        path = out / f"{task['image_id']}_{stamp}.jpg"
        path.write_bytes(simplejpeg.encode_jpeg(image, quality=80, colorspace="RGB"))
        entries = json.loads(results.read_text()) if results.exists() else []
        entries.append({"timestamp": datetime.now().astimezone().isoformat(),
                        "request_id": task["request_id"], "image_id": task["image_id"],
                        "file_path": str(path), "status": "completed"})
        results.write_text(json.dumps(entries, indent=2))
    except Exception as exc:
        print(f"error: {exc!r}", flush=True)
"""


class Killable(Protocol):
    def alive(self) -> bool: ...
    def kill9(self) -> None: ...


class SeedProcess:
    """The seed script as a subprocess; stdout and stderr go to a log file."""

    def __init__(self, url: str, queue: str, out: Path, log: Path) -> None:
        with open(log, "ab") as sink:
            self.proc = subprocess.Popen([sys.executable, "-c", SCRIPT, url, queue, str(out)],
                                         stdout=sink, stderr=sink)
        self.log = log

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Tally:
    lost: int
    duplicates: int
    orphans: int
    reads: int
    invalid: int
    segments_left: int
    results_valid: bool

    def line(self) -> str:
        valid = "" if self.results_valid else ", results.json unreadable at the end"
        return (f"lost {self.lost}, duplicate completed {self.duplicates}, orphans "
                f"{self.orphans}, invalid reads {self.invalid}/{self.reads}, segments left "
                f"{self.segments_left}{valid}")


def jpegs(out: Path) -> int:
    return sum(1 for _ in out.glob("*.jpg")) if out.exists() else 0


def storm(start: Callable[[], Killable], out: Path, schedule: list[tuple[int, float]],
          drained: Callable[[], bool]) -> None:
    """One run per step: wait for `progress` more JPEGs (or for nothing left to do), then
    `delay` seconds, then kill -9."""
    for progress, delay in schedule:
        proc = start()
        target = jpegs(out) + progress

        def moved_on(proc: Killable = proc, target: int = target) -> bool:
            return jpegs(out) >= target or drained() or not proc.alive()

        wait_for(moved_on, timeout=60, interval=0.002, what="progress before the kill")
        time.sleep(delay)
        assert proc.alive(), "the process died before its kill"
        proc.kill9()


def tally(out: Path, r: redis.Redis, queue: str, names: list[str], frames: Frames,
          reader: ResultsReader) -> Tally:
    try:
        results: list[dict[str, Any]] = read_results(out)
        valid = isinstance(results, list)
    except (OSError, ValueError):
        results, valid = [], False
    completed = Counter(e["image_id"] for e in results if e["status"] == "completed")
    waiting = {json.loads(m)["image_id"] for m in r.lrange(queue, 0, -1)}
    pushed = {f"img_{i}" for i in range(TASKS)}
    referenced = {Path(e["file_path"]).name for e in results if e.get("file_path")}
    return Tally(
        lost=len(pushed - set(completed) - waiting),
        duplicates=sum(n - 1 for n in completed.values()),
        orphans=len({p.name for p in out.glob("*.jpg")} - referenced),
        reads=reader.reads,
        invalid=reader.invalid,
        segments_left=sum(frames.exists(n) for n in names),
        results_valid=valid,
    )


def test_seed_design_against_returner(service: Callable[..., Service], redis_url: str,
                                      r: redis.Redis, queue: str, output_dir: Path,
                                      frames: Frames, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    schedule = [(rng.randint(3, 15), rng.uniform(0.0, 0.01)) for _ in range(KILLS)]
    palette = [random_frame(SHAPE, seed=s) for s in range(8)]

    # The seed design, on its own list and directory.
    seed_queue, seed_out = f"{queue}:seed", tmp_path / "seed-out"
    push_tasks(r, seed_queue, frames, range(TASKS), palette)
    seed_names = list(frames.names)
    runs: list[SeedProcess] = []

    def start_seed() -> SeedProcess:
        log = tmp_path / f"seed-{len(runs)}.log"
        runs.append(SeedProcess(redis_url, seed_queue, seed_out, log))
        return runs[-1]

    reader = ResultsReader(seed_out / "results.json")
    reader.start()
    started = time.monotonic()
    storm(start_seed, seed_out, schedule, lambda: r.llen(seed_queue) == 0)
    final = start_seed()
    wait_for(lambda: r.llen(seed_queue) == 0, timeout=60, what="the seed to drain its list")
    mark = len(final.logs())
    wait_for(lambda: "idle" in final.logs()[mark:], timeout=10, what="the seed to go idle")
    final.kill9()  # it has no shutdown of its own; it is idle here
    reader.halt.set()
    reader.join()
    seed = tally(seed_out, r, seed_queue, seed_names, frames, reader)
    seed_s = time.monotonic() - started
    broken_by = next((f"kill {k}" for k, run in enumerate(runs)
                      if "JSONDecodeError" in run.logs()), "no kill")
    on_disk = {p.name.rsplit("_", 2)[0] for p in seed_out.glob("*.jpg")}
    no_jpeg = TASKS - len(on_disk)

    # `returner run`, the same tasks and the same schedule.
    push_tasks(r, queue, frames, range(TASKS), palette)
    returner_names = frames.names[len(seed_names):]
    reader = ResultsReader(output_dir / "results.json")
    reader.start()
    started = time.monotonic()
    services: list[Service] = []

    def start_returner() -> Service:
        services.append(service().start())
        return services[-1]

    keys = Keys.for_queue(queue)
    storm(start_returner, output_dir, schedule, lambda: r.llen(queue) == 0
          and r.xpending(keys.stream, "returner")["pending"] == 0)
    last = start_returner()
    wait_for(lambda: len(completed_ids(output_dir)) == TASKS, timeout=60, what="every task")
    assert last.stop() == 0, last.logs()
    reader.halt.set()
    reader.join()
    ours = tally(output_dir, r, queue, returner_names, frames, reader)
    ours_s = time.monotonic() - started
    in_flight = sum("recovering entry" in s.logs(None) for s in services[1:])

    print(f"\nseed design vs returner, {TASKS} tasks of {SHAPE[1]}x{SHAPE[0]}, {KILLS} kill -9s "
          f"each on one schedule: seed: {seed.line()} (results.json broken by {broken_by}; "
          f"{no_jpeg} tasks without a JPEG at all; {seed_s:.1f}s) | returner: "
          f"{ours.line()}, {in_flight} kills with work in flight ({ours_s:.1f}s)")

    # The seed: only that it really ran and the counts mean something.
    assert len(runs) == KILLS + 1 and all("ready" in run.logs() for run in runs)
    assert r.llen(seed_queue) == 0 and jpegs(seed_out) > 0 and seed.reads > 0
    assert 0 <= seed.lost <= TASKS and 0 <= seed.invalid <= seed.reads
    # The returner: nothing lost, doubled, orphaned or half-written.
    assert (ours.lost, ours.duplicates, ours.orphans, ours.invalid) == (0, 0, 0, 0), ours
    assert ours.results_valid and ours.reads > 0 and ours.segments_left == 0
    assert r.xlen(keys.stream) == 0 and r.llen(queue) == 0
