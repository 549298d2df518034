"""JPEG with simplejpeg (libjpeg-turbo): encoding straight from the frame's buffer, and
decoding for `returner push`.

simplejpeg reads every channel order of task.CHANNEL_ORDERS natively (under the same
names), so a frame is never copied to swap or drop channels; the alpha channel of
RGBA/BGRA is ignored by the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import simplejpeg

from returner.errors import BadFrame
from returner.frames import Frame


@dataclass(frozen=True)
class JpegOptions:
    quality: int = 80
    subsampling: str = "420"


def encode(frame: Frame, channel_order: str, options: JpegOptions) -> bytes:
    """Encode an H x W x C uint8 frame in its own channel order. Raises BadFrame."""
    subsampling = "Gray" if channel_order == "GRAY" else options.subsampling
    try:
        data: bytes = simplejpeg.encode_jpeg(
            frame,
            quality=options.quality,
            colorspace=channel_order,
            colorsubsampling=subsampling,
        )
    except (ValueError, RuntimeError) as exc:
        raise BadFrame(f"JPEG encoding failed: {exc}") from exc
    return data


def decode(data: bytes) -> Frame:
    """An RGB frame from a JPEG's bytes. Raises ValueError when it is not one."""
    frame: Frame = simplejpeg.decode_jpeg(data, colorspace="RGB")
    return frame
