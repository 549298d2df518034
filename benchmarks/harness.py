"""What the end-to-end benchmarks share: frames in shared memory, earlier results laid
into the store, the service as a subprocess (its readiness, memory and disk writes from
/proc), results read back from the store, /dev/shm page size, and the seed module's
design."""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import redis

from returner import frames
from returner.encode import JpegOptions, encode
from returner.files import write_file
from returner.producer import put_segment, task_message
from returner.store import STORE, Store
from returner.task import Task
from tests.conftest import wait_for

SHAPE = (1448, 1024, 3)

# -- earlier results ------------------------------------------------------------------

# Stores of a million records and more are built once and kept here (gitignored), one
# file per record count; a benchmark works on a copy, since the service writes to it.
CACHE = Path(__file__).resolve().parent.parent / ".returner" / "bench-cache"
CACHE_FROM = 1_000_000
GENERATION = 2  # bump when the stores built below change: older caches are ignored
HISTORY_DIR = "/srv/returner/output"  # where the earlier records say their JPEGs are
SPACING_S = 0.02  # the history runs at 50 records a second and ends when it is built
# A cached history older than this is built again, so that RESULTS_RETENTION_DAYS (30
# by default) never starts deleting it under a benchmark.
CACHE_MAX_AGE = timedelta(days=20)

# One statement makes every row (a recursive CTE: no Python per row), with SPEC's
# fields as the service writes them: fixed-width ISO timestamps with an offset, eight
# images per request, 1% failed with an error, the stream entry ID from the time.
_GENERATE = """
WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < :count)
INSERT INTO records (timestamp, request_id, image_id, file_path, status, error, entry_id)
SELECT strftime('%Y-%m-%dT%H:%M:%f', t, 'unixepoch') || '000+00:00',
       'req_' || (i / 8),
       'page_' || i,
       CASE WHEN i % 100 = 99 THEN NULL
            ELSE :dir || '/page_' || i || strftime('_%Y%m%d_%H%M%S.jpg', t, 'unixepoch') END,
       CASE WHEN i % 100 = 99 THEN 'failed' ELSE 'completed' END,
       CASE WHEN i % 100 = 99
            THEN 'shared memory segment ''img_shm_' || printf('%x', i) || ''' does not exist' END,
       CAST(t * 1000 AS INTEGER) || '-0'
FROM (SELECT i, :start + i * :spacing AS t FROM seq)
"""


def build_store(directory: Path, count: int) -> None:
    """Make `directory` an OUTPUT_DIR whose store holds `count` earlier records, as an
    upgrade leaves it.

    The rows go in without a journal (a build that fails is simply built again), and
    `Tx.mark_imported` then makes the index after them, as an import does, and
    marks the store imported, so the start-up takes it as it is. 10 million
    records take about 30 s.
    """
    directory.mkdir(parents=True, exist_ok=True)
    store = Store(directory)
    try:
        db = store.db
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("BEGIN")
        db.execute(_GENERATE, {"count": count, "dir": HISTORY_DIR, "spacing": SPACING_S,
                               "start": time.time() - count * SPACING_S})
        db.execute("COMMIT")
        with store.transaction("marking the history imported") as tx:
            tx.mark_imported()  # the index, the mark, as an import leaves them
        db.execute("PRAGMA journal_mode = WAL")
    finally:
        store.close()
    fsync_file(directory / STORE)


def fsync_file(path: Path) -> None:
    """Flush a file written without fsync now, so that its writeback does not reach the
    disk in the middle of the measurement that follows."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _still_good(path: Path) -> bool:
    """Whether a cached store exists and its oldest record is recent enough."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT timestamp FROM records ORDER BY id LIMIT 1").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return False
    return row is not None and datetime.now(UTC) - datetime.fromisoformat(row[0]) < CACHE_MAX_AGE


def cached_store(count: int) -> Path:
    """The cache's store of `count` records, built first if missing or too old."""
    path = CACHE / f"store-g{GENERATION}-{count}.db"
    if not _still_good(path):
        building = CACHE / f".building-{count}-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        started = time.perf_counter()
        build_store(building, count)
        os.replace(building / STORE, path)
        shutil.rmtree(building)
        print(f"[bench] built {path} in {time.perf_counter() - started:.1f}s", flush=True)
    return path


def history(directory: Path, count: int) -> None:
    """Make `directory` an OUTPUT_DIR whose store holds `count` earlier records: built
    in place, or from CACHE_FROM records on a copy of the cached store (fsynced before
    it is used; about 1.7 GB at 10 million)."""
    if count < CACHE_FROM:
        build_store(directory, count)
        return
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached_store(count), directory / STORE)
    os.chmod(directory / STORE, 0o600)
    fsync_file(directory / STORE)


def stored(output_dir: Path, request_id: str) -> list[dict[str, Any]]:
    """The records of a request in the store of `output_dir`, oldest first."""
    store = Store(output_dir, create=False)
    try:
        return store.get(request_id)
    finally:
        store.close()


def legacy_results(path: Path, count: int) -> None:
    """A results.json of `count` earlier entries as the seed module writes it, for its
    own design (which reads and rewrites it for every frame)."""
    entries = [{"timestamp": "2026-01-01T00:00:00+00:00", "request_id": "old",
                "image_id": f"old_{i}", "file_path": None, "status": "failed", "error": "x"}
               for i in range(count)]
    path.write_text(json.dumps(entries, indent=2))


# -- frames ---------------------------------------------------------------------------


def push_frames(client: redis.Redis, queue: str, frame: np.ndarray, count: int,
                prefix: str = "img") -> list[str]:
    """Put `count` copies of `frame` in shared memory and push their tasks."""
    names = []
    for i in range(count):
        name = put_segment(frame)
        names.append(name)
        client.rpush(queue, task_message(name, frame.shape, "bench", f"{prefix}_{i}"))
    return names


def release(names: list[str]) -> None:
    for name in names:
        frames.unlink(name)


def drained(client: redis.Redis, queue: str) -> bool:
    """Every task of `queue` has been acknowledged, so its result is durable: the list
    is empty and the stream, trimmed on ack, holds nothing. Two cheap Redis calls, so
    that polling does not take the CPU the service is measured on."""
    return client.llen(queue) == 0 and client.xlen(f"{{{queue}}}:stream") == 0


def completion_times(output_dir: Path, request_id: str = "bench") -> list[float]:
    """Commit times (epoch seconds) of the request's completed records, from the store
    (results.json holds only the latest RESULTS_JSON_ENTRIES)."""
    return sorted(datetime.fromisoformat(r["timestamp"]).timestamp()
                  for r in stored(output_dir, request_id) if r["status"] == "completed")


def rate(times: list[float]) -> float:
    """Frames per second between the first and the last completion (no start-up)."""
    return (len(times) - 1) / (times[-1] - times[0])


# -- the service ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """`returner run` as a subprocess, in a directory of its own (no .env from the work
    tree), logging to a file next to OUTPUT_DIR. With `metrics`, /readyz on a free port
    tells when it is ready; `io()` and `memory()` read /proc while it runs, and `stop()`
    returns its resource usage, taken when it is reaped."""

    def __init__(self, url: str, queue: str, output_dir: Path, metrics: bool = False,
                 **settings: str) -> None:
        self.port = free_port() if metrics else 0
        self.env = dict(os.environ, REDIS_URL=url, HOSTING_TASKS_QUEUE=queue,
                        OUTPUT_DIR=str(output_dir), METRICS_HOST="127.0.0.1",
                        METRICS_PORT=str(self.port), LOG_LEVEL="WARNING",
                        CONSUMER_NAME=f"bench-{uuid.uuid4().hex[:6]}")
        self.env.update(settings)
        self.cwd = output_dir.parent
        self.log = self.cwd / f"service-{queue.replace(':', '_')}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.usage: Any = None  # its rusage, once stopped

    def start(self) -> Service:
        with open(self.log, "ab") as sink:
            self.started = time.perf_counter()
            self.proc = subprocess.Popen([sys.executable, "-m", "returner", "run"],
                                         env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                         stdout=sink, stderr=sink)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Seconds from process start to the first 200 from /readyz (polled every 5 ms)."""
        assert self.port, "made without metrics"
        url = f"http://127.0.0.1:{self.port}/readyz"
        deadline = self.started + timeout_s
        while True:
            # A 503 (not ready yet) raises HTTPError, a URLError; refused: not listening yet.
            with contextlib.suppress(urllib.error.URLError, OSError), \
                    urllib.request.urlopen(url, timeout=1.0) as answer:
                if answer.status == 200:
                    return time.perf_counter() - self.started
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"returner run exited: {self.log_tail()}")
            if time.perf_counter() > deadline:
                raise AssertionError(f"not ready after {timeout_s}s: {self.log_tail()}")
            time.sleep(0.005)

    def io(self) -> dict[str, int]:
        """/proc/<pid>/io: every thread's, summed by the kernel."""
        lines = Path(f"/proc/{self.pid}/io").read_text().splitlines()
        return {key: int(value) for key, value in (line.split(": ") for line in lines)}

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) from /proc/<pid>/status, in bytes."""
        found = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
        return found

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self, timeout_s: float = 30.0) -> Any:
        """SIGTERM; fails unless it exits 0 in time. Its rusage, kept as `usage` too
        (its own and its reaped children's; ru_oublock counts what it wrote up to its
        exit, in 512-byte units, from the same counters as io())."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"no exit {timeout_s}s after SIGTERM: {self.log_tail()}")
            time.sleep(0.01)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.usage = usage
        assert self.proc.returncode == 0, self.log_tail()
        return usage

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def service(url: str, queue: str, output_dir: Path, **settings: str) -> Iterator[Service]:
    """`returner run` as a subprocess (no metrics), stopped with SIGTERM at the end."""
    running = Service(url, queue, output_dir, **settings).start()
    try:
        yield running
    except BaseException:
        running.kill()
        raise
    running.stop()


class ServiceRun(NamedTuple):
    rate: float  # frames/s between the first and the last commit
    cpu_ms: float  # the service's CPU (user + system, start-up included) per frame


def service_run(client: redis.Redis, url: str, tmp: Path, frame: np.ndarray, count: int,
                earlier: int = 0, **settings: str) -> ServiceRun:
    """Push `count` frames, then run the service over them: its frames/s (no start-up)
    and its CPU per frame (from its rusage: less disturbed than the rate when the
    machine is shared, and the same start-up in every case)."""
    queue = f"bench:{uuid.uuid4().hex[:8]}"
    out = tmp / queue.replace(":", "_")
    history(out, earlier)
    names = push_frames(client, queue, frame, count)
    try:
        with service(url, queue, out, **settings) as running:
            wait_for(lambda: drained(client, queue), timeout=300, interval=0.05,
                     what="every frame")
        times = completion_times(out)
        assert len(times) == count, "some frames were not completed"
        cpu_s = running.usage.ru_utime + running.usage.ru_stime
        return ServiceRun(rate(times), cpu_s / count * 1000)
    finally:
        release(names)
        if earlier >= CACHE_FROM:  # gigabytes: not left for the end of the session
            (out / STORE).unlink()


def service_rate(client: redis.Redis, url: str, tmp: Path, frame: np.ndarray, count: int,
                 earlier: int = 0, **settings: str) -> float:
    """The service's frames/s over `count` frames pushed before it starts (no start-up)."""
    return service_run(client, url, tmp, frame, count, earlier, **settings).rate


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
    own_cpu_ms: float = math.nan  # this process's own CPU per frame (its rusage)

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
        busy, own, started = busy_seconds(), own_seconds(), time.perf_counter()
        list(pool.map(work, range(count)))
        wall, cpu = time.perf_counter() - started, busy_seconds() - busy
        own = own_seconds() - own
    return Measured(count / wall, cpu / count * 1000, own / count * 1000)


def own_seconds() -> float:
    """CPU time (user + system) this process has spent, every thread of it: unlike
    busy_seconds, what other work on a shared machine does not count in."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stripped_loop(frame: np.ndarray, count: int, output_dir: Path | None = None) -> Measured:
    """The least any design must do per frame, one thread per core, no Redis and no
    results: map the segment, encode from it, unmap, unlink. With `output_dir`, each JPEG
    is also written to a temp file, fsynced and renamed, in line. The service's own
    primitives do each step; the segments are made beforehand, untimed."""
    names = [put_segment(frame) for _ in range(count)]
    height, width, channels = frame.shape

    def one(i: int) -> None:
        task = Task("bench", f"img_{i}", names[i], height, width, channels, "RGB")
        data = frames.with_frame(task, lambda view: encode(view, "RGB", JpegOptions()))
        if output_dir is not None:
            temp = output_dir / f".{i}.tmp"
            write_file(temp, data)  # create, write, fsync: as the service writes a JPEG
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
