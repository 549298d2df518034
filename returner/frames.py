"""Reading the renderer's POSIX shared-memory segments.

A segment is mapped (SEGMENT_READ=map, the default) once it is checked to be a regular
file of the returner's own user that holds the frame: nobody else can truncate it, and a
mapping costs a quarter of a copy (a copy of 4.4 MB per frame, beside the encoder's own
reads, was measured at 2 ms of CPU per frame under load: benchmarks/README.md). Its
owner, the renderer, could still truncate it while it is read, which would raise SIGBUS
and kill the process: a renderer that does so (it should not: from the push on the
segment is the returner's) wants SEGMENT_READ=copy, which reads it with `pread` into a
buffer this thread keeps, where a truncation just makes the read come back short. The
segment is opened with `shm_open` directly rather than through
`multiprocessing.shared_memory.SharedMemory`, which before Python 3.13 registers it with
the resource_tracker, which would unlink a pending frame when this process exits.
"""

from __future__ import annotations

import _posixshmem
import contextlib
import errno
import mmap
import os
import stat
import threading
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from returner.errors import BadFrame, DiskError, MissingSegment, TransientError
from returner.task import Task

T = TypeVar("T")
Frame = npt.NDArray[np.uint8]
# A thread keeps its buffer for frames up to this size (a 1448 x 1024 RGB page is 4.4 MB);
# a larger frame gets a buffer of its own that goes with it.
KEEP_BUFFER_BYTES = 64 * 1024 * 1024
_local = threading.local()
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory


def with_frame(task: Task, use: Callable[[Frame], T], copy: bool = False) -> T:
    """Call `use` with the task's frame: its segment mapped, or with `copy` read into this
    thread's buffer.

    Raises BadFrame when the segment is missing, not ours, or smaller than the message
    claims (with `copy`, also when it shrinks while being read), TransientError on other
    OS errors. The array must not outlive `use`.
    """
    if not copy:
        return _mapped(task, use)
    fd = _open(task)
    try:
        data = _buffer(task.size)
        done = 0
        while done < task.size:
            got = os.preadv(fd, [memoryview(data[done:].data)], done)
            if got == 0:
                raise BadFrame(f"segment {task.shm_name!r} shrank while being read")
            done += got
    except OSError as exc:
        raise _translate(task.shm_name, exc) from None
    finally:
        os.close(fd)
    frame = data.reshape(task.height, task.width, task.channels)
    frame.flags.writeable = False
    return use(frame)


def _mapped(task: Task, use: Callable[[Frame], T]) -> T:
    fd = _open(task)
    try:
        mapping = mmap.mmap(fd, task.size, prot=mmap.PROT_READ)
    except OSError as exc:
        raise _translate(task.shm_name, exc) from None
    finally:
        os.close(fd)
    try:
        view = np.frombuffer(mapping, dtype=np.uint8, count=task.size)
        result = use(view.reshape(task.height, task.width, task.channels))
        del view  # no export may be left when the mapping closes
        return result
    finally:
        with contextlib.suppress(BufferError):  # `use` kept a view: the GC closes it
            mapping.close()


def _buffer(size: int) -> Frame:
    if size > KEEP_BUFFER_BYTES:
        return np.empty(size, np.uint8)
    kept: Frame | None = getattr(_local, "buffer", None)
    if kept is None or kept.size < size:
        kept = _local.buffer = np.empty(size, np.uint8)
    return kept[:size]


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


def _open(task: Task) -> int:
    """A descriptor of the task's segment, checked: a regular file of our own user that
    holds the frame."""
    name = task.shm_name
    try:
        # O_NONBLOCK: a FIFO planted under a segment's name must not block the thread.
        fd: int = _posixshmem.shm_open("/" + name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW, 0)
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
        if st.st_uid != os.geteuid():
            raise BadFrame(
                f"segment {name!r} belongs to uid {st.st_uid}, not to the returner's user "
                f"(uid {os.geteuid()}): run as the renderer's user"
            )
        if st.st_size < task.size:
            raise BadFrame(
                f"segment {name!r} holds {st.st_size} bytes, the message claims {task.size}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _translate(name: str, exc: OSError) -> BadFrame | TransientError:
    if exc.errno in (errno.EMFILE, errno.ENFILE):  # out of descriptors: pause, as for a disk
        return DiskError(f"opening segment {name!r}: {exc.strerror}")
    if exc.errno in _NOT_A_SEGMENT:
        return BadFrame(f"{name!r} is not a usable shared memory segment ({exc.strerror})")
    return TransientError(f"opening segment {name!r}: {exc}")


def unlink(shm_name: str) -> bool:
    """Remove a segment of our own user by name; False if it was gone, is not ours, or
    could not be removed.

    Never raises: releasing memory must not stop an outcome from being settled.
    """
    try:
        st = os.lstat(os.path.join(SHM_DIR, shm_name))
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return False
        _posixshmem.shm_unlink("/" + shm_name)
    except OSError:
        return False
    return True
