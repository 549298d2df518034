"""A stand-in renderer: puts frames in shared memory and pushes tasks, as upstream does."""

from __future__ import annotations

import json
import sys
import uuid
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import numpy.typing as npt
import redis

ORDERS = ("RGB", "BGR", "RGBA", "BGRA", "GRAY")


def create_segment(size: int, name: str | None = None) -> SharedMemory:
    """Create a segment the way the renderer does, and hand its ownership on.

    The creator must not keep it registered with its resource_tracker, which would
    unlink the frame when the creator exits, before the returner has saved it.
    """
    name = name or f"img_shm_{uuid.uuid4().hex}"
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, create=True, size=size, track=False)
    shm = SharedMemory(name=name, create=True, size=size)
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm


def task_message(
    shm_name: str,
    shape: tuple[int, ...],
    request_id: str,
    image_id: str,
    channel_order: str | None = None,
) -> bytes:
    size = int(np.prod(shape))
    doc: dict[str, Any] = {
        "request_id": request_id,
        "image_id": image_id,
        "shm_info": {"shm_name": shm_name, "shape": list(shape), "dtype": "uint8", "size": size},
    }
    if channel_order:
        doc["channel_order"] = channel_order
    return json.dumps(doc).encode()


def put_frame(frame: npt.NDArray[np.uint8]) -> str:
    """Copy a frame into a new segment; returns the segment's name."""
    shm = create_segment(frame.nbytes)
    try:
        np.ndarray(frame.shape, np.uint8, shm.buf)[...] = frame
    finally:
        shm.close()
    return shm.name


def push_frame(
    client: redis.Redis | redis.RedisCluster,
    queue: str,
    frame: npt.NDArray[np.uint8],
    request_id: str,
    image_id: str,
    channel_order: str | None = None,
) -> str:
    """Put a frame in shared memory and RPUSH its task; returns the segment's name."""
    name = put_frame(frame)
    client.rpush(queue, task_message(name, frame.shape, request_id, image_id, channel_order))
    return name


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


def push_demo(client: redis.Redis | redis.RedisCluster, queue: str, count: int) -> list[str]:
    """Push `count` sample frames, cycling through every channel order."""
    names = []
    for i in range(count):
        order = ORDERS[i % len(ORDERS)]
        frame = sample_frame(i, channel_order=order)
        names.append(push_frame(client, queue, frame, f"demo_req_{i:03d}", f"demo_{i:03d}", order))
    return names
