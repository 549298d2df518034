"""End-to-end throughput of `returner run` against the encode-only ceiling and the seed
module's design, all measured in this one run, on 1448x1024 RGB frames (q80, 4:2:0).

Two stripped-down loops measure what the service's unavoidable work costs on this
machine: "shm floor" maps, encodes, unmaps and unlinks each frame (what the ceiling
leaves out and no service can avoid); "durable floor" also writes each JPEG to a new
file, fsyncs it (`returner.output.write_file`) and renames it, in line. Both report the
machine's CPU per frame.

The service runs with 0, 20,000 and 10,000,000 earlier records in its store
(`harness.history`; the 10M store is a copy of the one cached in
`.returner/bench-cache/`), on SERVICE_FRAMES frames pushed before it starts. Rates are
taken between the first and the last commit time of the run's records in the store,
so process start-up is not counted. The seed's design runs on a results.json of 0 and
20,000 entries (it reads and rewrites the whole file for every frame; at 10M entries
it would not finish). The ceiling and the durable floor are measured first and last
(the machine drifts, and may be shared), and the ratios use the mean of the two. Run:
make bench (or pytest benchmarks -k throughput).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import redis
import simplejpeg

from benchmarks import harness

SERVICE_FRAMES = 1200
STRIPPED_FRAMES = 600
ORIGINAL_FRAMES = {0: 300, 20_000: 40}  # the seed's design, by earlier results.json entries
# Earlier records in the store: none, a day's start, and months of a busy host.
HISTORIES = (0, 20_000, 10_000_000)


def ceiling(frame, count: int = 600) -> float:  # type: ignore[no-untyped-def]
    """simplejpeg alone, one thread per core, the frame in memory."""
    return ceiling_measured(frame, count).rate


def ceiling_measured(frame, count: int = 600) -> harness.Measured:  # type: ignore[no-untyped-def]
    return harness.measure(lambda _: simplejpeg.encode_jpeg(frame, 80, "RGB", "420"), count,
                           os.cpu_count() or 1)


def original_rate(client: redis.Redis, tmp: Path, frame, earlier: int) -> float:  # type: ignore[no-untyped-def]
    pytest.importorskip("cv2")
    queue = f"orig:{uuid.uuid4().hex[:8]}"
    out = tmp / queue.replace(":", "_")
    out.mkdir(parents=True)
    harness.legacy_results(out / "results.json", earlier)
    count = ORIGINAL_FRAMES[earlier]
    names = harness.push_frames(client, queue, frame, count)
    try:
        started = time.perf_counter()
        harness.original_design(client, queue, out, count)
        return count / (time.perf_counter() - started)
    finally:
        harness.release(names)


def durable_floor(frame, directory: Path) -> harness.Measured:  # type: ignore[no-untyped-def]
    directory.mkdir()
    return harness.stripped_loop(frame, STRIPPED_FRAMES, directory)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("pages", ["4k", "huge"])
def test_throughput(pages: str, benchmark, bench_redis, page_frame, tmp_path: Path,  # type: ignore[no-untyped-def]
                    report) -> None:
    client, url = bench_redis
    rates: dict[str, float] = {}
    cpu: dict[int, float] = {}
    loops: dict[str, harness.Measured] = {}

    def run() -> None:
        loops["ceiling first"] = ceiling_measured(page_frame)
        loops["shm floor"] = harness.stripped_loop(page_frame, STRIPPED_FRAMES)
        loops["durable floor first"] = durable_floor(page_frame, tmp_path / "durable-first")
        for earlier in HISTORIES:
            ours = harness.service_run(client, url, tmp_path, page_frame, SERVICE_FRAMES,
                                       earlier)
            rates[f"service {earlier}"], cpu[earlier] = ours
            if earlier in ORIGINAL_FRAMES:
                rates[f"original {earlier}"] = original_rate(client, tmp_path, page_frame,
                                                             earlier)
        loops["durable floor last"] = durable_floor(page_frame, tmp_path / "durable-last")
        loops["ceiling last"] = ceiling_measured(page_frame)

    with harness.shm_pages(pages):
        benchmark.pedantic(run, rounds=1, iterations=1)
    # The machine drifts during a run: the ratios use the ceiling and the durable floor
    # measured before and after the services.
    first, last = loops["ceiling first"], loops["ceiling last"]
    top = (first.rate + last.rate) / 2
    report(f"ceiling [{pages} pages]", top, "frames/s", first=first.rate, last=last.rate)
    report(f"ceiling cpu [{pages} pages]", (first.cpu_ms + last.cpu_ms) / 2, "ms/frame")
    first, last = loops["durable floor first"], loops["durable floor last"]
    loops["durable floor"] = harness.Measured((first.rate + last.rate) / 2,
                                              (first.cpu_ms + last.cpu_ms) / 2)
    for name in ("shm floor", "durable floor"):
        loop = loops[name]
        extra = {"first": first.rate, "last": last.rate} if name == "durable floor" else {}
        report(f"{name} [{pages} pages]", loop.rate, "frames/s", **extra)
        report(f"{name}/ceiling [{pages} pages]", loop.rate / top, "x")
        report(f"{name} cpu [{pages} pages]", loop.cpu_ms, "ms/frame")
    # What the durable loop would reach with its disk waits overlapped and both cores
    # busy: an estimate of the best a design that fsyncs each JPEG and unlinks each
    # segment can do here.
    bound = loops["durable floor"].cpu_bound
    report(f"durable cpu bound [{pages} pages]", bound, "frames/s")
    report(f"durable cpu bound/ceiling [{pages} pages]", bound / top, "x")
    floor = loops["durable floor"].rate
    for earlier in HISTORIES:
        ours = rates[f"service {earlier}"]
        report(f"service [{pages} pages, {earlier} earlier]", ours, "frames/s")
        report(f"service cpu [{pages} pages, {earlier} earlier]", cpu[earlier], "ms/frame",
               note="the service's user+system CPU, start-up included")
        report(f"service/ceiling [{pages} pages, {earlier} earlier]", ours / top, "x")
        report(f"service/durable floor [{pages} pages, {earlier} earlier]", ours / floor, "x")
        report(f"service/durable cpu bound [{pages} pages, {earlier} earlier]", ours / bound, "x")
        if earlier:
            report(f"service {earlier}/service 0 [{pages} pages]",
                   ours / rates["service 0"], "x")
            report(f"service cpu {earlier}/service cpu 0 [{pages} pages]",
                   cpu[earlier] / cpu[0], "x")
        theirs = rates.get(f"original {earlier}")
        if theirs:
            report(f"original [{pages} pages, {earlier} earlier]", theirs, "frames/s")
            report(f"service/original [{pages} pages, {earlier} earlier]", ours / theirs, "x")
    benchmark.extra_info.update(rates, ceiling=top, bound=bound)
    assert top > 0


WORKER_COUNTS = (1, os.cpu_count() or 1, 2 * (os.cpu_count() or 1))


def test_worker_processes(benchmark, bench_redis, page_frame, tmp_path: Path,  # type: ignore[no-untyped-def]
                          report) -> None:
    """`run --workers N` against one process, 20k earlier results, default /dev/shm pages.

    Each count runs with its default encoder threads (cores / N per worker)."""
    client, url = bench_redis
    figures: dict[int, float] = {}

    def run() -> None:
        first = ceiling(page_frame)
        for n in dict.fromkeys(WORKER_COUNTS):
            figures[n] = harness.service_rate(client, url, tmp_path, page_frame, SERVICE_FRAMES,
                                              20_000, WORKERS=str(n))
        figures[0] = (first + ceiling(page_frame)) / 2

    benchmark.pedantic(run, rounds=1, iterations=1)
    report("ceiling [workers run]", figures[0], "frames/s")
    for n in dict.fromkeys(WORKER_COUNTS):
        report(f"service [--workers {n}, 20000 earlier]", figures[n], "frames/s")
        report(f"service/ceiling [--workers {n}, 20000 earlier]", figures[n] / figures[0], "x")
        report(f"workers {n} / workers 1 [20000 earlier]", figures[n] / figures[1], "x")
    assert all(rate > 0 for rate in figures.values())
