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
import stat
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from returner.errors import BadFrame, MissingSegment, TransientError
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


# Errors that mean the name is not a usable segment (a directory, a symbolic link,
# a device...): bad input, not a passing fault.
_NOT_A_SEGMENT = {
    errno.ELOOP,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.ENXIO,
    errno.ENODEV,
    errno.EINVAL,
    errno.ENAMETOOLONG,
}


def _map(task: Task) -> mmap.mmap:
    name = task.shm_name
    try:
        # O_NONBLOCK: a FIFO planted under a segment's name must not block the thread.
        fd = _posixshmem.shm_open("/" + name, os.O_RDONLY | os.O_NONBLOCK, 0)
    except FileNotFoundError:
        raise MissingSegment(f"shared memory segment {name!r} does not exist") from None
    except PermissionError:
        raise BadFrame(
            f"no permission to open segment {name!r}: run as the renderer's user"
        ) from None
    except OSError as exc:
        raise _translate(name, exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadFrame(f"{name!r} is not a shared memory segment")
        if st.st_size < task.size:
            raise BadFrame(
                f"segment {name!r} holds {st.st_size} bytes, the message claims {task.size}"
            )
        return mmap.mmap(fd, task.size, prot=mmap.PROT_READ)
    except OSError as exc:
        raise _translate(name, exc) from None
    finally:
        os.close(fd)


def _translate(name: str, exc: OSError) -> BadFrame | TransientError:
    if exc.errno in _NOT_A_SEGMENT:
        return BadFrame(f"{name!r} is not a usable shared memory segment ({exc.strerror})")
    return TransientError(f"opening segment {name!r}: {exc}")


def unlink(shm_name: str) -> bool:
    """Remove a segment by name; False if it was gone or could not be removed.

    Never raises: releasing memory must not stop an outcome from being settled.
    """
    try:
        _posixshmem.shm_unlink("/" + shm_name)
    except OSError:
        return False
    return True
