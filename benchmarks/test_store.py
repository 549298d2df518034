"""What 10 million records in the results store cost the running service, each figure
side by side with the same run's empty store, plus the speed of the one-time import.

SPEC's targets (section Results, "Costs"): with 10M records, start-up to ready within
0.5 s and memory within 32 MiB of an empty store's; disk bytes written per frame at
most 1.5x the JPEG's own size at 20 frames/s, and under 1 MB/s beyond the JPEGs at
lower rates. Throughput at saturation with 10M records is in test_throughput.py, the
commit's own cost in test_commit.py.

- **Start-up and memory.** `python -m returner run` (one worker, METRICS_PORT on a free
  port, the suite's redis-server) on an OUTPUT_DIR whose store is empty, and on one
  with 10M records (`harness.history`: a copy of the store cached in
  `.returner/bench-cache/`). Start-up is process start to the first 200 from /readyz,
  polled every 5 ms; memory is VmRSS (and VmHWM, the peak) from /proc/<pid>/status at
  that moment, and again IDLE_S later, once the first round of upkeep (view, retention,
  sweep) has run. Both stores start STARTS times, alternately, each time with the
  store's pages in the page cache ("warm") and with them dropped first ("cold":
  fsync, then POSIX_FADV_DONTNEED on the store's files; the interpreter and libraries
  stay cached); medians are reported. Each directory has had one start beforehand, so
  none of the timed starts is a first one.
- **Disk writes.** The service on an empty store and on the 10M store, fed real
  1448x1024x3 pages by a producer on a monotonic schedule (put in shared memory, then
  RPUSH; each task a random request id, so its index entry lands anywhere in the
  index), at 20 frames/s for 15 s and at 2 frames/s for 20 s, after a few warm-up
  frames. Written bytes are the service's `write_bytes - cancelled_write_bytes` from
  /proc/<pid>/io between the first push and a moment VIEW_SETTLE_S after the last task
  was acknowledged (so the results.json written after the last commit counts), against
  the total size of the window's JPEGs. "Through exit" adds what it wrote until it
  exited after SIGTERM (the last view, the WAL checkpointed into the store), from its
  rusage: an upper bound where a WAL checkpoint falls outside the window. A thread of
  the benchmark notes each new results.json (its inode changes at every rename), so the
  view's writes per second are reported too.
- **Import.** A seed-format results.json of 1,000,000 records (`json.dumps(list,
  indent=2)`, 1% failed, one id in 50 non-ASCII; built once into the cache) imported
  by the start-up's `upgrade.take_over` in a fresh interpreter; records/s, and its peak RSS.

How /proc/<pid>/io counts, checked on this machine's kernel (and again by
`test_write_accounting` before the disk figures are taken): `write_bytes` is charged
to the process when it dirties a page cache page, not when the page is written back,
so no sync is needed before reading it: 10,000,000 bytes written without fsync showed
as 10,002,432 at once. Unlinking or truncating a file whose pages are still dirty adds
them to `cancelled_write_bytes` (10,002,432 again), so write_bytes - cancelled is what
will reach the disk. Dirtying a page that is already dirty is not charged again (100
rewrites of one page: 4,096), while a page written since (fsync, or writeback after
~30 s) is charged each time it is dirtied again. Every thread of the process is
summed. And on ext4 (auto_da_alloc, the default) renaming a new file over an existing
one starts its writeback at once: 10 files of 230 kB renamed over results.json one
after another were charged 2,338,816 bytes and cancelled 4,096, so every results.json
the service writes reaches the disk even though it is never fsynced. The journal's
writes (metadata) are the kernel's, not the process's, and are not counted; the
device's own counters would include every other process using the disk.

Nothing here asserts a speed or a size; a figure that misses its target is reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from benchmarks import harness
from benchmarks.conftest import Frame, RedisServer, Segments, manga_page, report, wait_until
from returner.store import STORE
from returner.view import RESULTS

pytestmark = pytest.mark.bench

BIG = 10_000_000
MIB = 1024 * 1024
STARTS = 5
IDLE_S = 2.0  # after ready: the upkeep thread's first pass (the view, retention) is done
RATES = {20: 15.0, 2: 20.0}  # frames/s: seconds of the window
WARMUP_FRAMES = 4
VIEW_SETTLE_S = 1.5  # results.json is written at most a second after a commit
IMPORT_RECORDS = 1_000_000


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An OUTPUT_DIR with 10M earlier records, shared by this module's tests (the few
    hundred records and JPEGs a test adds change nothing); removed at the end."""
    directory = tmp_path_factory.mktemp("store") / "big"
    started = time.perf_counter()
    harness.history(directory, BIG)
    report("store.lay_out[10M]", time.perf_counter() - started, "s",
           note="copy and fsync of the cached store (built first if missing)")
    yield directory
    (directory / STORE).unlink()


def drop_cached(directory: Path) -> None:
    """Evict the store's files from the page cache (written back first, or the kernel
    keeps the dirty pages)."""
    for name in (STORE, f"{STORE}-wal", f"{STORE}-shm"):
        try:
            fd = os.open(directory / name, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, every thread, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- start-up and memory --------------------------------------------------------------


def one_start(url: str, queue: str, directory: Path, cold: bool) -> dict[str, float]:
    if cold:
        drop_cached(directory)
    service = harness.Service(url, queue, directory, metrics=True).start()
    try:
        ready_s = service.wait_ready()
        at_ready = service.memory()
        io_ready, cpu_ready = service.io(), cpu_s(service.pid)
        time.sleep(IDLE_S)
        later = service.memory()
        io_later, cpu_later = service.io(), cpu_s(service.pid)
    except BaseException:
        service.kill()
        raise
    service.stop()
    return {"ready_s": ready_s, "rss": at_ready["VmRSS"], "hwm": at_ready["VmHWM"],
            "rss_idle": later["VmRSS"], "hwm_idle": later["VmHWM"],
            "read_bytes_ready": io_ready["read_bytes"],
            "read_bytes_idle": io_later["read_bytes"] - io_ready["read_bytes"],
            "cpu_idle_s": cpu_later - cpu_ready}


@pytest.mark.timeout(900)
def test_startup_and_memory(benchmark: Any, bench_redis: RedisServer, tmp_path: Path,
                            big_store: Path) -> None:
    client, url = bench_redis
    queue = f"bench:start:{uuid.uuid4().hex[:8]}"
    empty = tmp_path / "empty"
    harness.history(empty, 0)
    dirs = {"empty": empty, "10M": big_store}
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}

    def run() -> None:
        for directory in dirs.values():  # the first start of each, untimed
            one_start(url, queue, directory, cold=False)
        for _ in range(STARTS):  # alternately, so that drift hits both alike
            for cache in ("warm", "cold"):
                for name, directory in dirs.items():
                    figures = one_start(url, queue, directory, cold=cache == "cold")
                    runs.setdefault((name, cache), []).append(figures)

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert client.xlen(f"{{{queue}}}:stream") == 0

    def median(name: str, cache: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name, cache])

    for cache in ("warm", "cold"):
        for name in dirs:
            where = f"{name} store, {cache}"
            every = [round(r["ready_s"], 3) for r in runs[name, cache]]
            report(f"store.ready [{where}]", median(name, cache, "ready_s"), "s", starts=every)
            report(f"store.rss_at_ready [{where}]", median(name, cache, "rss") / MIB, "MiB",
                   peak_mib=median(name, cache, "hwm") / MIB)
            report(f"store.rss_idle [{where}]", median(name, cache, "rss_idle") / MIB, "MiB",
                   peak_mib=median(name, cache, "hwm_idle") / MIB, idle_s=IDLE_S)
            report(f"store.read_bytes_until_ready [{where}]",
                   median(name, cache, "read_bytes_ready") / MIB, "MiB",
                   note="from the disk (page cache misses), process start to ready")
            report(f"store.idle_after_ready [{where}]", median(name, cache, "cpu_idle_s"), "s cpu",
                   read_mib=median(name, cache, "read_bytes_idle") / MIB, idle_s=IDLE_S,
                   note="the first upkeep pass, no tasks")
        ready = median("10M", cache, "ready_s") - median("empty", cache, "ready_s")
        rss = (median("10M", cache, "rss") - median("empty", cache, "rss")) / MIB
        hwm = (median("10M", cache, "hwm_idle") - median("empty", cache, "hwm_idle")) / MIB
        report(f"store.ready_delta [10M - empty, {cache}]", ready, "s", target="<= 0.5 s")
        report(f"store.rss_delta [10M - empty, {cache}]", rss, "MiB", target="<= 32 MiB")
        report(f"store.peak_rss_delta_after_idle [10M - empty, {cache}]", hwm, "MiB",
               idle_s=IDLE_S)


# -- disk writes ----------------------------------------------------------------------


def test_write_accounting(benchmark: Any, tmp_path: Path) -> None:
    """The kernel charges write_bytes when a page is dirtied (what the figures below
    rely on): checked on a file of our own, no fsync, read back at once."""
    io_path = Path("/proc/self/io")
    if not io_path.exists():
        pytest.skip("no /proc/<pid>/io (kernel without task I/O accounting)")

    def written() -> tuple[int, int]:
        fields = dict(line.split(": ") for line in io_path.read_text().splitlines())
        return int(fields["write_bytes"]), int(fields["cancelled_write_bytes"])

    marks: list[tuple[int, int]] = []

    def check() -> None:
        marks.append(written())
        (tmp_path / "dirty").write_bytes(b"x" * 10_000_000)
        marks.append(written())
        (tmp_path / "dirty").unlink()
        marks.append(written())

    benchmark.pedantic(check, rounds=1, iterations=1)
    before, dirtied, dropped = marks
    report("store.accounting_written_unsynced", dirtied[0] - before[0], "bytes",
           note="10,000,000 written, no fsync, read at once")
    report("store.accounting_cancelled_at_unlink", dropped[1] - dirtied[1], "bytes")
    assert dirtied[0] - before[0] >= 10_000_000
    assert dropped[1] - dirtied[1] >= 10_000_000


@pytest.fixture(scope="module")
def pages(page_frame: Frame) -> list[Frame]:
    """Four different pages, so that the JPEGs are not all one size."""
    return [page_frame, *(manga_page(seed=seed) for seed in (1, 2, 3))]


class ViewWatcher(threading.Thread):
    """Counts the versions of results.json: each is a new file renamed into place."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.halt, self.count = path, threading.Event(), 0

    def run(self) -> None:
        last = None
        while not self.halt.wait(0.02):
            try:
                inode = os.stat(self.path).st_ino
            except FileNotFoundError:
                continue
            if last is not None and inode != last:
                self.count += 1
            last = inode


def paced(client: redis.Redis, queue: str, segments: Segments, pages: list[Frame],
          rate: float, count: int, prefix: str) -> float:
    """Push `count` frames at `rate` on a monotonic schedule (a late push does not move
    the next one); the seconds the pushes took."""
    start = time.monotonic()
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        segments.push(client, queue, pages[i % len(pages)], uuid.uuid4().hex, f"{prefix}_{i}")
    return time.monotonic() - start


def disk_run(bench_redis: RedisServer, directory: Path, segments: Segments,
             pages: list[Frame], rate: int) -> dict[str, float]:
    client, url = bench_redis
    queue = f"bench:disk:{uuid.uuid4().hex[:8]}"
    service = harness.Service(url, queue, directory, metrics=True).start()
    prefix = f"w{uuid.uuid4().hex[:8]}"
    count = int(rate * RATES[rate])
    try:
        service.wait_ready()
        paced(client, queue, segments, pages, rate, WARMUP_FRAMES, f"{prefix}warm")
        wait_until(lambda: harness.drained(client, queue), 60, "the warm-up frames")
        time.sleep(VIEW_SETTLE_S)
        views = ViewWatcher(directory / RESULTS)
        io0, cpu0 = service.io(), cpu_s(service.pid)
        started = time.monotonic()
        views.start()
        paced(client, queue, segments, pages, rate, count, prefix)
        wait_until(lambda: harness.drained(client, queue), 120, "every frame", 0.02)
        time.sleep(VIEW_SETTLE_S)
        io1, cpu1 = service.io(), cpu_s(service.pid)
        seconds = time.monotonic() - started
        views.halt.set()
        views.join()
    except BaseException:
        service.kill()
        print(service.log_tail())
        raise
    usage = service.stop()
    jpegs = list(directory.glob(f"{prefix}_*.jpg"))
    assert len(jpegs) == count, f"{len(jpegs)} JPEGs for {count} frames"
    assert segments.cleanup() == 0, "the service left segments behind"
    net0 = io0["write_bytes"] - io0["cancelled_write_bytes"]
    net1 = io1["write_bytes"] - io1["cancelled_write_bytes"]
    return {"frames": count, "seconds": seconds, "written": net1 - net0,
            "through_exit": usage.ru_oublock * 512 - net0,
            "jpeg_bytes": sum(p.stat().st_size for p in jpegs),
            "cpu_s": cpu1 - cpu0, "views": views.count,
            "view_bytes": os.path.getsize(directory / RESULTS)}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("rate", list(RATES))
def test_disk_writes(benchmark: Any, bench_redis: RedisServer, tmp_path: Path,
                     big_store: Path, segments: Segments, pages: list[Frame],
                     rate: int) -> None:
    empty = tmp_path / "empty"
    harness.history(empty, 0)
    dirs = {"empty": empty, "10M": big_store}
    runs: dict[str, dict[str, float]] = {}

    def run() -> None:
        for name, directory in dirs.items():
            runs[name] = disk_run(bench_redis, directory, segments, pages, rate)

    benchmark.pedantic(run, rounds=1, iterations=1)
    for name, got in runs.items():
        where = f"{name} store, {rate} frames/s"
        frames = got["frames"]
        jpeg = got["jpeg_bytes"] / frames
        per_frame = got["written"] / frames
        beyond = (got["written"] - got["jpeg_bytes"]) / got["seconds"]
        common = {"frames": frames, "window_s": round(got["seconds"], 2),
                  "mean_jpeg_bytes": round(jpeg)}
        report(f"store.written_per_frame/jpeg [{where}]", per_frame / jpeg, "x",
               target="<= 1.5x at 20 frames/s", written_per_frame=round(per_frame), **common)
        report(f"store.written_beyond_jpegs [{where}]", beyond / 1e6, "MB/s",
               target="< 1 MB/s below 20 frames/s", **common)
        report(f"store.written_through_exit_per_frame/jpeg [{where}]",
               got["through_exit"] / frames / jpeg, "x",
               note="the window plus everything until exit (last view, WAL checkpoint)")
        report(f"store.cpu_per_frame [{where}]", got["cpu_s"] / frames * 1000, "ms",
               note="the service's user+system CPU over the window")
        report(f"store.view_writes [{where}]", got["views"] / got["seconds"], "per s",
               note="results.json replaced (a new inode), seen every 20 ms",
               view_bytes=got["view_bytes"])
    base, big = runs["empty"], runs["10M"]
    report(f"store.written_per_frame 10M/empty [{rate} frames/s]",
           (big["written"] / big["frames"]) / (base["written"] / base["frames"]), "x")


# -- import ---------------------------------------------------------------------------


def legacy_json(count: int) -> Path:
    """A results.json of `count` records as the seed writes it (`json.dumps(entries,
    indent=2)`, local time with its offset), 1% failed, one id in 50 non-ASCII (which
    json.dumps escapes as \\uXXXX, as the seed's file has them); cached."""
    path = harness.CACHE / f"legacy-results-g{harness.GENERATION}-{count}.json"
    if path.exists():
        return path
    names = ("ページ", "страница", "página", "頁")
    entries = []
    for i in range(count):
        image_id = f"{names[i // 50 % 4]}_{i}" if i % 50 == 0 else f"page_{i}"
        entry: dict[str, Any] = {
            "timestamp": f"2025-12-{1 + i // 100_000 % 28:02d}T10:{i // 60 % 60:02d}:"
                         f"{i % 60:02d}.{i % 1_000_000:06d}+09:00",
            "request_id": f"req_{i // 8}",
            "image_id": image_id,
            "file_path": f"/srv/frames/{image_id}_20251201_100000.jpg",
            "status": "completed",
        }
        if i % 100 == 99:
            entry.update(file_path=None, status="failed", error="shared memory not found")
        entries.append(entry)
    harness.CACHE.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(f".{os.getpid()}.tmp")
    temp.write_text(json.dumps(entries, indent=2))
    os.replace(temp, path)
    return path


# Run in a fresh interpreter, so that its peak RSS is the import's alone.
_IMPORT = """
import json, sys, time
from pathlib import Path
from returner import upgrade
from returner.commit import Committer
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
before = peak()
results = Committer.at(Path(sys.argv[1]))
started = time.perf_counter()
upgrade.take_over(results.out, results.store)
results.open()
seconds = time.perf_counter() - started
total = results.store.counts()["total"]
results.close()
print(json.dumps({"seconds": seconds, "records": total, "peak": peak(), "before": before}))
"""


@pytest.mark.timeout(600)
def test_import(benchmark: Any, tmp_path: Path) -> None:
    source = legacy_json(IMPORT_RECORDS)
    directory = tmp_path / "legacy"
    directory.mkdir()
    try:  # the import renames results.json to an archive and only reads it
        os.link(source, directory / RESULTS)
    except OSError:
        subprocess.run(["cp", str(source), str(directory / RESULTS)], check=True)
    harness.fsync_file(directory / RESULTS)
    got: dict[str, Any] = {}

    def run() -> None:
        done = subprocess.run([sys.executable, "-c", _IMPORT, str(directory)], check=True,
                              capture_output=True, text=True, cwd=tmp_path)
        got.update(json.loads(done.stdout.splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert got["records"] == IMPORT_RECORDS
    archives = list(directory.glob("results.*.json"))
    assert len(archives) == 1 and archives[0].stat().st_size == source.stat().st_size
    view = json.loads((directory / RESULTS).read_bytes())
    assert len(view) == 1000 and view[-1]["image_id"] == f"page_{IMPORT_RECORDS - 1}"
    report("store.import_rate", got["records"] / got["seconds"], "records/s",
           target=">= 100,000/s", records=got["records"], seconds=round(got["seconds"], 2),
           file_mib=round(source.stat().st_size / MIB, 1))
    report("store.import_peak_rss", got["peak"] / MIB, "MiB",
           note="the importing process's VmHWM", before_mib=round(got["before"] / MIB, 1))
