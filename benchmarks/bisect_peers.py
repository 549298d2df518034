"""The returner of several commits against the same yardsticks, in one run: for each
commit, `returner run` from that commit's `returner/` (extracted with `git archive`,
put first on PYTHONPATH, run by this interpreter, so only the service's code differs),
alternated round by round with Dramatiq and the mapping floor of `test_peers.py`.

    .venv/bin/python -m benchmarks.bisect_peers [--rounds 5] [--frames 300] [--huge] \\
        REV[,NAME=VALUE...]...

A variant may carry settings for its service after its commit, e.g.
`e3906cc,BATCH_SIZE=8`, so that one commit can run with several.

Prints, per commit, the median frames/s and CPU per frame, and the medians of the
ratios to Dramatiq and to the mapping floor taken within each round. Needs root for
--huge. Leaves nothing behind but its figures in benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import uuid
from pathlib import Path

import numpy as np
import redis
import simplejpeg

from benchmarks import harness, peers
from benchmarks.conftest import manga_page, report
from returner.embedded import EmbeddedRedis

YARDSTICKS = ("dramatiq", "mapping floor")
FRAMES = 300


def extract(commit: str, into: Path) -> Path:
    """The commit's returner/ package under `into`/<commit> (once per commit)."""
    where = into / commit
    if where.exists():
        return where
    where.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(peers.ROOT), "archive", commit, "returner"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def settings(variant: str) -> dict[str, str]:
    """The environment a variant `REV,NAME=VALUE,...` adds to the service's."""
    return dict(item.split("=", 1) for item in variant.split(",")[1:])


def one(variant: str, trees: dict[str, Path], client: redis.Redis, url: str,
        frame: np.ndarray, out: Path, count: int) -> peers.PeerRun:
    if variant == "mapping floor":
        names = peers.prepare(frame, count, out)
        try:
            loop = harness.measure(
                lambda i: peers.save_frame(names[i], frame.shape, f"img_{i}", str(out)),
                count, peers.FLOOR_THREADS)
        finally:
            harness.release(names)
        return peers.PeerRun(loop.rate, loop.own_cpu_ms, 0.0)
    queue = f"bisect_{uuid.uuid4().hex[:8]}"
    names = peers.prepare(frame, count, out)
    try:
        if variant == "dramatiq":
            peer = peers.dramatiq_peer(client, url, queue, out, frame.shape)
        else:
            peer = peers.returner(client, url, queue, out, frame.shape)
            peer.env["PYTHONPATH"] = str(trees[variant])
            peer.env.update(settings(variant))
        return peers.run_peer(peer, client, names, out)
    finally:
        harness.release(names)



def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bisect_peers")
    parser.add_argument("commits", nargs="+", metavar="REV[,NAME=VALUE...]",
                        help="a commit, with settings for its service if any")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frames", type=int, default=FRAMES)
    parser.add_argument("--huge", action="store_true", help="/dev/shm on huge pages (root)")
    parser.add_argument("--latency", type=float, metavar="RATE", default=0.0,
                        help="instead: RPUSH-to-durable-record latency at RATE frames/s, "
                             "against a bare write + fsync of one JPEG at that rate")
    args = parser.parse_args()
    frame = manga_page()
    pages = "huge" if args.huge else "4k"
    with tempfile.TemporaryDirectory(prefix="bisect-") as tmp, harness.shm_pages(pages):
        server = EmbeddedRedis(Path(tmp) / "redis")
        url = server.start()
        try:
            if args.latency:
                tails(args, frame, url, Path(tmp), pages)
                return
            runs = rounds(args, frame, url, Path(tmp))
        finally:
            server.stop()
        summarise(args.commits, runs, pages)


def tails(args: argparse.Namespace, frame: np.ndarray, url: str, tmp: Path, pages: str) -> None:
    """Latency of every variant and of the bare fsync, once a round, the order turned."""
    from benchmarks import test_latency, test_load  # pytest modules: only for this mode

    client = redis.Redis.from_url(url)
    trees = {c: extract(c.split(",")[0], tmp / "trees") for c in args.commits}
    jpeg = simplejpeg.encode_jpeg(frame, peers.QUALITY, "RGB", peers.SUBSAMPLING)
    variants = [*args.commits, "fsync"]
    got: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
    for r in range(args.rounds):
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            if variant == "fsync":
                got[variant].append(tuple(test_load.bare_fsync(tmp / f"fsync-{r}", jpeg,
                                                               args.latency)))
            else:
                got[variant].append(test_latency.measure(
                    client, url, tmp, frame, args.latency, 0, PYTHONPATH=str(trees[variant]),
                    **settings(variant)))
            p50, p99, worst = got[variant][-1]
            print(f"round {r + 1} {variant}: p50 {p50:.1f} p99 {p99:.1f} max {worst:.1f} ms",
                  flush=True)
    med = statistics.median
    for variant, tail in got.items():
        p99 = [t[1] for t in tail]
        ratio = [t[1] / f[1] for t, f in zip(tail, got["fsync"], strict=True)]
        print(f"{variant:>40} p50 {med([t[0] for t in tail]):7.1f} p99 {med(p99):7.1f} "
              f"max {med([t[2] for t in tail]):7.1f} ms  p99/fsync p99 {med(ratio):5.2f}")
        report(f"bisect: latency p99 {variant} [{pages} pages, {args.latency:g}/s]", med(p99),
               "ms", rounds=p99, per_fsync=ratio, p50=[t[0] for t in tail],
               max=[t[2] for t in tail])


def rounds(args: argparse.Namespace, frame: np.ndarray, url: str, tmp: Path
           ) -> dict[str, list[peers.PeerRun]]:
    """Every variant once a round, the order turned by one each round."""
    client = redis.Redis.from_url(url)
    trees = {c: extract(c.split(",")[0], tmp / "trees") for c in args.commits}
    variants = [*args.commits, *YARDSTICKS]
    runs: dict[str, list[peers.PeerRun]] = {v: [] for v in variants}
    for r in range(args.rounds):
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            out = tmp / f"out-{r}-{variant.replace(' ', '-')}"
            runs[variant].append(one(variant, trees, client, url, frame, out, args.frames))
            shutil.rmtree(out)
            got = runs[variant][-1]
            print(f"round {r + 1} {variant}: {got.rate:.1f}/s {got.cpu_ms:.2f} ms", flush=True)
    return runs


def summarise(commits: list[str], runs: dict[str, list[peers.PeerRun]], pages: str) -> None:
    med = statistics.median
    print(f"{'variant':>14} {'frames/s':>9} {'cpu ms':>7} {'÷dramatiq':>10} {'÷floor':>7} "
          f"{'cpu÷floor':>10}")
    for variant, got in runs.items():
        ratios = {y: [g.rate / f.rate for g, f in zip(got, runs[y], strict=True)]
                  for y in YARDSTICKS}
        cpu = [g.cpu_ms / f.cpu_ms for g, f in zip(got, runs["mapping floor"], strict=True)]
        print(f"{variant:>14} {med([g.rate for g in got]):9.1f} {med([g.cpu_ms for g in got]):7.2f}"
              f" {med(ratios['dramatiq']):10.2f} {med(ratios['mapping floor']):7.2f}"
              f" {med(cpu):10.2f}")
        if variant in commits:
            report(f"bisect: returner {variant} [{pages} pages]", med([g.rate for g in got]),
                   "frames/s", cpu_ms=[g.cpu_ms for g in got], rates=[g.rate for g in got],
                   per_dramatiq=ratios["dramatiq"], per_floor=ratios["mapping floor"],
                   cpu_per_floor=cpu)


if __name__ == "__main__":
    main()
