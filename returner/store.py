"""The results store: one SQLite database in OUTPUT_DIR, the durable record of every
outcome and the once-only index.

WAL mode with synchronous=FULL: a commit is fsynced before it returns (NORMAL could lose
the last commits on power loss), readers never block the writer, and BEGIN IMMEDIATE
serialises writers across processes. Nothing is held in memory: start-up and a commit
cost the same with ten records or ten million.

Tables:
- `records`: one row per outcome, in commit order (`id`). Rows are only ever deleted
  from the oldest end (retention), so `id` order is commit order and, clock steps
  aside, timestamp order.
- `moves`: JPEGs that a committed record names but that may still be at their temp
  name. A writer inserts them in the transaction that records them, renames the files
  after the commit, and deletes the rows in its next transaction. Anyone may finish a
  move (renaming is idempotent), which is how a dead writer's work is completed.
- `meta`: `imported` once the results files of earlier versions were taken in.
- `minutes`: completed and failed records per UTC minute (`YYYY-MM-DDTHH:MM`), counted
  in the transaction that inserts them and pruned with them: the console's chart reads
  an hour of it instead of counting records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from returner.errors import DiskError
from returner.files import STORE
from returner.task import encodable

FIELDS = (
    "timestamp",
    "request_id",
    "image_id",
    "file_path",
    "image_url",
    "status",
    "error",
    "entry_id",
)
# A writer waits this long for another's transaction before calling the disk failing.
BUSY_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 1.0  # a read-only connection (the console): a page never hangs on a lock
# After a checkpoint the WAL is cut back to this size (it grows during an import).
WAL_LIMIT_BYTES = 64 * 1024 * 1024
# Records read per step of an export, and deleted per step of retention.
EXPORT_STEP, PRUNE_STEP = 1000, 500
MINUTE = len("YYYY-MM-DDTHH:MM")  # a timestamp's prefix naming its minute

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    timestamp TEXT NOT NULL,
    request_id TEXT,
    image_id TEXT,
    file_path TEXT,
    image_url TEXT,
    status TEXT NOT NULL,
    error TEXT,
    entry_id TEXT
);
CREATE TABLE IF NOT EXISTS moves (writer TEXT NOT NULL, temp TEXT NOT NULL, final TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- The console's "failed only", newest first: found by scanning, a page of them took
-- 2.4 s in 10 million records with none failed. Only failed records are in it.
CREATE INDEX IF NOT EXISTS records_failed ON records (id) WHERE status = 'failed';
CREATE TABLE IF NOT EXISTS minutes (
    minute TEXT PRIMARY KEY,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"""
# Built after an import (much faster than keeping it up while inserting).
_INDEX = "CREATE INDEX IF NOT EXISTS records_key ON records (request_id, image_id)"
_INSERT = f"INSERT INTO records ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})"
_COMPLETED = (
    "SELECT file_path, image_url FROM records WHERE request_id = ? AND image_id = ?"
    " AND status = 'completed' LIMIT 1"
)
# What a completed record says of its JPEG: (file_path, image_url), either possibly None.
Recorded = tuple[str | None, str | None]


def timestamp(moment: datetime | None = None) -> str:
    """A record's timestamp (now by default): ISO-8601 UTC with microseconds, a fixed
    width, so that they sort as text."""
    return (moment or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Record:
    """One row to insert: the fields of a results.json entry plus the stream entry."""

    timestamp: str
    request_id: str | None
    image_id: str | None
    file_path: str | None
    image_url: str | None
    status: str
    error: str | None
    entry_id: str | None

    def row(self) -> tuple[str | None, ...]:
        return tuple(None if v is None else encodable(v) for v in dataclasses.astuple(self))


def as_dict(row: Sequence[Any]) -> dict[str, Any]:
    """A row of FIELDS as the results.json object (`error` only on failed records)."""
    doc = dict(zip(FIELDS, row, strict=True))
    if doc["status"] == "completed":
        del doc["error"]
    return doc


def _select(where: str = "") -> str:
    return f"SELECT id, {', '.join(FIELDS)} FROM records {where}"


def _readable(db: sqlite3.Connection) -> None:
    """Let a reader of a 0.1 store (no image_url column yet) read it as if it had one."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(records)")}
    if columns and "image_url" not in columns:
        db.execute("CREATE TEMP VIEW records AS SELECT *, NULL AS image_url FROM main.records")


def _connect(path: Path, timeout_s: float) -> sqlite3.Connection:
    # isolation_level=None: transactions are begun and ended here, explicitly.
    conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
    return conn


def _use_wal(db: sqlite3.Connection) -> None:
    """Put the database in WAL mode (it stays so). Switching takes an exclusive lock,
    and SQLite refuses it at once, not after the busy timeout, while another process
    opening the new store holds a lock: then try again, for as long as the timeout.
    Raises sqlite3.Error."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode == "wal":
                return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
        if time.monotonic() >= deadline:
            raise sqlite3.OperationalError("the store could not be put in WAL mode")
        time.sleep(0.01)


def _create(path: Path) -> None:
    """Create the database file private (0600); SQLite gives its -wal and -shm the same mode."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))


def _add_image_url(db: sqlite3.Connection) -> None:
    """Give a store of 0.1 its `image_url` column (instant in SQLite: no row is rewritten)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(records)")}
    if "image_url" not in columns:
        with contextlib.suppress(sqlite3.OperationalError):  # another process was first
            db.execute("ALTER TABLE records ADD COLUMN image_url TEXT")


@contextlib.contextmanager
def as_disk_error(action: str) -> Iterator[None]:
    """SQLite's and the file system's errors become DiskError (the worker pauses)."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise DiskError(f"{action}: {exc}") from exc


class Store:
    """The results database of one OUTPUT_DIR; safe to share between processes.

    The connection that writes belongs to one thread at a time; `completed` may be
    called from any thread (each gets a reading connection of its own).
    """

    def __init__(self, directory: Path, create: bool = True, read_only: bool = False) -> None:
        """Open (or with `create`, create) the store of `directory`; `read_only` (without
        `create`): a connection that cannot write, and waits for locks only briefly.
        Raises DiskError."""
        self.path = directory / STORE
        with as_disk_error(f"opening {self.path}"):
            if not create:
                # An existing store only (mode=rw, or ro): a reader never creates or
                # changes one.
                mode, timeout = ("ro", READ_TIMEOUT_S) if read_only else ("rw", BUSY_TIMEOUT_S)
                self.db = sqlite3.connect(
                    f"file:{quote(str(self.path))}?mode={mode}",
                    uri=True,
                    timeout=timeout,
                    isolation_level=None,
                    check_same_thread=False,
                )
                _readable(self.db)
            else:
                _create(self.path)
                self.db = _connect(self.path, BUSY_TIMEOUT_S)
                _use_wal(self.db)
                self.db.executescript(_SCHEMA)
                _add_image_url(self.db)
        self._local, self._readers_lock = threading.local(), threading.Lock()
        self._readers: list[sqlite3.Connection] = []

    def close(self) -> None:
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self.db.close()

    def connect(self) -> sqlite3.Connection:
        """Another connection to the store, for a thread of its own."""
        return _connect(self.path, BUSY_TIMEOUT_S)

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self.connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @property
    def imported(self) -> bool:
        return self.db.execute("SELECT 1 FROM meta WHERE key = 'imported'").fetchone() is not None

    @contextlib.contextmanager
    def transaction(self, action: str, conn: sqlite3.Connection | None = None) -> Iterator[Tx]:
        """BEGIN IMMEDIATE ... COMMIT (durable on return); rolled back on any error.

        Raises DiskError when the database cannot be written (or another writer holds it
        for longer than BUSY_TIMEOUT_S).
        """
        db = conn or self.db
        with as_disk_error(action):
            db.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(db)
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise

    def completed(self, request_id: str, image_id: str) -> Recorded | None:
        """The task's completed record, if any (read from any thread). Raises DiskError."""
        with as_disk_error("reading the results store"):
            row = self._reader().execute(_COMPLETED, (request_id, image_id)).fetchone()
        return None if row is None else (row[0], row[1])

    def recent(self, count: int, conn: sqlite3.Connection | None = None) -> list[dict[str, Any]]:
        """The latest `count` records, oldest first."""
        rows = (conn or self.db).execute(
            f"SELECT * FROM ({_select('ORDER BY id DESC LIMIT ?')}) ORDER BY id", (count,)
        )
        return [as_dict(row[1:]) for row in rows]

    def get(self, request_id: str, image_id: str | None = None) -> list[dict[str, Any]]:
        """Every record of a request, or of one image of it, oldest first. Raises DiskError."""
        with as_disk_error("reading the results store"):
            if image_id is None:
                rows = self.db.execute(_select("WHERE request_id = ? ORDER BY id"), (request_id,))
            else:
                where = "WHERE request_id = ? AND image_id = ? ORDER BY id"
                rows = self.db.execute(_select(where), (request_id, image_id))
            return [as_dict(row[1:]) for row in rows]

    def export(
        self,
        since: str | None = None,
        until: str | None = None,
        request_id: str | None = None,
        status: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Matching records, oldest first, read in steps (constant memory).

        `since` (inclusive) and `until` (exclusive) compare with the ISO timestamps; the
        first record at or after `since` is found by bisecting `id`, which follows
        commit order.
        """
        conditions, params = ["id > ?"], []
        if until is not None:
            conditions.append("timestamp < ?")
            params.append(until)
        if request_id is not None:
            conditions.append("request_id = ?")
            params.append(request_id)
        if status is not None:
            conditions.append("status = ?")
            params.append(status)
        query = _select(f"WHERE {' AND '.join(conditions)} ORDER BY id LIMIT {EXPORT_STEP}")
        with as_disk_error("reading the results store"):
            after = self._first_at(since) - 1 if since is not None else 0
        while True:
            with as_disk_error("reading the results store"):
                rows = self.db.execute(query, (after, *params)).fetchall()
            for row in rows:
                if since is None or row[1] >= since:
                    yield as_dict(row[1:])
            if len(rows) < EXPORT_STEP:
                return
            after = rows[-1][0]

    def _first_at(self, since: str) -> int:
        """The smallest id whose record is at or after `since` (bisection over ids)."""
        low, high = self.db.execute("SELECT min(id), max(id) FROM records").fetchone()
        if low is None:
            return 0
        high += 1
        while low < high:
            mid = (low + high) // 2
            row = self.db.execute(
                "SELECT id, timestamp FROM records WHERE id >= ? ORDER BY id LIMIT 1", (mid,)
            ).fetchone()
            if row is None or row[1] >= since:
                high = mid
            else:
                low = row[0] + 1
        return int(low)

    def prune(self, before: str, conn: sqlite3.Connection | None = None) -> int:
        """Delete those of the PRUNE_STEP oldest records that are older than `before`, and
        the minutes before it; how many records. Only the oldest are looked at (commit
        order is time order), so a step costs the same however long the history."""
        with self.transaction("pruning old records", conn) as tx:
            tx.db.execute("DELETE FROM minutes WHERE minute < ?", (before[:MINUTE],))
            return tx.db.execute(
                "DELETE FROM records WHERE id IN (SELECT id FROM"
                " (SELECT id, timestamp FROM records ORDER BY id LIMIT ?) WHERE timestamp < ?)",
                (PRUNE_STEP, before),
            ).rowcount

    def minutes(self, since: str) -> list[tuple[str, int, int]]:
        """(minute, completed, failed) from the minute of `since` on, oldest first; none
        from a store that predates the table. Raises DiskError."""
        with as_disk_error("reading the minutes"):
            try:
                rows = self.db.execute(
                    "SELECT minute, completed, failed FROM minutes WHERE minute >= ?"
                    " ORDER BY minute",
                    (since[:MINUTE],),
                ).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" not in str(exc):
                    raise
                return []
        return [(str(m), int(c), int(f)) for m, c, f in rows]

    def counts(self) -> dict[str, int]:
        """Records in the store. Raises DiskError."""
        with as_disk_error("counting records"):
            (total,) = self.db.execute("SELECT count(*) FROM records").fetchone()
        return {"total": int(total)}


class Tx:
    """The statements of one write transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[Callable[[], None]]:
        """A nested step; the callable it yields undoes what the step did so far."""
        self.db.execute("SAVEPOINT step")

        def undo() -> None:
            self.db.execute("ROLLBACK TO step")

        try:
            yield undo
        finally:
            self.db.execute("RELEASE step")

    def completed(self, request_id: str, image_id: str) -> Recorded | None:
        """The task's completed record, if any."""
        row = self.db.execute(_COMPLETED, (request_id, image_id)).fetchone()
        return None if row is None else (row[0], row[1])

    def insert(self, record: Record) -> None:
        self.db.execute(_INSERT, record.row())

    def count_minute(self, stamp: str, completed: int, failed: int) -> None:
        """Add records inserted with timestamp `stamp` to the counts of its minute."""
        if completed or failed:
            self.db.execute(
                "INSERT INTO minutes VALUES (?, ?, ?) ON CONFLICT (minute) DO UPDATE SET"
                " completed = completed + excluded.completed, failed = failed + excluded.failed",
                (stamp[:MINUTE], completed, failed),
            )

    def claimed(self, final: str) -> bool:
        """Whether a recorded move still targets this path."""
        return bool(self.db.execute("SELECT 1 FROM moves WHERE final = ?", (final,)).fetchone())

    def add_move(self, writer: str, temp: str, final: str) -> None:
        self.db.execute("INSERT INTO moves VALUES (?, ?, ?)", (writer, temp, final))

    def moves(self, writer: str | None = None, final: str | None = None) -> list[tuple[str, ...]]:
        """(writer, temp, final) of the moves of a writer, or of the move to a path."""
        column, value = ("writer", writer) if writer is not None else ("final", final)
        rows = self.db.execute(f"SELECT * FROM moves WHERE {column} = ?", (value,))
        return [tuple(map(str, row)) for row in rows]

    def forget_moves(self, writer: str) -> None:
        self.db.execute("DELETE FROM moves WHERE writer = ?", (writer,))

    def insert_rows(self, rows: Iterable[Sequence[str | None]]) -> None:
        """Insert rows of FIELDS as they are (an import of earlier results)."""
        self.db.executemany(_INSERT, rows)

    def mark_imported(self) -> None:
        """Build the index (faster after inserting than while) and mark the store as
        having taken in the earlier results files."""
        self.db.execute(_INDEX)
        self.db.execute("INSERT INTO meta VALUES ('imported', datetime('now'))")


def records_in(directory: Path) -> int | None:
    """How many records the store of `directory` holds; None when it has none yet."""
    try:
        with contextlib.closing(Store(directory, create=False)) as store:
            return store.counts()["total"]
    except DiskError:
        return None
