"""The renderer's side: put frames in shared memory and push their tasks, so that no
frame is lost when the renderer exits.

Python's `SharedMemory(name=..., create=True)` registers the segment with the creating
process's resource tracker, which unlinks every segment still registered when that
process exits (before Python 3.13, and on 3.13+ unless `track=False`): a renderer written
that way loses every frame still queued when it restarts. Segments made here never meet
the tracker: they are created with `shm_open` directly, mode 0600, named to match the
returner's default SHM_NAME_PATTERN, reserved with `posix_fallocate` (a full /dev/shm is
an error here, not a SIGBUS later) and written with one copy (`pwrite` from the frame's
own buffer). From the push on, the returner owns them and unlinks them.

    from returner.producer import Producer

    producer = Producer("redis://redis:6379/0")
    producer.publish(frame, "req_001", "image_001")          # frame: H x W x 3 uint8, RGB
    producer.publish_many([(f, "req_001", f"image_{i:03d}") for i, f in enumerate(pages)])
"""

from __future__ import annotations

import _posixshmem
import errno
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from returner.connection import Replication, Server
from returner.errors import ReturnerError
from returner.frames import unlink
from returner.task import ORDERS_BY_CHANNELS

SEGMENT_PREFIX = "img_shm_"
Frame = npt.NDArray[np.uint8]
Item = tuple[Frame, str, str] | tuple[Frame, str, str, str | None]


class ProducerError(ReturnerError):
    """A frame could not be published; nothing of it was left behind or pushed."""


class InvalidFrame(ProducerError, ValueError):
    """The frame or its channel order is not one the returner accepts."""


class SharedMemoryFull(ProducerError):
    """/dev/shm has no room for the frame."""


class NotReplicated(ProducerError):
    """The tasks were pushed, but fewer replicas than asked confirmed them in time.

    The segments are the returner's now: do not push the tasks again.
    """

    def __init__(self, tasks: list[PushedTask], wanted: int, got: int) -> None:
        super().__init__(f"pushed {len(tasks)} tasks; {got} of {wanted} replicas confirmed")
        self.tasks = tasks


@dataclass(frozen=True)
class PushedTask:
    """A task as pushed: its ids, its segment, and the message itself."""

    request_id: str
    image_id: str
    shm_name: str
    shape: tuple[int, ...]
    channel_order: str | None
    message: bytes


def task_message(
    shm_name: str,
    shape: Sequence[int],
    request_id: str,
    image_id: str,
    channel_order: str | None = None,
) -> bytes:
    """The queue element for a uint8 frame of `shape` in segment `shm_name`."""
    doc: dict[str, Any] = {
        "request_id": request_id,
        "image_id": image_id,
        "shm_info": {
            "shm_name": shm_name,
            "shape": list(shape),
            "dtype": "uint8",
            "size": int(np.prod(shape)),
        },
    }
    if channel_order:
        doc["channel_order"] = channel_order
    return json.dumps(doc).encode()


def check_frame(frame: Frame, channel_order: str | None) -> Frame:
    """The frame as one contiguous uint8 buffer (copied only if it is not one already).

    Raises InvalidFrame.
    """
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise InvalidFrame("a frame is a numpy array of dtype uint8")
    if frame.ndim not in (2, 3) or frame.size == 0:
        raise InvalidFrame(f"shape {frame.shape}: a frame is H x W or H x W x C")
    channels = frame.shape[2] if frame.ndim == 3 else 1
    if channels not in ORDERS_BY_CHANNELS:
        raise InvalidFrame(f"shape {frame.shape}: 1, 3 or 4 channels")
    if channel_order is not None and channel_order not in ORDERS_BY_CHANNELS[channels]:
        raise InvalidFrame(f"channel_order {channel_order} does not fit {channels} channel(s)")
    return np.ascontiguousarray(frame)


def put_segment(frame: Frame) -> str:
    """Copy a contiguous frame into a new segment of its own; the segment's name.

    Raises SharedMemoryFull (nothing is left behind) or OSError.
    """
    name = f"{SEGMENT_PREFIX}{uuid.uuid4().hex}"
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, frame.nbytes)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG):
                raise SharedMemoryFull(
                    f"/dev/shm has no room for a {frame.nbytes}-byte frame ({exc.strerror})"
                ) from None
            raise
        view, offset = memoryview(frame.reshape(-1).data), 0
        while offset < len(view):
            offset += os.pwrite(fd, view[offset:], offset)
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)
    return name


class Producer:
    """Publishes frames onto one queue, in a single Redis or a Redis Cluster."""

    def __init__(
        self,
        redis_url: str,
        queue: str = "hosting:tasks",
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        cluster: bool | None = None,
    ) -> None:
        """`wait_replicas` > 0: after each push, WAIT until that many replicas have it
        (up to `wait_timeout_ms`). `cluster` None asks the server."""
        self.server = Server(redis_url, cluster)
        self.queue = queue
        self.replication = Replication(wait_replicas, wait_timeout_ms)

    def publish(
        self, frame: Frame, request_id: str, image_id: str, channel_order: str | None = None
    ) -> PushedTask:
        """Put one frame in shared memory and push its task; the task pushed.

        Raises InvalidFrame, SharedMemoryFull, RedisUnavailable (nothing left behind or
        pushed), or NotReplicated (pushed).
        """
        return self.publish_many([(frame, request_id, image_id, channel_order)])[0]

    def publish_many(self, items: Iterable[Item]) -> list[PushedTask]:
        """Put every frame in shared memory, then push all their tasks in one RPUSH.

        Each item is (frame, request_id, image_id) or the same with a channel_order.
        On any failure before the push is known to have happened, every segment made
        here is removed and nothing is pushed. Raises as `publish`.
        """
        tasks: list[PushedTask] = []
        try:
            for frame, request_id, image_id, *order in items:
                channel_order = order[0] if order else None
                data = check_frame(frame, channel_order)
                name = put_segment(data)
                message = task_message(name, data.shape, request_id, image_id, channel_order)
                tasks.append(
                    PushedTask(request_id, image_id, name, data.shape, channel_order, message)
                )
            replicas = self._push([t.message for t in tasks])
        except BaseException:
            for task in tasks:
                unlink(task.shm_name)
            raise
        if replicas is not None and replicas < self.replication.replicas:
            raise NotReplicated(tasks, self.replication.replicas, replicas)
        return tasks

    def _push(self, messages: list[bytes]) -> int | None:
        """RPUSH the messages in one command; the replicas that confirmed, if asked."""
        if not messages:
            return None
        with self.server.talking("pushing tasks"):
            client = self.server.client_for(self.queue)
            if not self.replication.replicas:
                client.rpush(self.queue, *messages)
                return None
            _, got = self.replication.write(client, lambda pipe: pipe.rpush(self.queue, *messages))
            return int(got)
