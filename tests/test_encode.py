"""encode(): true colours for every channel order, and the JPEG options honoured."""

from __future__ import annotations

import numpy as np
import pytest
import simplejpeg

from returner.encode import JpegOptions, encode
from tests.conftest import psnr, random_frame

SHAPE = (96, 128)
DEFAULTS = JpegOptions()


def rgb_truth(frame: np.ndarray, order: str) -> np.ndarray:
    """The picture the frame shows, as RGB."""
    if order.startswith("BGR"):
        return np.ascontiguousarray(frame[..., 2::-1])
    return np.ascontiguousarray(frame[..., :3])


@pytest.mark.parametrize("order", ["RGB", "BGR", "RGBA", "BGRA"])
def test_colour_orders_show_true_colours(order: str) -> None:
    frame = random_frame((*SHAPE, len(order)), seed=len(order))
    if order.endswith("A"):
        frame[..., 3] = np.random.default_rng(1).integers(0, 256, SHAPE)  # alpha is ignored
    data = encode(frame, order, DEFAULTS)
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    decoded = simplejpeg.decode_jpeg(data, colorspace="RGB")
    assert decoded.shape == (*SHAPE, 3)
    truth = rgb_truth(frame, order)
    assert psnr(decoded, truth) >= 30
    # the check can tell channel orders apart: the swapped picture is far off
    assert psnr(decoded, truth[..., ::-1]) < 25


def test_bgr_needs_no_copy_of_the_frame() -> None:
    # The frame arrives as a read-only view of shared memory: encode must take it as is.
    frame = random_frame((*SHAPE, 3), seed=7)
    view = frame.view()
    view.flags.writeable = False
    decoded = simplejpeg.decode_jpeg(encode(view, "BGR", DEFAULTS), colorspace="RGB")
    assert psnr(decoded, frame[..., ::-1]) >= 30


def test_gray() -> None:
    frame = random_frame((*SHAPE, 1), seed=2)
    data = encode(frame, "GRAY", DEFAULTS)
    decoded = simplejpeg.decode_jpeg(data, colorspace="GRAY")
    assert decoded.shape == (*SHAPE, 1)
    assert psnr(decoded, frame) >= 30
    assert simplejpeg.decode_jpeg_header(data)[2] == "Gray"


def test_odd_sizes() -> None:
    frame = random_frame((37, 53, 3), seed=4)
    decoded = simplejpeg.decode_jpeg(encode(frame, "RGB", DEFAULTS), colorspace="RGB")
    assert decoded.shape == (37, 53, 3)
    assert psnr(decoded, frame) >= 30


def test_quality_changes_size_and_fidelity() -> None:
    frame = random_frame((*SHAPE, 3), seed=5)
    low = encode(frame, "RGB", JpegOptions(quality=20))
    high = encode(frame, "RGB", JpegOptions(quality=95))
    assert len(low) < len(high)
    low_psnr = psnr(simplejpeg.decode_jpeg(low, colorspace="RGB"), frame)
    high_psnr = psnr(simplejpeg.decode_jpeg(high, colorspace="RGB"), frame)
    assert low_psnr < high_psnr


@pytest.mark.parametrize("subsampling", ["444", "422", "420"])
def test_subsampling_is_honoured(subsampling: str) -> None:
    frame = random_frame((*SHAPE, 3), seed=6)
    data = encode(frame, "RGB", JpegOptions(subsampling=subsampling))
    assert simplejpeg.decode_jpeg_header(data)[3] == subsampling


def test_subsampling_changes_size() -> None:
    frame = random_frame((*SHAPE, 3), seed=6)
    full = encode(frame, "RGB", JpegOptions(subsampling="444"))
    half = encode(frame, "RGB", JpegOptions(subsampling="420"))
    assert len(full) > len(half)


def test_defaults_are_quality_80_and_420() -> None:
    options = JpegOptions()
    assert (options.quality, options.subsampling) == (80, "420")
    frame = random_frame((*SHAPE, 3), seed=8)
    assert simplejpeg.decode_jpeg_header(encode(frame, "RGB", DEFAULTS))[3] == "420"
