"""The returner with OBJECT_STORE_URL against the upload floor, in one run.

The floor (issue 19): the same 1448x1024 pages encoded with simplejpeg and created in
the object store by the same client (`ObjectStore.put_new`: obstore, a conditional create
with its checksum and metadata), THREADS at once, to the same SeaweedFS on loopback,
with nothing else. The service runs `returner run` over FRAMES pages pushed before it
starts (its frames/s between the first and the last record), with four I/O threads
uploading as the floor does. They take turns over ROUNDS rounds; medians.

Reported: frames/s of each and their ratio (target: at least 0.9x), CPU per frame of the
service (its rusage) against the floor's (encoding plus the client), and SeaweedFS's;
and the latency from RPUSH to a committed record at half the service's maximum rate,
with the store. Nothing here asserts a speed. Run:

    .venv/bin/pytest benchmarks/test_object_store.py --benchmark-only -s -p no:cacheprovider
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import redis

from benchmarks import harness
from benchmarks.test_latency import measure
from benchmarks.test_upload import BUCKET, THREADS, obstore_put, seaweed, upload_round
from tests.s3support import SeaweedS3

pytestmark = pytest.mark.bench
__all__ = ["seaweed"]  # the module's SeaweedFS, shared with the floor's

FRAMES = 300
ROUNDS = 3


def service_settings(server: SeaweedS3, prefix: str) -> dict[str, str]:
    url = f"s3://{BUCKET}/{prefix}"
    return {**server.env(), "OBJECT_STORE_URL": url, "LOG_LEVEL": "WARNING"}


@pytest.mark.timeout(1200)
def test_service_against_the_upload_floor(
    benchmark: Any, seaweed: SeaweedS3, page_frame: np.ndarray, bench_redis: Any,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, report: Any,
) -> None:  # fmt: skip
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    pytest.importorskip("obstore")
    client: redis.Redis = bench_redis.client
    put, close = obstore_put(seaweed.endpoint)
    weed = psutil.Process(seaweed.proc.pid if seaweed.proc else 0)
    floor: list[Any] = []
    service: list[tuple[float, float, float]] = []  # frames/s, CPU ms/frame, store's ms/frame

    def one_service(round_: int) -> tuple[float, float, float]:
        before = sum(weed.cpu_times()[:2])
        run = harness.service_run(client, bench_redis.url, tmp_path, page_frame, FRAMES,
                                  **service_settings(seaweed, f"svc{round_}"))  # fmt: skip
        store_ms = (sum(weed.cpu_times()[:2]) - before) * 1000 / FRAMES
        return run.rate, run.cpu_ms, store_ms

    def run() -> None:
        upload_round(put, page_frame, "warmup", seaweed, count=THREADS * 4)
        for round_ in range(ROUNDS):
            for step in ("floor", "service") if round_ % 2 == 0 else ("service", "floor"):
                if step == "floor":
                    floor.append(upload_round(put, page_frame, f"f{round_}", seaweed))
                else:
                    service.append(one_service(round_))

    try:
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        close()
    floor_rate = statistics.median(f.rate for f in floor)
    rate = statistics.median(s[0] for s in service)
    report("object_store.floor", floor_rate, "frames/s",
           rounds=[round(f.rate, 1) for f in floor])  # fmt: skip
    report("object_store.service", rate, "frames/s", rounds=[round(s[0], 1) for s in service])
    pairs = [round(s[0] / f.rate, 3) for s, f in zip(service, floor, strict=True)]
    report("object_store.service/floor", rate / floor_rate, "x", pairs=pairs)
    report("object_store.floor.cpu", statistics.median(f.client_ms for f in floor), "ms/frame")
    report("object_store.service.cpu", statistics.median(s[1] for s in service), "ms/frame")
    report("object_store.floor.store_cpu", statistics.median(f.server_ms for f in floor),
           "ms/frame")  # fmt: skip
    report("object_store.service.store_cpu", statistics.median(s[2] for s in service),
           "ms/frame")  # fmt: skip
    assert rate > 0 and floor_rate > 0

    half = rate / 2
    p50, p99, worst = measure(client, bench_redis.url, tmp_path, page_frame, half,
                              **service_settings(seaweed, "latency"))  # fmt: skip
    report("object_store.latency.p50", p50, "ms", rate=round(half, 1))
    report("object_store.latency.p99", p99, "ms", rate=round(half, 1))
    report("object_store.latency.max", worst, "ms", rate=round(half, 1))
