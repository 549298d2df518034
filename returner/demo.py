"""A stand-in renderer: sample frames in every channel order, published through
`returner.producer` as a renderer should."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from returner.producer import Producer
from returner.task import CHANNEL_ORDERS


def sample_frame(
    index: int, height: int = 724, width: int = 512, channel_order: str = "RGB"
) -> npt.NDArray[np.uint8]:
    """A recognisable test picture: colour gradients with a band that moves with `index`."""
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    red = np.broadcast_to(x, (height, width))
    green = np.broadcast_to(y, (height, width))
    blue = np.full((height, width), (index * 47) % 256, np.float32)
    band = (np.arange(height)[:, None] // 32 + index) % 8 == 0
    rgb = np.stack([red, green, blue], axis=-1)
    rgb[np.broadcast_to(band, (height, width))] = 255
    rgb8 = rgb.astype(np.uint8)
    if channel_order == "GRAY":
        return np.ascontiguousarray(rgb8.mean(axis=-1, keepdims=True).astype(np.uint8))
    if channel_order.startswith("BGR"):
        rgb8 = rgb8[..., ::-1]
    if channel_order.endswith("A"):
        alpha = np.full((height, width, 1), 255, np.uint8)
        rgb8 = np.concatenate([rgb8, alpha], axis=-1)
    return np.ascontiguousarray(rgb8)


def push_demo(producer: Producer, count: int) -> list[str]:
    """Publish `count` sample frames, cycling through every channel order; their segments."""
    items = []
    for i in range(count):
        order = CHANNEL_ORDERS[i % len(CHANNEL_ORDERS)]
        items.append(
            (sample_frame(i, channel_order=order), f"demo_req_{i:03d}", f"demo_{i:03d}", order)
        )
    return [task.shm_name for task in producer.publish_many(items)]
