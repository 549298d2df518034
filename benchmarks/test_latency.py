"""Latency from RPUSH to a durable result, at half the service's maximum throughput.

A producer thread pushes tasks for frames already in shared memory at a steady rate;
a watcher notes when each entry first appears in results.json, which the service
renames into place only after fsyncing it (so a visible entry is a durable one).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from benchmarks import harness
from returner.demo import put_frame, task_message
from tests.conftest import wait_for

RATE = float(os.environ.get("BENCH_LATENCY_RATE", "0"))  # frames/s; 0: half the measured max
DURATION_S = 5.0


class Watcher(threading.Thread):
    """Polls results.json every millisecond; records when each image_id first appears.

    Each version of the file starts with the previous one's entries, so only its tail is
    read, from a few bytes before where the last read ended (the previous version's
    closing bracket is now a comma and a new entry). The history the file held when the
    watcher was made is never parsed: in a long-running service it is megabytes."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.seen, self.halt = path, {}, threading.Event()
        self.offset = path.stat().st_size if path.exists() else 0

    def run(self) -> None:
        stamp, offset = None, self.offset
        while not self.halt.is_set():
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                time.sleep(0.001)
                continue
            if (st.st_ino, st.st_size) != stamp:
                stamp, now = (st.st_ino, st.st_size), time.time()
                start = max(offset - 4, 0)
                with open(self.path, "rb") as fh:
                    fh.seek(start)
                    data = fh.read()
                for line in data.splitlines():
                    line = line.strip().rstrip(b",")
                    if line.startswith(b"{"):
                        self.seen.setdefault(json.loads(line)["image_id"], now)
                offset = start + len(data)
            time.sleep(0.001)


def measure(client: redis.Redis, url: str, tmp: Path, frame: np.ndarray, rate: float,
            earlier: int = 0) -> tuple[float, float, float]:
    count = int(rate * DURATION_S)
    queue = f"lat:{uuid.uuid4().hex[:8]}"
    out = tmp / queue.replace(":", "_")
    out.mkdir(parents=True)
    harness.history(out / "results.json", earlier)
    names = [put_frame(frame) for _ in range(count)]  # ready before the clock starts
    pushed: dict[str, float] = {}
    try:
        with harness.service(url, queue, out):
            watcher = Watcher(out / "results.json")
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


# A fresh results.json, and one half way to its rotation at the default
# RESULTS_MAX_ENTRIES (100,000): every commit rewrites it, 7.5 MB there.
@pytest.mark.parametrize("earlier", [0, 50_000])
@pytest.mark.parametrize("pages", ["4k", "huge"])
def test_latency(pages: str, earlier: int, benchmark, bench_redis, page_frame,  # type: ignore[no-untyped-def]
                 tmp_path: Path, report) -> None:
    client, url = bench_redis
    figures: list[float] = []

    def run() -> None:
        figures.extend(latency_run(client, url, tmp_path, page_frame, earlier))

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
                earlier: int = 0) -> tuple[float, float, float, float]:
    """(rate, p50 ms, p99 ms, max ms) at RATE, or at half the maximum measured now (with
    the same history)."""
    rate = RATE or harness.service_rate(client, url, tmp_path, page_frame, 400, earlier) / 2
    return (rate, *measure(client, url, tmp_path, page_frame, rate, earlier))
