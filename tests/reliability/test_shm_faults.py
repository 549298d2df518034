"""Shared memory that is not what the message says: too small, gone, truncated, never
created; names that try to leave /dev/shm or fall outside SHM_NAME_PATTERN.

Most tests run the real Worker in-process (`running()` from tests/test_worker.py) on
real segments. `test_confined_service_*` runs `returner run` in a mount namespace of its
own, with a private, full /dev/shm, under strace: what the service does to /dev/shm is
then read off its system calls rather than inferred.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from returner import frames as shm
from returner.settings import Settings
from returner.stream import Keys
from tests.conftest import Frames, random_frame, read_results, upstream_segment, wait_for
from tests.e2e.conftest import base_env
from tests.test_worker import (
    assert_drained,
    by_request,
    dead_letters,
    jpegs,
    message,
    running,
    shm_name,
)

MakeSettings = Callable[..., Settings]
DEV_SHM = Path("/dev/shm")
# Errors that can only come from trying to open or map a segment.
OPEN_ERRORS = ("does not exist", "holds", "permission", "opening segment")


class Segments:
    """Segments made here rather than by the `frames` fixture; all unlinked afterwards."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def make(self, data: bytes, name: str | None = None) -> str:
        seg = upstream_segment(max(len(data), 1), name=name)
        try:
            assert seg.buf is not None
            seg.buf[: len(data)] = data
        finally:
            seg.close()
        self.names.append(seg.name)
        return seg.name

    def read(self, name: str) -> bytes:
        return (DEV_SHM / name).read_bytes()


@pytest.fixture
def segments() -> Iterator[Segments]:
    made = Segments()
    yield made
    for name in made.names:
        shm.unlink(name)


def hex_name() -> str:
    return f"img_shm_{uuid.uuid4().hex}"


def frame_bytes(shape: tuple[int, ...], seed: int) -> bytes:
    return random_frame(shape, seed=seed).tobytes()


def assert_failed_and_dead_lettered(
    r: redis.Redis, settings: Settings, output_dir: Path, bad: dict[str, bytes]
) -> dict[str, dict[str, Any]]:
    """Every message in `bad` (by request_id) is failed in results.json and dead-lettered
    at its first delivery, with its original bytes; returns the failed records."""
    records = by_request(read_results(output_dir))
    letters = {d[b"request_id"].decode(): d for d in dead_letters(r, settings)}
    for rid, msg in bad.items():
        rec = records[rid]
        assert rec["status"] == "failed" and rec["file_path"] is None, rec
        assert rec["error"], rec
        assert letters[rid][b"task"] == msg
        assert letters[rid][b"deliveries"] == b"1", "retried instead of failed at once"
    assert len(letters) == len(bad)
    return {rid: records[rid] for rid in bad}


def assert_completed(output_dir: Path, rids: list[str]) -> None:
    records = by_request(read_results(output_dir))
    for rid in rids:
        rec = records[rid]
        assert rec["status"] == "completed", rec
        path = Path(rec["file_path"])
        assert path.parent == output_dir.resolve() and path.stat().st_size > 0


# -- the segment does not hold what the message says --------------------------------------

CLAIM = (128, 128, 3)  # 49,152 bytes: twelve pages
CLAIM_SIZE = int(np.prod(CLAIM))


def test_segment_smaller_than_its_message_claims(
    make_settings: MakeSettings, frames: Frames, segments: Segments, r: redis.Redis,
    output_dir: Path
) -> None:
    """Mapping past the end of a segment would SIGBUS the whole process on first touch;
    the worker must see the size first, fail the task and go on."""
    settings = make_settings()
    sizes = [1, 4096, CLAIM_SIZE // 2, CLAIM_SIZE - 4096, CLAIM_SIZE - 1]
    bad: dict[str, bytes] = {}
    short: dict[str, tuple[str, int]] = {}
    good: list[str] = []
    queue = settings.hosting_tasks_queue
    for i, size in enumerate(sizes):
        rid = f"short-{size}"
        name = segments.make(frame_bytes(CLAIM, i)[:size])
        short[rid] = (name, size)
        bad[rid] = message(name, list(CLAIM), rid, f"img-{rid}")
        r.rpush(queue, frames.task(random_frame(CLAIM, seed=100 + i), f"good-{i}", f"g{i}"),
                bad[rid])
        good.append(f"good-{i}")
    r.rpush(queue, frames.task(random_frame(CLAIM, seed=99), "good-last", "g-last"))
    good.append("good-last")

    with running(settings) as run:
        run.settled(len(bad) + len(good))
        assert run.worker.tally.failed == len(bad)
        assert run.worker.tally.completed == len(good)

    failed = assert_failed_and_dead_lettered(r, settings, output_dir, bad)
    for rid, (name, size) in short.items():
        error = failed[rid]["error"]
        assert name in error and re.search(rf"\b{size}\b", error), error
        assert re.search(rf"\b{CLAIM_SIZE}\b", error), error
        assert not DEV_SHM.joinpath(name).exists(), "a bad task's segment was kept"
    assert_completed(output_dir, good)
    assert len(jpegs(output_dir)) == len(good)
    assert not [n for n in frames.names if frames.exists(n)]
    assert_drained(r, settings)


def test_segment_unlinked_after_push(
    make_settings: MakeSettings, frames: Frames, r: redis.Redis, output_dir: Path
) -> None:
    settings = make_settings()
    before = frames.task(random_frame((40, 60, 3), seed=1), "good-before", "img-before")
    victim = frames.task(random_frame((40, 60, 3), seed=2), "gone", "img-gone")
    after = frames.task(random_frame((40, 60, 3), seed=3), "good-after", "img-after")
    r.rpush(settings.hosting_tasks_queue, before, victim, after)
    assert shm.unlink(shm_name(victim))  # someone removed it after the push

    with running(settings) as run:
        run.settled(3)

    [failed] = assert_failed_and_dead_lettered(r, settings, output_dir, {"gone": victim}).values()
    assert "does not exist" in failed["error"] and shm_name(victim) in failed["error"]
    assert [d[b"error"] for d in dead_letters(r, settings)] == [failed["error"].encode()]
    assert_completed(output_dir, ["good-before", "good-after"])
    assert not frames.exists(shm_name(before)) and not frames.exists(shm_name(after))
    assert_drained(r, settings)


def test_segment_truncated_to_zero_after_push(
    make_settings: MakeSettings, frames: Frames, r: redis.Redis, output_dir: Path
) -> None:
    settings = make_settings()
    victim = frames.task(random_frame(CLAIM, seed=1), "truncated", "img-truncated")
    r.rpush(settings.hosting_tasks_queue, victim)
    name = shm_name(victim)
    os.truncate(DEV_SHM / name, 0)  # the producer's ftruncate(fd, 0) on its segment
    assert os.stat(DEV_SHM / name).st_size == 0
    later = frames.task(random_frame(CLAIM, seed=2), "good-later", "img-later")
    r.rpush(settings.hosting_tasks_queue, later)

    with running(settings) as run:
        run.settled(2)
        assert run.worker.tally.failed == 1 and run.worker.tally.completed == 1

    [failed] = assert_failed_and_dead_lettered(
        r, settings, output_dir, {"truncated": victim}
    ).values()
    assert name in failed["error"] and str(CLAIM_SIZE) in failed["error"], failed
    assert not frames.exists(name), "the truncated segment of a failed task was kept"
    assert_completed(output_dir, ["good-later"])
    assert_drained(r, settings)


def test_segment_the_producer_never_created(
    make_settings: MakeSettings, frames: Frames, r: redis.Redis, output_dir: Path
) -> None:
    """/dev/shm full on the producer's side: it could not create the segment, and the
    message names one that does not exist. Failed; and the worker does not create it."""
    settings = make_settings()
    missing = hex_name()
    never = message(missing, [64, 64, 3], "never-created", "img-never")
    good = frames.task(random_frame((64, 64, 3), seed=5), "good", "img-good")
    r.rpush(settings.hosting_tasks_queue, never, good)

    with running(settings) as run:
        run.settled(2)

    [failed] = assert_failed_and_dead_lettered(
        r, settings, output_dir, {"never-created": never}
    ).values()
    assert "does not exist" in failed["error"] and missing in failed["error"]
    assert not DEV_SHM.joinpath(missing).exists(), "the worker created a segment"
    assert_completed(output_dir, ["good"])
    assert_drained(r, settings)


# -- names ---------------------------------------------------------------------------------

SENTINEL_SHAPE = (16, 16, 3)


@dataclass
class Sentinel:
    """A file outside /dev/shm that escaping names point at, and its state to compare."""

    path: Path
    data: bytes

    @classmethod
    def create(cls, directory: Path) -> Sentinel:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "img_shm_ab"
        data = frame_bytes(SENTINEL_SHAPE, 7)
        path.write_bytes(data)
        # atime well before mtime: under relatime (and strictatime) any read of it would
        # move atime; nothing should.
        st = path.stat()
        os.utime(path, ns=(st.st_mtime_ns - 86_400 * 10**9 * 3, st.st_mtime_ns))
        return cls(path, data)

    def state(self) -> tuple[int, ...]:
        st = self.path.stat()
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_atime_ns, st.st_mode

    def relative(self) -> str:
        """The sentinel's path relative to /dev/shm: ../../tmp/.../img_shm_ab"""
        return "../.." + str(self.path.resolve())


def escaping_names(sentinel: Sentinel, real: str) -> list[str]:
    """Names a producer (or an attacker who can push) might send to leave /dev/shm."""
    rel = sentinel.relative()
    return [
        "../etc/passwd",
        "/" + real,  # glibc strips leading slashes: this would open the real segment
        f"{real}/../../x",
        "img_shm_ab/../../x",
        "..",
        ".",
        rel,
        "/" + rel,
        f"{real}/../{rel}",
        f"img_shm_ab/../../..{sentinel.path.resolve()}",
        f"{real}\x00",  # a C string would end at the NUL and open the real segment
        f"{real}\x00/../../etc/passwd",
        "./" + real,
        real + "/",
        real + "/.",
    ]


def test_names_escaping_dev_shm_are_rejected_before_any_open(
    make_settings: MakeSettings, frames: Frames, segments: Segments, r: redis.Redis,
    output_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings()
    sentinel = Sentinel.create(tmp_path / "outside")
    sentinel_before = sentinel.state()
    passwd_before = os.stat("/etc/passwd").st_mtime_ns
    real = segments.make(frame_bytes(SENTINEL_SHAPE, 8))
    real_data = segments.read(real)
    names = escaping_names(sentinel, real)
    # Each message claims exactly what the file it points at holds: opened, it would pass.
    bad = {f"escape-{i}": message(name, list(SENTINEL_SHAPE), f"escape-{i}", f"img-{i}")
           for i, name in enumerate(names)}
    good = frames.task(random_frame(SENTINEL_SHAPE, seed=9), "good", "img-good")
    r.rpush(settings.hosting_tasks_queue, *bad.values(), good)

    with running(settings) as run:
        run.settled(len(bad) + 1)
        assert run.worker.tally.failed == len(bad)

    failed = assert_failed_and_dead_lettered(r, settings, output_dir, bad)
    for rid, rec in failed.items():
        error = rec["error"]
        assert "shm_name" in error, (names[int(rid.split("-")[1])], error)
        assert not any(word in error for word in OPEN_ERRORS), error
    assert_completed(output_dir, ["good"])
    assert len(jpegs(tmp_path)) == 1, "a file outside /dev/shm was saved as a frame"
    assert sentinel.state() == sentinel_before, "the sentinel was read or changed"
    assert sentinel.path.read_bytes() == sentinel.data  # (this read moves its atime)
    assert os.stat("/etc/passwd").st_mtime_ns == passwd_before
    assert segments.read(real) == real_data, "a segment named through a detour was touched"
    assert_drained(r, settings)


@pytest.mark.parametrize("shape", [[4, 4, 3], [64, 64, 3]], ids=["small", "large"])
@pytest.mark.parametrize("name", [".", ".."], ids=["dot", "dotdot"])
def test_dot_names_are_rejected_even_when_the_pattern_allows_dots(
    make_settings: MakeSettings, segments: Segments, r: redis.Redis, output_dir: Path,
    name: str, shape: list[int]
) -> None:
    """An operator may widen SHM_NAME_PATTERN to names with dots (`frame.001`). The
    names "." and ".." still denote /dev/shm and /dev, not segments: bad input, failed at
    once, nothing opened or unlinked, the worker unharmed. (The size matters to what goes
    wrong: "small" fits in the directory's st_size, "large" does not.)"""
    settings = make_settings(SHM_NAME_PATTERN=r"[\w.-]+")
    good_name = segments.make(frame_bytes((64, 64, 3), 1), name=f"frame.{uuid.uuid4().hex}")
    bad = {"dots": message(name, shape, "dots", "img-dots")}
    good = message(good_name, [64, 64, 3], "good", "img-good")
    r.rpush(settings.hosting_tasks_queue, *bad.values(), good)

    def unexpected() -> float:
        value = run.metrics.registry.get_sample_value("returner_errors_total", {"kind": "task"})
        return value or 0.0

    with running(settings) as run:
        run.wait(lambda: run.worker.tally.settled >= 2 or unexpected(), "both tasks settled")
        assert not unexpected(), f"{name!r} was opened: an unexpected error, left pending"

    [failed] = assert_failed_and_dead_lettered(r, settings, output_dir, bad).values()
    assert not any(word in failed["error"] for word in OPEN_ERRORS), failed["error"]
    assert_completed(output_dir, ["good"])
    assert_drained(r, settings)


def test_name_outside_the_pattern_is_rejected_and_its_segment_kept(
    make_settings: MakeSettings, frames: Frames, segments: Segments, r: redis.Redis,
    output_dir: Path
) -> None:
    settings = make_settings()
    data = frame_bytes((32, 32, 3), 3)
    hexpart = uuid.uuid4().hex
    outside = [
        f"foreign_{hexpart}",
        f"IMG_SHM_{hexpart}",
        f"img_shm_{hexpart}_x",
        f"img_shm_{hexpart}.bak",
        f"img_shm_g{hexpart}",
        "img_shm_" + "a" * 129 + hexpart[:4],
        f" img_shm_{hexpart}",
    ]
    for name in outside:
        segments.make(data, name=name)
    bad = {f"outside-{i}": message(name, [32, 32, 3], f"outside-{i}", f"img-{i}")
           for i, name in enumerate(outside)}
    good = frames.task(random_frame((32, 32, 3), seed=4), "good", "img-good")
    r.rpush(settings.hosting_tasks_queue, *bad.values(), good)

    with running(settings) as run:
        run.settled(len(bad) + 1)

    failed = assert_failed_and_dead_lettered(r, settings, output_dir, bad)
    for rec in failed.values():
        assert "SHM_NAME_PATTERN" in rec["error"], rec["error"]
    for name in outside:
        assert segments.read(name) == data, f"segment {name!r} outside the pattern was touched"
    assert_completed(output_dir, ["good"])
    assert not frames.exists(shm_name(good))
    assert_drained(r, settings)


def test_the_pattern_comes_from_the_settings(
    make_settings: MakeSettings, frames: Frames, segments: Segments, r: redis.Redis,
    output_dir: Path
) -> None:
    """With SHM_NAME_PATTERN=frame_[0-9]+, a default-style name is outside it: rejected,
    and its segment kept, however valid it would otherwise be."""
    settings = make_settings(SHM_NAME_PATTERN=r"frame_[0-9]+")
    data = frame_bytes((32, 32, 3), 5)
    ours = segments.make(data, name=f"frame_{uuid.uuid4().int % 10**12}")
    default_style = frames.task(random_frame((32, 32, 3), seed=6), "default-style", "i1")
    good = message(ours, [32, 32, 3], "good", "img-good")
    r.rpush(settings.hosting_tasks_queue, default_style, good)

    with running(settings) as run:
        run.settled(2)

    [failed] = assert_failed_and_dead_lettered(
        r, settings, output_dir, {"default-style": default_style}
    ).values()
    assert "SHM_NAME_PATTERN" in failed["error"]
    assert frames.exists(shm_name(default_style)), "a segment outside the pattern was unlinked"
    assert_completed(output_dir, ["good"])
    assert not DEV_SHM.joinpath(ours).exists(), "the completed task's segment was kept"
    assert_drained(r, settings)


def make_non_segment(kind: str, path: Path, target: Path) -> None:
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
    else:
        path.symlink_to(target)


def remove_non_segment(path: Path) -> None:
    """Unblock anyone stuck opening a FIFO for reading, then remove whatever it is."""
    if path.is_fifo():
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("kind", "shape"),
    [("directory", [2, 2, 3]), ("directory", [64, 64, 3]), ("fifo", [64, 64, 3]),
     ("symlink", [16, 16, 3])],
    ids=["directory-small", "directory-large", "fifo", "symlink"],
)
def test_a_matching_name_that_is_not_a_segment(
    make_settings: MakeSettings, frames: Frames, r: redis.Redis, output_dir: Path,
    tmp_path: Path, kind: str, shape: list[int]
) -> None:
    """/dev/shm is world-writable: anyone on the host can put a directory, a FIFO or a
    symlink there under a name the pattern accepts. Whatever a message then names, it is
    not a frame: bad input, failed at once; no hang, no crash, nothing followed."""
    settings = make_settings()
    name = hex_name()
    path = DEV_SHM / name
    sentinel = Sentinel.create(tmp_path / "outside")
    before = sentinel.state()
    make_non_segment(kind, path, sentinel.path)
    bad = {"not-a-segment": message(name, shape, "not-a-segment", "img-x")}
    good = frames.task(random_frame((32, 32, 3), seed=1), "good", "img-good")
    r.rpush(settings.hosting_tasks_queue, *bad.values(), good)

    try:
        with running(settings) as run:
            try:
                def unexpected() -> float:
                    value = run.metrics.registry.get_sample_value(
                        "returner_errors_total", {"kind": "task"})
                    return value or 0.0

                run.wait(lambda: run.worker.tally.settled >= 2 or unexpected(),
                         "both tasks settled", timeout=15)
                assert not unexpected(), f"the {kind} gave an unexpected error, left pending"
            finally:
                if kind == "fifo":
                    remove_non_segment(path)  # let a reader blocked in open() go
        [failed] = assert_failed_and_dead_lettered(r, settings, output_dir, bad).values()
        assert name in failed["error"], failed
        assert_completed(output_dir, ["good"])
        assert sentinel.state() == before, "the symlink was followed"
        if kind == "directory":
            assert path.is_dir(), "a directory in /dev/shm was removed"
        assert_drained(r, settings)
    finally:
        remove_non_segment(path)


# -- the service in a private, full /dev/shm, under strace ----------------------------------

TRACED = (
    "openat,open,creat,truncate,ftruncate,fallocate,mmap,write,pwrite64,writev,pwritev,"
    "pwritev2,copy_file_range,sendfile,unlink,unlinkat,rename,renameat,renameat2,link,"
    "linkat,symlink,symlinkat,mkdir,mkdirat,mknod,mknodat,chmod,fchmod,fchmodat,chown,"
    "fchown,fchownat,utimensat"
)
SHM_SIZE = 512 * 1024


def can_confine() -> str | None:
    """Why the confined service cannot run here, or None."""
    for tool in ("unshare", "strace", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         "mount -t tmpfs -o size=64k tmpfs /dev/shm && strace -f -qq -o /dev/null true"],
        capture_output=True, text=True,
    )
    if probe.returncode:
        return f"no private mount namespace or no ptrace: {probe.stderr.strip()[:200]}"
    return None


@dataclass
class Confined:
    """`returner run` in its own mount namespace, /dev/shm a small private tmpfs, under
    strace. The test is the renderer: it reaches that /dev/shm through /proc/PID/root."""

    proc: subprocess.Popen[bytes]
    log: Path
    trace: Path

    @property
    def shm(self) -> Path:
        return Path(f"/proc/{self.proc.pid}/root/dev/shm")

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def service_pid(self) -> int | None:
        """The traced python process (strace's child)."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return None
        pids = children.split()
        return int(pids[0]) if pids else None

    def stop(self) -> int:
        pid = self.service_pid()
        assert pid is not None, self.logs()
        os.kill(pid, signal.SIGTERM)
        return self.proc.wait(timeout=20)

    def kill(self) -> None:
        pid = self.service_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def confined(redis_url: str, queue: str, output_dir: Path, tmp_path: Path
             ) -> Iterator[Confined]:
    why = can_confine()
    if why:
        pytest.skip(why)
    env = base_env(REDIS_URL=redis_url, HOSTING_TASKS_QUEUE=queue, OUTPUT_DIR=output_dir,
                   CONSUMER_NAME="confined", METRICS_PORT=0, ENCODER_THREADS=2)
    log, trace = tmp_path / "confined.log", tmp_path / "strace.txt"
    script = (f"mount -t tmpfs -o size={SHM_SIZE},mode=1777 tmpfs /dev/shm && "
              'exec strace -f -qq -y -s 8 -o "$0" -e trace="$1" "$2" -m returner run')
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
             str(trace), TRACED, sys.executable],
            env=env, cwd=tmp_path, stdout=out, stderr=out,
        )
    svc = Confined(proc, log, trace)
    try:
        wait_for(lambda: "encoder threads" in svc.logs() or proc.poll() is not None,
                 timeout=60, what="the confined service to start")
        assert proc.poll() is None, svc.logs()
        yield svc
    finally:
        svc.kill()


def put(shm_dir: Path, name: str, data: bytes) -> None:
    """What SharedMemory(name, create=True) + a copy into it does, in that /dev/shm."""
    fd = os.open(shm_dir / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def fill(shm_dir: Path) -> None:
    """Take every free byte of the tmpfs (a dot-file: no pattern matches it)."""
    fd = os.open(shm_dir / ".fill", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = b"\xa5" * 4096
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, chunk)
    finally:
        os.close(fd)


def create_fails(shm_dir: Path, name: str, size: int) -> OSError:
    """The renderer's attempt to create a segment in a full /dev/shm; it cleans up."""
    fd = os.open(shm_dir / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        return exc
    finally:
        os.close(fd)
        os.unlink(shm_dir / name)
    raise AssertionError("creating a segment in a full /dev/shm succeeded")


@dataclass
class Call:
    name: str
    text: str


def shm_calls(trace: Path) -> list[Call]:
    """System calls of the service that name a path or descriptor in /dev/shm."""
    calls = []
    for line in trace.read_text(errors="replace").splitlines():
        if "/dev/shm" not in line or "resumed>" in line:
            continue  # a resumed call's arguments are on its "unfinished" line
        found = re.match(r"\d+\s+(\w+)\(", line)
        assert found, line
        calls.append(Call(found[1], line))
    return calls


def path_of(call: Call) -> str:
    found = re.search(r'"(/dev/shm/[^"]*)"', call.text)
    assert found, f"no /dev/shm path in {call.text}"
    return found[1]


def test_confined_service_never_writes_into_a_full_dev_shm(
    confined: Confined, r: redis.Redis, queue: str, output_dir: Path, tmp_path: Path
) -> None:
    """The producer's /dev/shm is full: its next segment cannot be created, and the
    message names one that was never made (failed). Escaping names are rejected without
    an open. Meanwhile the service, in that same full /dev/shm, completes good frames:
    every open of /dev/shm is read-only without O_CREAT, every mapping PROT_READ, nothing
    is written, truncated or created there, and it unlinks only its own tasks' segments."""
    root = confined.shm
    good = {hex_name(): frame_bytes((64, 64, 3), i) for i in range(2)}
    for name, data in good.items():
        put(root, name, data)
    fill(root)
    full = os.statvfs(root)
    assert full.f_bavail == 0
    missing = hex_name()
    error = create_fails(root, missing, 64 * 64 * 3)
    assert error.errno == errno.ENOSPC
    sentinel = Sentinel.create(tmp_path / "outside")
    sentinel_before = sentinel.state()
    escapes = escaping_names(sentinel, next(iter(good)))
    [first, second] = good
    tasks = [
        message(first, [64, 64, 3], "good-0", "img-0"),
        message(missing, [64, 64, 3], "never-created", "img-never"),
        *(message(n, list(SENTINEL_SHAPE), f"escape-{i}", f"e{i}") for i, n in enumerate(escapes)),
        message(second, [64, 64, 3], "good-1", "img-1"),
    ]
    r.rpush(queue, *tasks)
    stream = Keys.for_queue(queue).stream

    def settled() -> bool:
        try:
            return len(read_results(output_dir)) == len(tasks) and r.xlen(stream) == 0
        except (OSError, ValueError):
            return False

    wait_for(settled, timeout=60, what="every task settled")
    assert sorted(os.listdir(root)) == [".fill"], "the service left or made a file in /dev/shm"
    assert os.statvfs(root).f_bavail > 0  # the completed frames' pages were freed
    assert confined.stop() == 0, confined.logs()

    records = by_request(read_results(output_dir))
    assert records["good-0"]["status"] == records["good-1"]["status"] == "completed"
    assert records["never-created"]["status"] == "failed"
    assert "does not exist" in records["never-created"]["error"]
    for i in range(len(escapes)):
        rec = records[f"escape-{i}"]
        assert rec["status"] == "failed" and "shm_name" in rec["error"], rec
    assert sentinel.state() == sentinel_before

    calls = shm_calls(confined.trace)
    allowed = {f"/dev/shm/{n}" for n in (*good, missing)}
    opened = [c for c in calls if c.name in ("openat", "open")]
    # Once each: a detour such as "/" + name would show as a second open of the same file.
    assert Counter(path_of(c) for c in opened) == dict.fromkeys(allowed, 1), opened
    for call in opened:
        flags = call.text.split('"', 2)[2]
        assert "O_RDONLY" in flags, call.text
        assert not re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND", flags), call.text
    for call in calls:
        assert ".fill" not in call.text, f"touched another file in /dev/shm: {call.text}"
        if call.name == "mmap":
            assert re.search(r", PROT_READ, MAP_SHARED, \d+</dev/shm/", call.text), call.text
        elif call.name in ("unlink", "unlinkat"):
            assert path_of(call) in allowed, call.text
        else:
            assert call.name in ("openat", "open"), f"wrote into /dev/shm: {call.text}"
    unlinked = {path_of(c) for c in calls if c.name in ("unlink", "unlinkat")}
    assert {f"/dev/shm/{n}" for n in good} <= unlinked, "a completed task's segment was kept"
    trace = confined.trace.read_text(errors="replace")
    for needle in ("passwd", str(sentinel.path.resolve()), '"/dev/shm/."', '"/dev/shm/.."',
                   "/dev/shm/img_shm_ab"):
        assert needle not in trace, f"the service tried a path with {needle!r}"
