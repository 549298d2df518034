"""The file system under OUTPUT_DIR: names, descriptors, atomic and durable writes,
and OutputDir, the directory itself with this process's directory of temp files.

Every file is reached through a descriptor of OUTPUT_DIR held since start
(`/proc/self/fd/N/...`), so a directory renamed or swapped for a symbolic link meanwhile
redirects nothing; files are created with O_EXCL | O_NOFOLLOW, never through a link,
never opening what is already there. Nothing here knows SQLite or Redis.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePath

from returner.errors import DiskError, SettingsError

log = logging.getLogger("returner.output")  # the name operators know its lines by

STORE = ".results.db"  # the results store (store.py): private, like .tmp/
TEMPS = ".tmp"
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
# 255 bytes in all: stem + "_YYYYMMDD_HHMMSS" + "_NNNNNN" suffix room + ".jpg"
STEM_MAX = 255 - 16 - 7 - 4
# 9999-12-31T23:59:59.999Z: a stream entry ID past this still gets a file name.
MAX_MILLIS = 253_402_300_799_999


def safe_stem(image_id: str) -> str:
    """An injective, file-name-safe form of an image id (percent-encoding, then a hash).

    Letters, digits, `-` and `_` stay; `.` stays unless the id starts with one or holds
    `..`; every other byte becomes `%XX`. Over STEM_MAX, the tail becomes `~` plus a hash
    of the whole id, so two long ids sharing a prefix still differ.
    """
    raw = image_id.encode("utf-8", "surrogatepass")
    dots_ok = not raw.startswith(b".") and b".." not in raw
    stem = "".join(chr(b) if b in _SAFE or (b == 0x2E and dots_ok) else f"%{b:02X}" for b in raw)
    if len(stem) > STEM_MAX:
        stem = stem[: STEM_MAX - 17] + "~" + hashlib.sha256(raw).hexdigest()[:16]
    return stem


def entry_time(millis: int) -> datetime:
    return datetime.fromtimestamp(min(max(millis, 0), MAX_MILLIS) / 1000, UTC)


def file_name(image_id: str, millis: int, suffix: int = 0) -> str:
    """`{image_id}_{YYYYMMDD_HHMMSS}[_{n}].jpg`, the time being the stream entry's (UTC)."""
    stamp = entry_time(millis).strftime("%Y%m%d_%H%M%S")
    tail = f"_{suffix}" if suffix else ""
    return f"{safe_stem(image_id)}_{stamp}{tail}.jpg"


def disk_error(action: str, exc: OSError) -> DiskError:
    return DiskError(f"{action}: {exc.strerror or exc}")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, sync: bool = True) -> None:
    """Create `path` (new, never through a link) with `data`, fsynced unless `sync` is
    False. Raises DiskError saying which step failed; a file it created is removed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise disk_error(f"creating {path.name}", exc) from exc
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise disk_error(f"writing {path.name}", exc) from exc
    finally:
        os.close(fd)


def discard(path: Path | str | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def check_private(path: Path) -> None:
    """Refuse a path another user owns or may write to, as sshd's StrictModes does: they
    could swap files under the returner, or hold its store. A missing path is fine.

    Raises SettingsError, naming the path and the fix.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    me = os.geteuid()
    if st.st_uid != me:
        raise SettingsError(
            f"OUTPUT_DIR: {path} belongs to uid {st.st_uid}, not to the returner's user "
            f"(uid {me}): chown {me} {path}, or run the returner as uid {st.st_uid}"
        )
    if st.st_mode & 0o022:
        raise SettingsError(
            f"OUTPUT_DIR: {path} is writable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): chmod go-w {path}"
        )


def move_all(moves: list[tuple[Path, Path]]) -> None:
    """Put recorded JPEGs under their final names (done already is fine), then make
    that durable. Raises OSError."""
    for temp, final in moves:
        try:
            os.rename(temp, final)
        except FileNotFoundError:
            if not os.path.lexists(final):
                log.error("the JPEG of a completed record is lost: %s (temp %s gone)", final, temp)
    for directory in {final.parent for _, final in moves}:
        fsync_dir(directory)


def try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class OutputDir:
    """OUTPUT_DIR, its layout, and this process's directory of temp files."""

    def __init__(self, path: Path, layout: str = "flat") -> None:
        """Raises SettingsError when OUTPUT_DIR or its store could be changed by another
        user, DiskError when it cannot be prepared."""
        try:
            # Never writable by others, whatever the umask (JPEGs and the view follow it).
            path.mkdir(mode=0o755, parents=True, exist_ok=True)
            self.path = path.resolve()
            for private in (self.path, self.path / STORE, self.path / TEMPS):
                check_private(private)
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            self.root = Path(f"/proc/self/fd/{self._fd}")
            self.temps_root = self.root / TEMPS
            self.temps_root.mkdir(mode=0o700, exist_ok=True)
            self.writer, self._writer_fd = self._claim_temps()
        except OSError as exc:
            raise disk_error(f"preparing {path}", exc) from exc
        self.temps = self.temps_root / self.writer
        self.daily = layout == "daily"

    def here(self, relative: str | PurePath) -> Path:
        """A path inside OUTPUT_DIR, reached through the descriptor held since start."""
        return self.root / relative

    def inside(self, path: str | Path) -> PurePath | None:
        """`path` (one of ours, or a record's file_path) relative to OUTPUT_DIR."""
        for base in (self.root, self.path):
            with contextlib.suppress(ValueError):
                return PurePath(path).relative_to(base)
        return None

    def _claim_temps(self) -> tuple[str, int]:
        """A new directory of our own in .tmp/, flocked for as long as we live."""
        while True:
            writer = uuid.uuid4().hex[:16]
            temps = self.temps_root / writer
            temps.mkdir(mode=0o700)
            # Until it is locked, a sweeper may take the new directory for a dead
            # writer's and remove it, before or after it is opened: then try another name.
            try:
                fd = os.open(temps, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue
            with contextlib.suppress(FileNotFoundError):
                if try_lock(fd) and os.stat(temps).st_ino == os.fstat(fd).st_ino:
                    return writer, fd
            os.close(fd)

    def close(self, remove_temps: bool = True) -> None:
        """Let go of OUTPUT_DIR; with `remove_temps`, remove our temp directory first
        (nothing in it is recorded once every move is done)."""
        if remove_temps:
            remove_tree(self.temps)
        os.close(self._writer_fd)
        os.close(self._fd)

    def temp_path(self, suffix: str = ".jpg") -> Path:
        return self.temps / f"{uuid.uuid4().hex}{suffix}"

    def directory_for(self, millis: int) -> PurePath:
        """Where in OUTPUT_DIR a frame of this stream entry goes; a new daily directory
        is made durable."""
        if not self.daily:
            return PurePath()
        day = PurePath(entry_time(millis).strftime("%Y-%m-%d"))
        if not self.here(day).is_dir():
            self.here(day).mkdir(mode=0o755, exist_ok=True)
            fsync_dir(self.root)
        return day

    def dead_writers(self) -> Iterator[str]:
        """The name of each temp directory whose writer is gone, locked while the
        caller handles it."""
        for entry in os.scandir(self.temps_root):
            if entry.name == self.writer or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue
            if try_lock(fd):
                yield entry.name
            os.close(fd)


def remove_tree(directory: Path) -> None:
    """Remove a temp directory and the plain files in it."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            discard(entry.path)
    with contextlib.suppress(OSError):
        os.rmdir(directory)
