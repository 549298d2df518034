"""JPEG encoding of one 1448x1024 frame: simplejpeg straight from shared memory, per
channel order, against the original OpenCV path (RGB -> cvtColor -> imencode).

simplejpeg is timed the way the worker runs it: `frames.with_frame` maps the segment
read-only (shm_open + mmap, then unmap) and `encode.encode` compresses the view without
copying or reordering it. OpenCV is timed on a frame already in this process's memory,
as the original module had it: `cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)` and
`cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_QUALITY, 80])` (OpenCV's default chroma
subsampling is 4:2:0). For the other orders OpenCV is also given the conversion that
order would need, so each order has a like-for-like figure besides the original one.
Quality 80, 4:2:0 everywhere. The speed-up printed is OpenCV's median over simplejpeg's,
both from this run (above 1: simplejpeg is faster).

Two references split the cost for RGB: simplejpeg on the same frame in this process's
memory (no mapping: what mapping a segment costs per frame), and the original OpenCV
path reading the frame from the same segment (both sides paying for the mapping).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from benchmarks.conftest import Frame, Segments, in_order, median_s, report
from returner import frames
from returner.encode import JpegOptions, encode
from returner.task import Task

pytestmark = pytest.mark.bench

ORDERS = ("RGB", "BGR", "RGBA", "BGRA", "GRAY")
OPTIONS = JpegOptions(quality=80, subsampling="420")
ROUNDS, WARMUP = 200, 10

_simplejpeg_s: dict[str, float] = {}  # median seconds per order, this run
_opencv_s: dict[str, float] = {}


@pytest.fixture(scope="module")
def frames_by_order(page_frame: Frame) -> dict[str, Frame]:
    return {order: in_order(page_frame, order) for order in ORDERS}


@pytest.fixture(scope="module")
def shm_tasks(frames_by_order: dict[str, Frame]) -> Iterator[dict[str, Task]]:
    """One segment per order, holding the frame as the renderer would leave it."""
    made = Segments()
    try:
        tasks = {}
        for order, frame in frames_by_order.items():
            name = made.put(frame)
            h, w, c = frame.shape
            tasks[order] = Task(f"bench_{order}", f"page_{order}", name, h, w, c, order)
        yield tasks
    finally:
        made.cleanup()


@pytest.mark.parametrize("order", ORDERS)
def test_simplejpeg_from_shm(benchmark: Any, shm_tasks: dict[str, Task], order: str) -> None:
    task = shm_tasks[order]

    def run() -> bytes:
        return frames.with_frame(task, lambda frame: encode(frame, order, OPTIONS))

    jpeg = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP)
    assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"
    median = median_s(benchmark)
    if median is not None:
        _simplejpeg_s[order] = median
        report(f"encode.simplejpeg.{order}", median * 1000, "ms/frame", bytes=len(jpeg))
        report(f"encode.simplejpeg.{order}.size", len(jpeg) / 1024, "KiB")


def _opencv_path(cv2: Any, order: str) -> tuple[Callable[[Frame], Any], str]:
    """What OpenCV needs for a frame in `order`: (convert, description)."""
    conversions = {
        "RGB": cv2.COLOR_RGB2BGR,  # the original module's path
        "RGBA": cv2.COLOR_RGBA2BGR,
        "BGRA": cv2.COLOR_BGRA2BGR,
    }
    if order in conversions:
        code = conversions[order]
        return (lambda f: cv2.cvtColor(f, code)), f"cvtColor({order}->BGR) + imencode"
    return (lambda f: f), "imencode"


# RGB first: it is the original method, and the other orders are compared with it too.
@pytest.mark.parametrize("order", ORDERS)
def test_opencv(benchmark: Any, frames_by_order: dict[str, Frame], order: str) -> None:
    cv2 = pytest.importorskip("cv2")
    frame = frames_by_order[order]
    convert, how = _opencv_path(cv2, order)
    params = [cv2.IMWRITE_JPEG_QUALITY, 80]

    def run() -> np.ndarray:
        ok, buf = cv2.imencode(".jpg", convert(frame), params)
        assert ok
        return buf  # type: ignore[no-any-return]

    buf = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP)
    median = median_s(benchmark)
    if median is None:
        return
    _opencv_s[order] = median
    report(f"encode.opencv.{order}", median * 1000, "ms/frame", how=how,
           cv2=cv2.__version__, cv2_threads=cv2.getNumThreads(), bytes=int(buf.size))
    mine = _simplejpeg_s.get(order)
    if mine:
        report(f"encode.speedup.{order}.vs_opencv_same_order", median / mine, "x",
               note="OpenCV median / simplejpeg median, same run")
    original = _opencv_s.get("RGB")
    if mine and original:
        report(f"encode.speedup.{order}.vs_opencv_original", original / mine, "x",
               note="OpenCV RGB->BGR+imencode median / simplejpeg median, same run")


def test_simplejpeg_in_memory_rgb(benchmark: Any, frames_by_order: dict[str, Frame]) -> None:
    frame = frames_by_order["RGB"]
    benchmark.pedantic(encode, args=(frame, "RGB", OPTIONS), rounds=ROUNDS, warmup_rounds=WARMUP)
    median = median_s(benchmark)
    if median is None:
        return
    report("encode.simplejpeg.RGB.in_memory", median * 1000, "ms/frame")
    from_shm = _simplejpeg_s.get("RGB")
    if from_shm:
        report("encode.simplejpeg.RGB.mapping_cost", (from_shm - median) * 1000, "ms/frame",
               note="from shared memory minus in memory, same run")


def test_opencv_original_from_shm(benchmark: Any, shm_tasks: dict[str, Task]) -> None:
    cv2 = pytest.importorskip("cv2")
    task = shm_tasks["RGB"]
    params = [cv2.IMWRITE_JPEG_QUALITY, 80]

    def run() -> bool:
        def use(frame: Frame) -> bool:
            ok, _ = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), params)
            return bool(ok)

        return frames.with_frame(task, use)

    assert benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP)
    median = median_s(benchmark)
    if median is None:
        return
    report("encode.opencv.RGB.from_shm", median * 1000, "ms/frame")
    mine = _simplejpeg_s.get("RGB")
    if mine:
        report("encode.speedup.RGB.vs_opencv_original_from_shm", median / mine, "x",
               note="both read the frame from the same segment, same run")
