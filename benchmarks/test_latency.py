"""Latency from RPUSH to a durable result, at half the service's maximum throughput.

A producer thread pushes tasks for frames already in shared memory at a steady rate
(a monotonic schedule); a watcher notes when each record first appears in the store,
which it reads every millisecond through a connection of its own: the service's
transaction is fsynced before it returns (WAL, synchronous=FULL), so a visible record
is a durable one. (results.json trails the store by up to a second: it no longer says
when a result became durable.)

The rate is half of what the service reaches on an empty store, measured first in the
same run (or BENCH_LATENCY_RATE), and the same rate is offered with 0 and with
10,000,000 earlier records, so the two latencies compare one load.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from benchmarks import harness
from returner.producer import put_segment, task_message
from returner.store import Store
from tests.conftest import wait_for

RATE = float(os.environ.get("BENCH_LATENCY_RATE", "0"))  # frames/s; 0: half the measured max
DURATION_S = 5.0
_rates: dict[str, float] = {}  # pages: the rate of this run


class Watcher(threading.Thread):
    """Reads the records added to the store every millisecond; notes when each
    image_id first appears. Only rows after the history's last id are ever read."""

    def __init__(self, output_dir: Path) -> None:
        super().__init__(daemon=True)
        self.store = Store(output_dir, create=False)
        (last,) = self.store.db.execute("SELECT coalesce(max(id), 0) FROM records").fetchone()
        self.last: int = last
        self.seen: dict[str, float] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                rows = self.store.db.execute(
                    "SELECT id, image_id FROM records WHERE id > ? ORDER BY id", (self.last,)
                ).fetchall()
                now = time.time()
                for row_id, image_id in rows:
                    self.seen.setdefault(image_id, now)
                    self.last = row_id
                time.sleep(0.001)
        finally:
            self.store.close()


def measure(client: redis.Redis, url: str, tmp: Path, frame: np.ndarray, rate: float,
            earlier: int = 0, **settings: str) -> tuple[float, float, float]:
    """p50, p99 and max ms from RPUSH to a durable record at `rate` (settings: the
    service's environment beyond the harness's)."""
    count = int(rate * DURATION_S)
    queue = f"lat:{uuid.uuid4().hex[:8]}"
    out = tmp / queue.replace(":", "_")
    harness.history(out, earlier)
    names = [put_segment(frame) for _ in range(count)]  # ready before the clock starts
    pushed: dict[str, float] = {}
    try:
        with harness.service(url, queue, out, **settings):
            watcher = Watcher(out)
            watcher.start()
            # The group is made once the results are loaded: the service is ready.
            wait_for(lambda: client.exists(f"{{{queue}}}:stream"), timeout=60)
            start = time.monotonic()
            for i, name in enumerate(names):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # the producer's pacing
                image_id = f"lat_{i}"
                pushed[image_id] = time.time()
                client.rpush(queue, task_message(name, frame.shape, "bench", image_id))
            wait_for(lambda: len(watcher.seen) == count, timeout=120)
            watcher.halt.set()
        latencies = np.array([watcher.seen[k] - t for k, t in pushed.items()]) * 1000
        return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)), \
            float(latencies.max())
    finally:
        harness.release(names)
        if earlier >= harness.CACHE_FROM:  # gigabytes: not left for the end of the session
            (out / harness.STORE).unlink()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("earlier", [0, 10_000_000])
@pytest.mark.parametrize("pages", ["4k", "huge"])
def test_latency(pages: str, earlier: int, benchmark, bench_redis, page_frame,  # type: ignore[no-untyped-def]
                 tmp_path: Path, report) -> None:
    client, url = bench_redis
    figures: list[float] = []

    def run() -> None:
        figures.extend(latency_run(client, url, tmp_path, page_frame, earlier, pages))

    with harness.shm_pages(pages):
        benchmark.pedantic(run, rounds=1, iterations=1)
    rate, p50, p99, worst = figures
    where = f"{pages} pages, {earlier} earlier, {rate:.0f}/s"
    report(f"latency p50 [{where}]", p50, "ms")
    report(f"latency p99 [{where}]", p99, "ms")
    report(f"latency max [{where}]", worst, "ms")
    benchmark.extra_info.update(rate=rate, p50_ms=p50, p99_ms=p99, max_ms=worst)
    assert p50 > 0


def latency_run(client: redis.Redis, url: str, tmp_path: Path, page_frame: np.ndarray,
                earlier: int = 0, pages: str = "4k") -> tuple[float, float, float, float]:
    """(rate, p50 ms, p99 ms, max ms) at RATE, or at half the maximum measured on an
    empty store in this run (once per page size)."""
    if pages not in _rates:
        _rates[pages] = RATE or harness.service_rate(client, url, tmp_path, page_frame, 400) / 2
    rate = _rates[pages]
    return (rate, *measure(client, url, tmp_path, page_frame, rate, earlier))
