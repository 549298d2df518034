"""Files in OUTPUT_DIR: JPEG names, temp files, committing outcomes, and the view.

A JPEG is written and fsynced under a temp name in this process's own directory
`.tmp/<writer>/`, which it holds an flock on while it lives. A commit records the
outcomes in the store, together with the moves that will put each JPEG under its final
name; only after that transaction is durable are the files renamed and their directory
fsynced. So no JPEG ever has its final name without a record, and a record whose file
is still at its temp name has a move row that anyone can finish: a process that dies
in between has its moves finished, and its temp files removed, by the next process
that sweeps `.tmp/` (at start, and every few seconds while running). Start-up work
grows with the number of writers, not with the number of JPEGs.

Every file is reached through a descriptor of OUTPUT_DIR held since start
(`/proc/self/fd/N/...`), so a directory renamed or swapped for a symbolic link meanwhile
redirects nothing; files are created with O_EXCL | O_NOFOLLOW, never through a link,
never opening what is already there. The moves table holds paths relative to
OUTPUT_DIR; records hold absolute ones.

`results.json` is a view: the latest RESULTS_JSON_ENTRIES records, replaced by rename
at most a second after a commit (and at start and stop), under an flock so that
several processes never rename an older selection over a newer one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePath

from returner.errors import DiskError, SettingsError
from returner.results import STORE, Record, Store, Tx, translated
from returner.task import Decision, Kind, Outcome, echo

log = logging.getLogger(__name__)

RESULTS = "results.json"
LOCK = ".results.lock"
TEMPS = ".tmp"
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
# 255 bytes in all: stem + "_YYYYMMDD_HHMMSS" + "_NNNNNN" suffix room + ".jpg"
STEM_MAX = 255 - 16 - 7 - 4
# 9999-12-31T23:59:59.999Z: a stream entry ID past this still gets a file name.
MAX_MILLIS = 253_402_300_799_999
# results.json is written at most once per VIEW_EVERY_S, on a tick of the upkeep thread:
# a commit shows in it within VIEW_EVERY_S + TICK_S (1 s). Each version reaches the disk
# (ext4 writes a file renamed over another back at once), so this bounds its cost.
VIEW_EVERY_S, TICK_S = 0.8, 0.2
SWEEP_EVERY_S = 5.0  # look for writers that died with moves to finish
PRUNE_IDLE_S = 60.0  # between looks for old records once retention has caught up
LOCK_WAIT_S = 5.0  # the view's lock, at start and stop


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


def now_iso() -> str:
    """Now, as every record's timestamp is written (fixed width, so they sort as text)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _disk_error(action: str, exc: OSError) -> DiskError:
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
        raise _disk_error(f"creating {path.name}", exc) from exc
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise _disk_error(f"writing {path.name}", exc) from exc
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


def _try_lock(fd: int) -> bool:
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
            raise _disk_error(f"preparing {path}", exc) from exc
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
                if _try_lock(fd) and os.stat(temps).st_ino == os.fstat(fd).st_ino:
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

    def write_jpeg(self, data: bytes) -> Path:
        """Write an encoded JPEG to a fsynced temp file; its final name comes at commit."""
        temp = self.temp_path()
        write_file(temp, data)
        return temp

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
            if _try_lock(fd):
                yield entry.name
            os.close(fd)


def remove_tree(directory: Path) -> None:
    """Remove a temp directory and the plain files in it."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            discard(entry.path)
    with contextlib.suppress(OSError):
        os.rmdir(directory)


class View:
    """`results.json`: the latest `entries` records, oldest first, replaced by rename."""

    def __init__(self, out: OutputDir, entries: int) -> None:
        self.out, self.entries = out, entries
        self.path = out.here(RESULTS)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
        try:
            self._lock_fd = os.open(out.here(LOCK), flags, 0o600)
        except OSError as exc:
            raise _disk_error(f"opening {LOCK}", exc) from exc

    def close(self) -> None:
        os.close(self._lock_fd)

    def take_notes(self) -> list[str]:
        """What an earlier version noted in the lock file (the JPEG names it was about to
        create), emptied; the file is made private as it is now."""
        notes = os.pread(self._lock_fd, 1 << 20, 0).decode(errors="replace").split("\n")
        os.ftruncate(self._lock_fd, 0)
        os.fchmod(self._lock_fd, 0o600)
        return notes

    def write(self, store: Store, conn: sqlite3.Connection | None, wait_s: float = 0.0) -> bool:
        """Write the view unless another process is writing one; whether it was written.

        The selection is made under the lock, so a view never replaces a newer one.
        Not fsynced: it is rebuilt from the store at every start. Raises DiskError.
        """
        if not self.entries:
            return True
        deadline = time.monotonic() + wait_s
        while not _try_lock(self._lock_fd):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        try:
            with translated("reading the latest records"):
                records = store.recent(self.entries, conn)
            lines = ",\n".join(json.dumps(r) for r in records)
            temp = self.out.temp_path(".json")
            write_file(temp, f"[\n{lines}\n]\n".encode() if records else b"[]\n", sync=False)
            try:
                os.rename(temp, self.path)
            except OSError as exc:
                discard(temp)
                raise _disk_error(f"replacing {RESULTS}", exc) from exc
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        return True


class Results:
    """The store, the JPEGs' final names and the view, for one process."""

    def __init__(
        self,
        directory: Path,
        layout: str = "flat",
        view_entries: int = 1000,
        retention_days: int = 0,
    ) -> None:
        self.out = OutputDir(directory, layout)
        self.store = Store(self.out.root)
        self.view = View(self.out, view_entries)
        self.retention_days = retention_days
        self._placed = True  # the moves of our last commit are done
        self._dirty = False  # committed since the view was last written
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        """Import earlier results files once, finish dead writers' moves, write the view,
        and start the thread that keeps the view and retention. Raises DiskError."""
        if not self.store.imported:
            from returner.upgrade import upgrade  # it builds on this module

            upgrade(self.out, self.store, self.view.take_notes())
        self.sweep(self.store.db)
        self.view.write(self.store, None, LOCK_WAIT_S)
        # Connected here, so that a failure stops open() instead of killing the thread:
        # SQLite opens by the name /proc/self/fd resolves to, and a rename of OUTPUT_DIR
        # in the middle of connecting fails it.
        with translated("opening the results store"):
            conn = self.store.connect()
        self._thread = threading.Thread(
            target=self._maintain, args=(conn,), name="results", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the thread, forget our finished moves, write the view a last time (if
        `open` got as far as writing it a first time)."""
        self._stop.set()
        opened = self._thread is not None
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(DiskError):
            if self._placed:
                with self.store.transaction("closing the results store") as tx:
                    tx.forget_moves(self.out.writer)
            if opened:
                self.view.write(self.store, None, LOCK_WAIT_S)
        self.store.close()
        self.view.close()
        self.out.close(remove_temps=self._placed)

    def is_completed(self, key: tuple[str, str] | None) -> bool:
        """Whether the task has a completed record. Raises DiskError."""
        return key is not None and self.store.completed(*key)

    def commit(self, outcomes: list[Outcome]) -> list[Decision]:
        """Record the outcomes in one transaction, then put their JPEGs in place.

        A task that already has a completed record (perhaps from another process) is a
        duplicate. Raises DiskError: before the commit the batch's JPEGs are removed and
        nothing is recorded; after it, the records stand and a retry finds them completed.
        """
        placed = self._placed
        try:
            with self.store.transaction("committing results") as tx:
                if self._placed:
                    tx.forget_moves(self.out.writer)
                else:
                    self._finish(tx, self.out.writer)
                self._placed = False
                stamp = now_iso()
                decisions = [self._decide_alone(tx, outcome, stamp) for outcome in outcomes]
                kinds = Counter(d.kind for d in decisions)
                failed = kinds[Kind.FAILED] + kinds[Kind.DEAD_LETTERED]
                tx.count_minute(stamp, kinds[Kind.COMPLETED], failed)
        except DiskError:
            for outcome in outcomes:
                discard(outcome.temp_path)
            self._placed = placed  # rolled back: as before
            raise
        self._place([d for d in decisions if d.kind is Kind.COMPLETED])
        self._dirty = True
        return decisions

    def _decide_alone(self, tx: Tx, outcome: Outcome, stamp: str) -> Decision:
        """Decide one outcome in a savepoint of its own: an unforeseen error leaves it
        pending (to be delivered again, and counted, as after a crash) and the rest of
        the batch committed. A failing disk still fails the whole batch."""
        with tx.savepoint() as undo:
            try:
                return self._decide(tx, outcome, stamp)
            except (DiskError, OSError, sqlite3.Error):
                raise
            except Exception:
                log.exception("committing entry %s failed; left pending", outcome.entry.id)
                undo()
        discard(outcome.temp_path)
        return Decision(outcome, Kind.RETRY)

    def _decide(self, tx: Tx, outcome: Outcome, stamp: str) -> Decision:
        if outcome.kind is Kind.RETRY:
            return Decision(outcome, Kind.RETRY)
        key = outcome.key
        recorded = tx.completed_path(*key) if key else None
        if recorded is not None or outcome.kind is Kind.DUPLICATE:
            discard(outcome.temp_path)
            # Another writer's move to it may be unfinished (and that writer gone): the
            # file must be there before this is acked. Ours are all of this transaction,
            # which renames them itself once committed.
            target = self.out.inside(recorded) if recorded else None
            if target:
                self._move([m for m in tx.moves(final=str(target)) if m[0] != self.out.writer])
            return Decision(outcome, Kind.DUPLICATE, Path(recorded) if recorded else None)
        entry = outcome.entry
        if outcome.kind is Kind.COMPLETED:
            assert outcome.temp_path is not None and key is not None
            name = self._free_name(tx, key[1], entry.millis)
            path = self.out.path / name
            tx.insert(Record(stamp, *key, str(path), "completed", None, entry.id))
            tx.add_move(self.out.writer, str(self.out.inside(outcome.temp_path)), str(name))
            return Decision(outcome, Kind.COMPLETED, path)
        error = outcome.error or "failed"
        tx.insert(
            Record(stamp, outcome.request_id, outcome.image_id, None, "failed", error, entry.id)
        )
        return Decision(outcome, outcome.kind)

    def _free_name(self, tx: Tx, image_id: str, millis: int) -> PurePath:
        """A free name in OUTPUT_DIR (relative to it). A name that exists, or that a
        recorded move will create, belongs to another task: a suffix, not overwriting."""
        directory = self.out.directory_for(millis)
        for suffix in range(1_000_000):
            candidate = directory / file_name(image_id, millis, suffix)
            if not os.path.lexists(self.out.here(candidate)) and not tx.claimed(str(candidate)):
                return candidate
        raise DiskError(f"no free file name for {echo(image_id)}")

    def _place(self, completed: list[Decision]) -> None:
        moves = [
            (d.outcome.temp_path, self.out.here(d.file_path.relative_to(self.out.path)))
            for d in completed
            if d.outcome.temp_path is not None and d.file_path is not None
        ]
        try:
            move_all(moves)
        except OSError as exc:
            raise _disk_error("moving JPEGs into place", exc) from exc
        self._placed = True

    def _move(self, moves: list[tuple[str, str, str]]) -> None:
        """Finish recorded moves (writer, temp, final) and make them durable."""
        move_all([(self.out.here(temp), self.out.here(final)) for _, temp, final in moves])

    def _finish(self, tx: Tx, writer: str) -> None:
        """Finish a writer's recorded moves and forget them."""
        self._move(tx.moves(writer))
        tx.forget_moves(writer)

    def sweep(self, conn: sqlite3.Connection) -> None:
        """Finish the moves of writers that died, and remove their temp files."""
        for writer in self.out.dead_writers():
            with self.store.transaction("finishing a dead writer's moves", conn) as tx:
                self._finish(tx, writer)
            remove_tree(self.out.temps_root / writer)
            log.info("finished the work of a writer that died (%s)", writer)

    def _maintain(self, conn: sqlite3.Connection) -> None:
        """The view at most a second behind, retention in small steps, sweeps."""
        due = {"view": 0.0, "prune": 0.0, "sweep": time.monotonic() + SWEEP_EVERY_S}
        try:
            while not self._stop.wait(TICK_S):
                try:
                    self._maintain_once(conn, due)
                except (DiskError, OSError, sqlite3.Error) as exc:
                    log.warning("results upkeep: %s", exc)
        finally:
            conn.close()

    def _maintain_once(self, conn: sqlite3.Connection, due: dict[str, float]) -> None:
        if self._dirty and time.monotonic() >= due["view"]:
            self._dirty = False
            if self.view.write(self.store, conn):
                due["view"] = time.monotonic() + VIEW_EVERY_S
            else:
                self._dirty = True  # another process is writing it: try again
        now = time.monotonic()
        if self.retention_days and now >= due["prune"]:
            before = (datetime.now(UTC) - timedelta(days=self.retention_days)).isoformat()
            deleted = self.store.prune(before, conn)
            due["prune"] = now + (TICK_S if deleted else PRUNE_IDLE_S)
            if deleted:
                log.info("retention: deleted %d records older than %s", deleted, before)
        if now >= due["sweep"]:
            due["sweep"] = now + SWEEP_EVERY_S
            self.sweep(conn)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (ours, or one we may not signal)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
