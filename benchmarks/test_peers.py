"""The returner side by side with its peers and the durable floors, on one job, in one
run: FRAMES frames of 1448x1024x3 uint8 already in shared memory (made with
`returner.producer.put_segment`), each mapped (or read), encoded with simplejpeg (q80,
4:2:0), written, fsynced and renamed as a JPEG, and its segment unlinked.

Variants (see `peers.py` for how each peer runs):

- returner: `returner run` (LOG_LEVEL=WARNING), which also records every outcome in its
  store and emits an event;
- dramatiq: Dramatiq 2.x, Redis broker, the CLI's default processes and threads;
- rq simple / rq fork: 2 processes of RQ's SimpleWorker / forking Worker;
- mapping floor: `peers.save_frame` on 2 threads in this process, no Redis: the work
  alone, mapping the segment as the peers do;
- reading floor: `harness.stripped_loop` with an output directory, which reads the
  segment with pread into a buffer as the service does.

Every variant runs once a round, ROUNDS rounds (BENCH_PEERS_ROUNDS, at least 3), the
order turned by one each round; the figures are medians over the rounds, and each
ratio is the median of the ratios taken within a round (neighbours in time, which a
shared machine disturbs less than it does figures minutes apart). Reported per
variant: frames/s from the push to the last durable JPEG (start-up excluded), CPU per
frame of its own processes (rusage, children included; the floors: this process's), and
the Redis server's CPU per frame. BENCH_RETURNER_PYTHON runs the returner of another
checkout (its venv's python) against the same peers. Run:
`.venv/bin/pytest benchmarks/test_peers.py --benchmark-only -s -p no:cacheprovider`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis

from benchmarks import harness, peers

FRAMES = int(os.environ.get("BENCH_PEERS_FRAMES", "300"))
ROUNDS = max(3, int(os.environ.get("BENCH_PEERS_ROUNDS", "3")))
PEERS = ("dramatiq", "rq simple", "rq fork")
FLOORS = ("mapping floor", "reading floor")
VARIANTS = ("returner", *PEERS, *FLOORS)

Run = Callable[[redis.Redis, str, np.ndarray, Path], peers.PeerRun]


def service(make: Callable[..., peers.Peer], **options: bool) -> Run:
    def run(client: redis.Redis, url: str, frame: np.ndarray, out: Path) -> peers.PeerRun:
        queue = f"peers_{uuid.uuid4().hex[:8]}"
        names = peers.prepare(frame, FRAMES, out)
        try:
            peer = make(client, url, queue, out, frame.shape, **options)
            return peers.run_peer(peer, client, names, out)
        finally:
            harness.release(names)  # only those a failure left behind are still there

    return run


def mapping_floor(client: redis.Redis, url: str, frame: np.ndarray, out: Path) -> peers.PeerRun:
    names = peers.prepare(frame, FRAMES, out)
    try:
        loop = harness.measure(
            lambda i: peers.save_frame(names[i], frame.shape, f"img_{i}", str(out)),
            FRAMES, peers.FLOOR_THREADS)
    finally:
        harness.release(names)
    return peers.PeerRun(loop.rate, loop.own_cpu_ms, 0.0)


def reading_floor(client: redis.Redis, url: str, frame: np.ndarray, out: Path) -> peers.PeerRun:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    loop = harness.stripped_loop(frame, FRAMES, out)
    return peers.PeerRun(loop.rate, loop.own_cpu_ms, 0.0)


RUNS: dict[str, Run] = {
    "returner": service(peers.returner),
    "dramatiq": service(peers.dramatiq_peer),
    "rq simple": service(peers.rq_peer, simple=True),
    "rq fork": service(peers.rq_peer, simple=False),
    "mapping floor": mapping_floor,
    "reading floor": reading_floor,
}


def rounds(client: redis.Redis, url: str, frame: np.ndarray, tmp: Path
           ) -> list[dict[str, peers.PeerRun]]:
    """ROUNDS rounds of every variant, the order turned by one each round."""
    done = []
    for r in range(ROUNDS):
        shift = r % len(VARIANTS)
        figures = {}
        for name in VARIANTS[shift:] + VARIANTS[:shift]:
            out = tmp / f"out-{r}-{name.replace(' ', '-')}"
            figures[name] = RUNS[name](client, url, frame, out)
            shutil.rmtree(out)
            print(f"[bench] round {r + 1} {name}: {figures[name].rate:.1f} frames/s, "
                  f"{figures[name].cpu_ms:.2f} ms CPU/frame", flush=True)
        done.append(figures)
    return done


def median(values: list[float]) -> float:
    return statistics.median(values)


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("pages", ["4k", "huge"])
def test_peers(pages: str, benchmark, bench_redis, page_frame, tmp_path: Path,  # type: ignore[no-untyped-def]
               report) -> None:
    client, url = bench_redis
    done: list[dict[str, peers.PeerRun]] = []

    def run() -> None:
        done.extend(rounds(client, url, page_frame, tmp_path))

    with harness.shm_pages(pages):
        benchmark.pedantic(run, rounds=1, iterations=1)
    where = f"{pages} pages, {FRAMES} frames, {ROUNDS} rounds"
    for name in VARIANTS:
        rates = [r[name].rate for r in done]
        cpus = [r[name].cpu_ms for r in done]
        report(f"peers: {name} [{where}]", median(rates), "frames/s", rounds=rates,
               spread=(max(rates) - min(rates)) / median(rates))
        report(f"peers: {name} cpu [{where}]", median(cpus), "ms/frame", rounds=cpus)
        if name not in FLOORS:
            redis_cpu = median([r[name].redis_cpu_ms for r in done])
            report(f"peers: {name} redis cpu [{where}]", redis_cpu, "ms/frame")
    best = [max(r[p].rate for p in PEERS) for r in done]
    ours = [r["returner"].rate for r in done]
    ratio = [o / b for o, b in zip(ours, best, strict=True)]
    report(f"peers: returner/best peer [{where}]", median(ratio), "x", rounds=ratio,
           best=[max(PEERS, key=lambda p, r=r: r[p].rate) for r in done])  # type: ignore[misc]
    for floor in FLOORS:
        ratio = [r["returner"].rate / r[floor].rate for r in done]
        report(f"peers: returner/{floor} [{where}]", median(ratio), "x", rounds=ratio)
        ratio = [r["returner"].cpu_ms / r[floor].cpu_ms for r in done]
        report(f"peers: returner cpu/{floor} cpu [{where}]", median(ratio), "x", rounds=ratio)
    benchmark.extra_info.update({name: median([r[name].rate for r in done]) for name in VARIANTS})
    assert all(r[name].rate > 0 for r in done for name in VARIANTS)
