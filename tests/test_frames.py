"""with_frame / unlink against real POSIX shared-memory segments."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

from returner import frames as shm
from returner.errors import BadFrame
from returner.task import Task
from tests.conftest import Frames, random_frame


def task_for(name: str, shape: tuple[int, int, int], order: str = "RGB") -> Task:
    return Task("req", "img", name, shape[0], shape[1], shape[2], order)


@pytest.mark.parametrize(
    ("shape", "order"),
    [((48, 64, 3), "RGB"), ((31, 17, 4), "BGRA"), ((20, 30, 1), "GRAY")],
)
def test_view_matches_frame(frames: Frames, shape: tuple[int, int, int], order: str) -> None:
    frame = random_frame(shape, seed=3)
    name = frames.put(frame)
    copy, shape_seen, dtype = shm.with_frame(
        task_for(name, shape, order), lambda v: (v.copy(), v.shape, v.dtype)
    )
    assert shape_seen == shape and dtype == np.uint8
    np.testing.assert_array_equal(copy, frame)


def test_view_is_read_only(frames: Frames) -> None:
    frame = random_frame((8, 8, 3))
    name = frames.put(frame)

    def try_write(view: shm.Frame) -> bool:
        with pytest.raises(ValueError):
            view[0, 0, 0] = 1
        return bool(view.flags.writeable)

    assert shm.with_frame(task_for(name, (8, 8, 3)), try_write) is False
    check = shm.with_frame(task_for(name, (8, 8, 3)), lambda v: v.copy())
    np.testing.assert_array_equal(check, frame)  # the segment is unchanged


def test_value_of_use_is_returned(frames: Frames) -> None:
    name = frames.put(random_frame((4, 4, 3)))
    assert shm.with_frame(task_for(name, (4, 4, 3)), lambda v: "done") == "done"
    assert frames.exists(name)  # reading never removes the segment


def test_exception_from_use_propagates_unchanged(frames: Frames) -> None:
    # e.g. encode() raising BadFrame: the caller must see that error, not a BufferError
    # from closing the mapping while the traceback still holds the view.
    name = frames.put(random_frame((4, 4, 3)))

    def boom(view: shm.Frame) -> None:
        raise BadFrame("from use")

    with pytest.raises(BadFrame, match="from use"):
        shm.with_frame(task_for(name, (4, 4, 3)), boom)
    assert frames.exists(name)


def test_a_segment_of_another_user_is_bad_frame(frames: Frames) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a segment away needs root")
    name = frames.put(random_frame((4, 4, 3)))
    os.chown(Path("/dev/shm", name), 65534, 65534)
    with pytest.raises(BadFrame, match="belongs to uid 65534"):
        shm.with_frame(task_for(name, (4, 4, 3)), lambda v: v.copy())
    assert shm.unlink(name) is False  # not ours to remove either
    os.chown(Path("/dev/shm", name), os.geteuid(), os.getegid())


def test_a_segment_truncated_while_it_is_read_is_bad_frame(
    frames: Frames, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its owner truncates it after the size check: a mapping would raise SIGBUS on the
    next access and kill the process; with SEGMENT_READ=copy a read comes back short."""
    name = frames.put(random_frame((64, 64, 3)))
    buffer = shm._buffer

    def truncated_meanwhile(size: int) -> shm.Frame:
        os.truncate(Path("/dev/shm", name), 100)
        return buffer(size)

    monkeypatch.setattr(shm, "_buffer", truncated_meanwhile)
    with pytest.raises(BadFrame, match="shrank while being read"):
        shm.with_frame(task_for(name, (64, 64, 3)), lambda v: v.copy(), copy=True)


@pytest.mark.parametrize("copy", [False, True], ids=["mapped", "copied"])
def test_both_ways_of_reading_give_the_same_frame_and_check_it_alike(
    frames: Frames, copy: bool
) -> None:
    truth = random_frame((32, 48, 3), seed=9)
    name = frames.put(truth)
    got = shm.with_frame(task_for(name, (32, 48, 3)), lambda v: v.copy(), copy=copy)
    assert (got == truth).all()
    with pytest.raises(BadFrame, match="holds"):  # the message claims more than it holds
        shm.with_frame(task_for(name, (64, 48, 3)), lambda v: None, copy=copy)


def test_missing_segment_is_bad_frame() -> None:
    name = f"img_shm_{uuid.uuid4().hex}"
    with pytest.raises(BadFrame, match=name):
        shm.with_frame(task_for(name, (4, 4, 3)), lambda v: None)


def test_segment_smaller_than_claimed_is_bad_frame(frames: Frames) -> None:
    name = frames.put(random_frame((5, 5, 3)))  # 75 bytes
    with pytest.raises(BadFrame, match="75"):
        shm.with_frame(task_for(name, (10, 10, 3)), lambda v: None)
    with pytest.raises(BadFrame):
        shm.with_frame(task_for(name, (5, 5, 4)), lambda v: None)
    assert frames.exists(name)


def test_segment_larger_than_claimed_is_read(frames: Frames) -> None:
    frame = random_frame((6, 6, 3))
    name = frames.put(frame)
    head = shm.with_frame(task_for(name, (2, 6, 3)), lambda v: v.copy())
    np.testing.assert_array_equal(head, frame[:2])


def test_unlink_true_then_false(frames: Frames) -> None:
    name = frames.put(random_frame((4, 4, 3)))
    assert frames.exists(name)
    assert shm.unlink(name) is True
    assert not frames.exists(name)
    assert shm.unlink(name) is False
    with pytest.raises(BadFrame):
        shm.with_frame(task_for(name, (4, 4, 3)), lambda v: None)


CHILD = textwrap.dedent(
    """
    import sys
    from multiprocessing import resource_tracker
    from returner.frames import with_frame
    from returner.task import Task

    task = Task("req", "img", sys.argv[1], 16, 24, 3, "RGB")
    total = with_frame(task, lambda view: int(view.sum(dtype="uint64")))
    print(total, resource_tracker._resource_tracker._pid)
    """
)


def test_attaching_does_not_register_with_resource_tracker(frames: Frames) -> None:
    frame = random_frame((16, 24, 3), seed=5)
    name = frames.put(frame)
    # stderr is captured, so run() also waits for a resource_tracker the child might
    # have started (it inherits stderr), i.e. until any clean-up it does is over.
    child = subprocess.run(
        [sys.executable, "-c", CHILD, name], capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    total, tracker_pid = child.stdout.split()
    assert int(total) == int(frame.sum(dtype=np.uint64))
    assert tracker_pid == "None", "the child started a resource_tracker"
    assert "leaked" not in child.stderr
    assert frames.exists(name)
    # and the segment is still whole and usable
    again = shm.with_frame(task_for(name, (16, 24, 3)), lambda v: v.copy())
    np.testing.assert_array_equal(again, frame)
