"""What the end-to-end benchmarks share: frames in shared memory, the service as a
subprocess, results.json read back, /dev/shm page size, and the seed module's design."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import redis

from returner import frames
from returner.demo import put_frame, task_message
from returner.encode import JpegOptions, encode
from returner.output import write_durably
from returner.task import Task
from tests.conftest import wait_for

SHAPE = (1448, 1024, 3)


def history(path: Path, count: int) -> None:
    """A results.json of `count` earlier entries, as the service writes it."""
    line = json.dumps({"timestamp": "2026-01-01T00:00:00+00:00", "request_id": "old",
                       "image_id": "{}", "file_path": None, "status": "failed", "error": "x"})
    body = ",\n".join(line.replace('"{}"', f'"old_{i}"') for i in range(count))
    path.write_text(f"[\n{body}\n]\n" if count else "[]\n")


def push_frames(client: redis.Redis, queue: str, frame: np.ndarray, count: int,
                prefix: str = "img") -> list[str]:
    """Put `count` copies of `frame` in shared memory and push their tasks."""
    names = []
    for i in range(count):
        name = put_frame(frame)
        names.append(name)
        client.rpush(queue, task_message(name, frame.shape, "bench", f"{prefix}_{i}"))
    return names


def release(names: list[str]) -> None:
    for name in names:
        frames.unlink(name)


def drained(client: redis.Redis, queue: str) -> bool:
    """Every task of `queue` has been acknowledged, so its result is durable: the list
    is empty and the stream, trimmed on ack, holds nothing. Two cheap Redis calls, so
    that polling does not take the CPU the service is measured on (reading a 3 MB
    results.json every 50 ms takes a few percent of a core)."""
    return client.llen(queue) == 0 and client.xlen(f"{{{queue}}}:stream") == 0


def completion_times(output_dir: Path) -> list[float]:
    """Commit times (epoch seconds) of the completed entries in results.json."""
    try:
        entries = json.loads((output_dir / "results.json").read_bytes())
    except (OSError, ValueError):
        return []
    return sorted(datetime.fromisoformat(e["timestamp"]).timestamp()
                  for e in entries if e["status"] == "completed" and e["request_id"] == "bench")


def rate(times: list[float]) -> float:
    """Frames per second between the first and the last completion (no start-up)."""
    return (len(times) - 1) / (times[-1] - times[0])


@contextlib.contextmanager
def service(url: str, queue: str, output_dir: Path, **settings: str) -> Iterator[Path]:
    """`returner run` as a subprocess; yields its log file. Stopped with SIGTERM."""
    env = dict(os.environ, REDIS_URL=url, HOSTING_TASKS_QUEUE=queue, OUTPUT_DIR=str(output_dir),
               METRICS_PORT="0", LOG_LEVEL="WARNING", CONSUMER_NAME=f"bench-{uuid.uuid4().hex[:6]}")
    env.update(settings)
    log = output_dir.parent / f"service-{queue.replace(':', '_')}.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "returner", "run"], env=env,
                                stdout=sink, stderr=sink)
    try:
        yield log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert code == 0, log.read_text()[-3000:]


def service_rate(client: redis.Redis, url: str, tmp: Path, frame: np.ndarray, count: int,
                 earlier: int = 0, **settings: str) -> float:
    """Push `count` frames, then run the service over them: its frames/s (no start-up)."""
    queue = f"bench:{uuid.uuid4().hex[:8]}"
    out = tmp / queue.replace(":", "_")
    out.mkdir(parents=True)
    history(out / "results.json", earlier)
    names = push_frames(client, queue, frame, count)
    try:
        with service(url, queue, out, **settings):
            wait_for(lambda: drained(client, queue), timeout=300, interval=0.05,
                     what="every frame")
        times = completion_times(out)
        assert len(times) == count, "some frames were not completed"
        return rate(times)
    finally:
        release(names)


@contextlib.contextmanager
def shm_pages(mode: str) -> Iterator[None]:
    """Run with /dev/shm on 4 KiB pages ("4k") or huge pages ("huge", needs root).

    Huge pages make mapping a frame and freeing it at unlink far cheaper; see the
    README. The mount option is put back afterwards.
    """
    if mode == "4k":
        yield
        return
    if os.geteuid() != 0:
        import pytest

        pytest.skip("remounting /dev/shm with huge pages needs root")
    before = _shm_huge_option()
    subprocess.run(["mount", "-o", "remount,huge=within_size", "/dev/shm"], check=True)
    try:
        yield
    finally:
        subprocess.run(["mount", "-o", f"remount,huge={before}", "/dev/shm"], check=True)


def _shm_huge_option() -> str:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == "/dev/shm":
            for option in fields[3].split(","):
                if option.startswith("huge="):
                    return option.split("=", 1)[1]
    return "never"


class Measured(NamedTuple):
    rate: float  # frames/s
    cpu_ms: float  # CPU of the whole machine per frame (kernel threads and interrupts too)

    @property
    def cpu_bound(self) -> float:
        """Frames/s with every core busy on this work: nothing left waiting on a disk."""
        return len(os.sched_getaffinity(0)) * 1000 / self.cpu_ms


def busy_seconds() -> float:
    """CPU time this machine has spent working, from /proc/stat: user, nice, system, irq
    and softirq (not idle, iowait, or time stolen by the hypervisor)."""
    user, nice, system, _idle, _iowait, irq, softirq = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    )
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def measure(work: Callable[[int], object], count: int, threads: int) -> Measured:
    """Run `work(0..count-1)` on `threads` threads: its rate and machine CPU per frame."""
    with ThreadPoolExecutor(threads) as pool:
        busy, started = busy_seconds(), time.perf_counter()
        list(pool.map(work, range(count)))
        wall, cpu = time.perf_counter() - started, busy_seconds() - busy
    return Measured(count / wall, cpu / count * 1000)


def stripped_loop(frame: np.ndarray, count: int, output_dir: Path | None = None) -> Measured:
    """The least any design must do per frame, one thread per core, no Redis and no
    results: map the segment, encode from it, unmap, unlink. With `output_dir`, each JPEG
    is also written to a temp file, fsynced and renamed, in line. The service's own
    primitives do each step; the segments are made beforehand, untimed."""
    names = [put_frame(frame) for _ in range(count)]
    height, width, channels = frame.shape

    def one(i: int) -> None:
        task = Task("bench", f"img_{i}", names[i], height, width, channels, "RGB")
        data = frames.with_frame(task, lambda view: encode(view, "RGB", JpegOptions()))
        if output_dir is not None:
            temp = output_dir / f".{i}.tmp"
            write_durably(temp, data)
            os.rename(temp, output_dir / f"{i}.jpg")
        frames.unlink(names[i])

    try:
        return measure(one, count, os.cpu_count() or 1)
    finally:
        release(names)  # only those a failure left behind are still there


def original_design(client: redis.Redis, queue: str, output_dir: Path, count: int) -> None:
    """The seed module's loop: BLPOP one task, copy the frame out of shared memory,
    OpenCV RGB->BGR and imwrite, then load, append and rewrite results.json."""
    from multiprocessing.shared_memory import SharedMemory

    import cv2

    results = output_dir / "results.json"
    for _ in range(count):
        _, raw = client.blpop([queue], timeout=5)  # type: ignore[misc]
        task = json.loads(raw)
        info = task["shm_info"]
        shm = SharedMemory(name=info["shm_name"])
        image = np.ndarray(info["shape"], dtype=np.uint8, buffer=shm.buf).copy()
        shm.close()
        shm.unlink()
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
        path = output_dir / f"{task['image_id']}_{stamp}.jpg"
        cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, 80])
        entries = json.loads(results.read_text()) if results.exists() else []
        entries.append({"timestamp": datetime.now().astimezone().isoformat(),
                        "request_id": task["request_id"], "image_id": task["image_id"],
                        "file_path": str(path), "status": "completed"})
        results.write_text(json.dumps(entries, indent=2))
