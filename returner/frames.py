"""Read-only access to the renderer's POSIX shared-memory segments.

Segments are opened with `shm_open` and mapped read-only here rather than through
`multiprocessing.shared_memory.SharedMemory`: before Python 3.13 that class registers
every attached segment with the resource_tracker, which unlinks it when this process
exits, and a `kill -9` between register and unregister would delete a frame that is
still pending. Mapping the descriptor directly never involves the tracker.
"""

from __future__ import annotations

import _posixshmem
import contextlib
import errno
import mmap
import os
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from returner.errors import BadFrame, TransientError
from returner.task import Task

T = TypeVar("T")
Frame = npt.NDArray[np.uint8]


def with_frame(task: Task, use: Callable[[Frame], T]) -> T:
    """Call `use` with a zero-copy read-only view of the task's frame, then unmap it.

    Raises BadFrame when the segment is missing or smaller than the message claims,
    TransientError on other OS errors. The view must not outlive `use`.
    """
    mapping = _map(task)
    try:
        view = np.frombuffer(mapping, dtype=np.uint8, count=task.size)
        try:
            return use(view.reshape(task.height, task.width, task.channels))
        finally:
            del view  # every exported buffer must be gone before close()
    finally:
        # An exception from `use` still holds the view in its traceback; the mapping
        # is unmapped when that is dropped, and the exception goes on unchanged.
        with contextlib.suppress(BufferError):
            mapping.close()


def _map(task: Task) -> mmap.mmap:
    try:
        fd = _posixshmem.shm_open("/" + task.shm_name, os.O_RDONLY, 0)
    except FileNotFoundError:
        raise BadFrame(f"shared memory segment {task.shm_name!r} does not exist") from None
    except PermissionError:
        raise BadFrame(
            f"no permission to open segment {task.shm_name!r}: run as the renderer's user"
        ) from None
    except OSError as exc:
        raise TransientError(f"opening segment {task.shm_name!r}: {exc}") from exc
    try:
        actual = os.fstat(fd).st_size
        if actual < task.size:
            raise BadFrame(
                f"segment {task.shm_name!r} holds {actual} bytes, the message claims {task.size}"
            )
        return mmap.mmap(fd, task.size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def unlink(shm_name: str) -> bool:
    """Remove a segment by name; False if it was already gone."""
    try:
        _posixshmem.shm_unlink("/" + shm_name)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return False
        raise
    return True
