"""Memory and descriptors of `returner run` over 10,000 tasks.

The service runs as a subprocess (`python -m returner run`) against the suite's private
Redis, on a queue of its own, with METRICS_PORT=0 and LOG_LEVEL=WARNING. It is fed
256x256 RGB pages through `Segments.push` (`returner.producer.put_segment`), in chunks,
so that /dev/shm never holds more than about 1,000 frames: more are pushed only once
fewer than 750 are pushed and not yet completed. After every 1,000 completed tasks
(records in the store) the process's RSS, open descriptors and threads are sampled
(psutil). The figures at 1k, 5k and 10k and the growth from 1k to 10k are reported; the
whole run is what pytest-benchmark times. It ends with SIGTERM, which must exit 0.

Nothing here asserts a figure: the test fails only if tasks are lost, segments are left
behind, or the service does not stop cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks.conftest import RedisServer, Segments, manga_page, report, wait_until
from returner.store import STORE, Store

pytestmark = pytest.mark.bench

TASKS = 10_000
SAMPLE_EVERY = 1_000
MAX_IN_SHM = 1_000  # frames pushed and not yet completed, at most
CHUNK = 250
SHAPE = (256, 256, 3)
TIMEOUT_S = 240.0


@dataclass(frozen=True)
class Sample:
    completed: int
    rss: int  # bytes
    fds: int
    threads: int
    at_s: float  # since the first push


class Progress:
    """Completed tasks: the records in the service's store (the output directory is
    this test's alone), read through a connection of our own once the store exists.
    results.json holds only the latest 1,000 and trails by up to a second."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.store: Store | None = None
        self.count = 0

    def started(self) -> bool:
        return (self.output_dir / STORE).exists()

    def read(self) -> int:
        if self.store is None:
            if not self.started():
                return self.count
            self.store = Store(self.output_dir, create=False)
        self.count = self.store.counts()["total"]
        return self.count

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


def _service_env(url: str, queue: str, output_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        REDIS_URL=url,
        HOSTING_TASKS_QUEUE=queue,
        OUTPUT_DIR=str(output_dir),
        METRICS_PORT="0",
        LOG_LEVEL="WARNING",
    )
    return env


def _feed_and_sample(
    psutil: Any, proc: subprocess.Popen[bytes], redis: RedisServer, queue: str,
    segments: Segments, progress: Progress,
) -> list[Sample]:
    """Push TASKS frames, keeping at most MAX_IN_SHM in flight; sample every 1,000."""
    frame = manga_page(*SHAPE[:2], seed=3)
    watched = psutil.Process(proc.pid)
    started = time.monotonic()

    def sample(done: int) -> Sample:
        return Sample(done, watched.memory_info().rss, watched.num_fds(),
                      watched.num_threads(), time.monotonic() - started)

    samples = [sample(0)]
    pushed, mark = 0, SAMPLE_EVERY
    while True:
        done = progress.read()
        if done >= mark:
            samples.append(sample(done))
            mark = (done // SAMPLE_EVERY + 1) * SAMPLE_EVERY
        if done >= TASKS:
            return samples
        if proc.poll() is not None:
            raise AssertionError(f"returner run exited with {proc.returncode} at {done} tasks")
        if time.monotonic() - started > TIMEOUT_S:
            raise AssertionError(f"only {done} of {TASKS} tasks completed in {TIMEOUT_S:.0f}s")
        if pushed < TASKS and pushed - done <= MAX_IN_SHM - CHUNK:
            for i in range(pushed, min(TASKS, pushed + CHUNK)):
                segments.push(redis.client, queue, frame, "bench_resources", f"res_{i:05d}")
            pushed = min(TASKS, pushed + CHUNK)
        else:
            time.sleep(0.01)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("returner run did not exit within 20s of SIGTERM") from None


@pytest.mark.timeout(600)
def test_resources_over_10k_tasks(benchmark: Any, bench_redis: RedisServer, tmp_path: Path,
                                  segments: Segments) -> None:
    psutil = pytest.importorskip("psutil")
    queue = f"bench:resources:{uuid.uuid4().hex[:8]}"
    output_dir = tmp_path / "out"
    progress = Progress(output_dir)
    log_path = tmp_path / "returner.log"
    got: dict[str, Any] = {}

    def run() -> None:
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "returner", "run"],
                env=_service_env(bench_redis.url, queue, output_dir),
                cwd=tmp_path,  # no .env from the work tree
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
            try:
                wait_until(lambda: progress.started() or proc.poll() is not None, 30,
                           "returner run to start")
                got["samples"] = _feed_and_sample(psutil, proc, bench_redis, queue, segments,
                                                  progress)
                got["exit"] = _stop(proc)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    try:
        benchmark.pedantic(run, rounds=1, iterations=1)
    except AssertionError:
        print(log_path.read_text(errors="replace")[-3000:])
        raise
    assert got["exit"] == 0, log_path.read_text(errors="replace")[-3000:]
    assert progress.read() == TASKS
    progress.close()
    assert segments.left() == 0, "the service left segments in /dev/shm"
    _report(got["samples"])


def _report(samples: list[Sample]) -> None:
    mib = 1024 * 1024
    for s in samples:
        print(f"  {s.completed:>6} tasks  {s.at_s:6.1f}s  RSS {s.rss / mib:7.1f} MiB  "
              f"fds {s.fds:4d}  threads {s.threads}")
    by_mark = {}
    for s in samples:  # the first sample at or past each mark
        by_mark.setdefault(min(TASKS, s.completed // SAMPLE_EVERY * SAMPLE_EVERY), s)
    report("resources.rss[start]", samples[0].rss / mib, "MiB", threads=samples[0].threads)
    report("resources.fds[start]", samples[0].fds, "fds")
    for mark in (1_000, 5_000, 10_000):
        s = by_mark.get(mark)
        if s is not None:
            report(f"resources.rss[{mark // 1000}k]", s.rss / mib, "MiB", completed=s.completed,
                   threads=s.threads)
            report(f"resources.fds[{mark // 1000}k]", s.fds, "fds", completed=s.completed)
    first, last = by_mark.get(1_000), by_mark.get(TASKS)
    if first and last:
        report("resources.rss_growth[1k->10k]", (last.rss - first.rss) / mib, "MiB")
        report("resources.fds_growth[1k->10k]", last.fds - first.fds, "fds")
        elapsed = last.at_s - first.at_s
        if elapsed > 0:
            report("resources.rate[1k->10k]", (last.completed - first.completed) / elapsed,
                   "tasks/s", shape=list(SHAPE))
