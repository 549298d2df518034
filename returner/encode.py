"""JPEG encoding with simplejpeg (libjpeg-turbo), straight from the shared buffer."""

from __future__ import annotations

from dataclasses import dataclass

import simplejpeg

from returner.errors import BadFrame
from returner.frames import Frame

# simplejpeg reads every one of these layouts natively, so a frame is never copied to
# swap or drop channels; the alpha channel of RGBA/BGRA is ignored by the encoder.
_COLORSPACE = {"RGB": "RGB", "BGR": "BGR", "RGBA": "RGBA", "BGRA": "BGRA", "GRAY": "GRAY"}


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
            colorspace=_COLORSPACE[channel_order],
            colorsubsampling=subsampling,
        )
    except (ValueError, RuntimeError) as exc:
        raise BadFrame(f"JPEG encoding failed: {exc}") from exc
    return data
