"""The peers: the job workers a user would pick instead of the returner, running the
returner's job, and how to run each, for `test_peers.py`.

The job (`save_frame`) is the same for every peer: map the frame's shared-memory
segment, encode it with simplejpeg (q80, 4:2:0), write the JPEG to a temp file, fsync
it, rename it to its final name, and unlink the segment. A peer keeps no result and
emits no event; the returner also records every outcome in its store and emits an
event. Each runs as its users would run it:

- Dramatiq 2.x with its Redis broker at its defaults: the `dramatiq` CLI with its
  default processes (one per core) and threads (8 a process) and default middleware.
- RQ, RQ_PROCESSES processes of `SimpleWorker` (jobs run in the worker process) or of
  the forking `Worker` (a work horse forked per job), each started by
  `python -m benchmarks.peers rq-simple|rq-fork` with the job's module imported first,
  as RQ's docs advise for the forking worker; jobs are enqueued with result_ttl=0 (no
  result kept) and the workers log at WARNING, as the returner does here.
- the returner: `returner run` (LOG_LEVEL=WARNING, no metrics server), run by
  BENCH_RETURNER_PYTHON (default: this interpreter), so that another checkout's venv
  can be measured with the same yardstick.

`run_peer` makes the segments, starts the processes, waits until they are ready,
pushes every task at once and waits until every JPEG has its final name. The rate is
taken from the push to the last rename (the JPEGs' ctime), start-up excluded; the CPU
is the processes' own (user + system, their children included) over the same window:
their rusage at exit minus what /proc said they had spent when they were ready.
"""

from __future__ import annotations

import _posixshmem
import argparse
import contextlib
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import psutil
import redis
import simplejpeg

from returner.producer import put_segment, task_message
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
QUALITY, SUBSAMPLING = 80, "420"
# How a worker process of a peer finds its broker and queue.
ENV_URL, ENV_QUEUE = "PEERS_REDIS_URL", "PEERS_QUEUE"
RETURNER_PYTHON = os.environ.get("BENCH_RETURNER_PYTHON", sys.executable)
RQ_PROCESSES = 2
FLOOR_THREADS = 2
READY_TIMEOUT_S, DONE_TIMEOUT_S, STOP_TIMEOUT_S = 60.0, 300.0, 60.0
POLL_S = 0.02  # a scan of OUTPUT_DIR (a few hundred names) costs ~0.1 ms


def save_frame(shm_name: str, shape: Sequence[int], image_id: str, output_dir: str) -> None:
    """The peers' job: map the segment, encode it, write + fsync + rename the JPEG,
    unlink the segment."""
    size = int(np.prod(shape))
    fd = _posixshmem.shm_open("/" + shm_name, os.O_RDONLY, 0)
    try:
        mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    with mapping:
        frame = np.frombuffer(mapping, np.uint8, size).reshape(shape)
        data = simplejpeg.encode_jpeg(frame, QUALITY, "RGB", SUBSAMPLING)
        del frame  # every view of the mapping must be gone before it closes
    temp = os.path.join(output_dir, f".{image_id}.tmp")
    out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(out, view) :]
        os.fsync(out)
    finally:
        os.close(out)
    os.rename(temp, os.path.join(output_dir, f"{image_id}.jpg"))
    _posixshmem.shm_unlink("/" + shm_name)


# -- Dramatiq -------------------------------------------------------------------------


def dramatiq_actor(url: str, queue: str) -> Any:
    """A Redis broker at its defaults, made the global one, with the job declared on
    `queue`; the actor."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=url)
    dramatiq.set_broker(broker)
    return dramatiq.actor(save_frame, actor_name="save_frame", queue_name=queue, broker=broker)


def dramatiq_setup() -> None:
    """What the `dramatiq` CLI calls in each worker process
    (`dramatiq benchmarks.peers:dramatiq_setup`): the broker and the job, from the
    environment."""
    dramatiq_actor(os.environ[ENV_URL], os.environ[ENV_QUEUE])


# -- RQ -------------------------------------------------------------------------------


def rq_work(simple: bool) -> None:
    """One RQ worker on the queue named in the environment, until SIGTERM."""
    from rq import Queue, SimpleWorker, Worker

    connection = redis.Redis.from_url(os.environ[ENV_URL])
    kind = SimpleWorker if simple else Worker
    worker = kind([Queue(os.environ[ENV_QUEUE], connection=connection)], connection=connection)
    worker.work(logging_level="WARNING")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers")
    parser.add_argument("worker", choices=["rq-simple", "rq-fork"])
    rq_work(parser.parse_args().worker == "rq-simple")


# -- running one ----------------------------------------------------------------------

Tasks = list[tuple[str, str]]  # (segment name, image id)


@dataclass
class Peer:
    """How to run a peer: its processes, when they are ready, how to hand it tasks, and
    what must hold beyond the JPEGs before it is stopped."""

    name: str
    commands: list[list[str]]
    env: dict[str, str]
    cwd: Path
    ready: Callable[[], bool]
    push: Callable[[Tasks], None]
    done: Callable[[], bool] = lambda: True


def returner(client: redis.Redis, url: str, queue: str, out: Path, shape: Sequence[int]) -> Peer:
    env = dict(os.environ, REDIS_URL=url, HOSTING_TASKS_QUEUE=queue, OUTPUT_DIR=str(out),
               METRICS_PORT="0", LOG_LEVEL="WARNING", CONSUMER_NAME=f"bench-{uuid.uuid4().hex[:6]}")

    def push(tasks: Tasks) -> None:
        client.rpush(queue, *(task_message(name, shape, "bench", iid) for name, iid in tasks))

    def drained() -> bool:  # every task acknowledged: its event emitted, its entry gone
        return client.llen(queue) == 0 and client.xlen(f"{{{queue}}}:stream") == 0

    return Peer("returner", [[RETURNER_PYTHON, "-m", "returner", "run"]], env, out.parent,
                # the stream and group are made once the results store is open
                lambda: bool(client.exists(f"{{{queue}}}:stream")), push, drained)


def dramatiq_peer(client: redis.Redis, url: str, queue: str, out: Path, shape: Sequence[int]
                  ) -> Peer:
    env = dict(os.environ, **{ENV_URL: url, ENV_QUEUE: queue})
    log = out.parent / f"dramatiq-{queue}.log"
    actor = dramatiq_actor(url, queue)
    processes = os.cpu_count() or 1  # the CLI's default

    def ready() -> bool:
        return log.exists() and log.read_text().count("ready for action") == processes

    def push(tasks: Tasks) -> None:
        for name, iid in tasks:
            actor.send(name, list(shape), iid, str(out))

    command = [sys.executable, "-m", "dramatiq", "benchmarks.peers:dramatiq_setup",
               "--path", str(ROOT), "--log-file", str(log)]
    return Peer("dramatiq", [command], env, ROOT, ready, push)


def rq_peer(client: redis.Redis, url: str, queue: str, out: Path, shape: Sequence[int],
            simple: bool) -> Peer:
    from rq import Queue, Worker

    env = dict(os.environ, **{ENV_URL: url, ENV_QUEUE: queue})
    rq_queue = Queue(queue, connection=client)

    def ready() -> bool:
        return Worker.count(connection=client, queue=rq_queue) == RQ_PROCESSES

    def push(tasks: Tasks) -> None:
        jobs = [Queue.prepare_data(save_frame, args=(name, list(shape), iid, str(out)),
                                   result_ttl=0) for name, iid in tasks]
        with client.pipeline() as pipe:
            rq_queue.enqueue_many(jobs, pipeline=pipe)
            pipe.execute()

    kind = "rq-simple" if simple else "rq-fork"
    command = [sys.executable, "-m", "benchmarks.peers", kind]
    return Peer(kind.replace("-", " "), [command] * RQ_PROCESSES, env, ROOT, ready, push)


class PeerRun(NamedTuple):
    rate: float  # frames/s from the push to the last JPEG's rename
    cpu_ms: float  # the peer's processes' CPU per frame over that window (children too)
    redis_cpu_ms: float  # the Redis server's CPU per frame over the window and the stop


def tree_seconds(pids: Sequence[int]) -> float:
    """CPU spent so far by these processes and every descendant (their reaped children
    included), from /proc."""
    total = 0.0
    for pid in pids:
        root = psutil.Process(pid)
        for process in (root, *root.children(recursive=True)):
            with contextlib.suppress(psutil.NoSuchProcess):
                t = process.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


def redis_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def jpegs(out: Path) -> list[os.DirEntry[str]]:
    return [e for e in os.scandir(out) if e.name.endswith(".jpg")]


def stop(procs: list[subprocess.Popen[bytes]]) -> float:
    """SIGTERM every process, reap each: their CPU seconds (children included)."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    total, deadline = 0.0, time.monotonic() + STOP_TIMEOUT_S
    for proc in procs:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{proc.args} did not stop {STOP_TIMEOUT_S}s after SIGTERM")
            time.sleep(0.01)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}"
        total += usage.ru_utime + usage.ru_stime
    return total


def run_peer(peer: Peer, client: redis.Redis, names: list[str], out: Path) -> PeerRun:
    """Run `peer` over the frames in `names` (made already; the job unlinks them)."""
    count = len(names)
    tasks = [(name, f"img_{i}") for i, name in enumerate(names)]
    log = out.parent / f"{peer.name.replace(' ', '-')}-{out.name}.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(log, "ab") as sink:
            procs = [subprocess.Popen(command, env=peer.env, cwd=peer.cwd, stdin=subprocess.DEVNULL,
                                      stdout=sink, stderr=sink) for command in peer.commands]
        wait_for(peer.ready, timeout=READY_TIMEOUT_S, interval=POLL_S, what=f"{peer.name} ready")
        before, redis_before = tree_seconds([p.pid for p in procs]), redis_seconds(client)
        started = time.time()  # the JPEGs' ctime is on the same clock
        peer.push(tasks)
        wait_for(lambda: len(jpegs(out)) >= count, timeout=DONE_TIMEOUT_S, interval=POLL_S,
                 what=f"{count} JPEGs from {peer.name}")
        wait_for(peer.done, timeout=DONE_TIMEOUT_S, interval=POLL_S, what=f"{peer.name} done")
        last = max(e.stat().st_ctime for e in jpegs(out))
        cpu = stop(procs) - before
        redis_cpu = redis_seconds(client) - redis_before
        return PeerRun(count / (last - started), cpu / count * 1000, redis_cpu / count * 1000)
    except BaseException:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        print(f"[bench] {peer.name} failed; its log ends: {log.read_text()[-2000:]}")
        raise


def prepare(frame: np.ndarray, count: int, out: Path) -> list[str]:
    """An empty OUTPUT_DIR and `count` segments holding the frame, as a renderer leaves them."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return [put_segment(frame) for _ in range(count)]


if __name__ == "__main__":
    main()
