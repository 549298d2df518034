"""Committing outcomes: each batch's records in one durable transaction, with the
placing of their JPEGs (see output.py), and the upkeep around it: the view at most a
second behind, retention in small steps, and sweeps for work that dead writers left.

A task that already has a completed record (perhaps from another process) is a
duplicate; that check is made inside the transaction, so two processes settling the
same task never both record it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from returner.errors import DiskError, TransientError
from returner.files import OutputDir
from returner.objectstore import ObjectStore
from returner.output import LocalFiles, Output, Placed
from returner.settings import Settings, object_store_config
from returner.store import Record, Recorded, Store, Tx, as_disk_error, timestamp
from returner.task import Decision, Kind, Outcome
from returner.view import View

# Logged under the name operators know these lines by.
log = logging.getLogger("returner.output")

# results.json is written at most once per VIEW_EVERY_S, on a tick of the upkeep thread:
# a commit shows in it within VIEW_EVERY_S + TICK_S (1 s). Each version reaches the disk
# (ext4 writes a file renamed over another back at once), so this bounds its cost.
VIEW_EVERY_S, TICK_S = 0.8, 0.2
SWEEP_EVERY_S = 5.0  # look for writers that died with moves to finish
PRUNE_IDLE_S = 60.0  # between looks for old records once retention has caught up
LOCK_WAIT_S = 5.0  # the view's lock, at start and stop


class Committer:
    """The results of one OUTPUT_DIR for one process: the store, the output its JPEGs
    go to, the view, and the thread that keeps them."""

    def __init__(
        self, out: OutputDir, store: Store, output: Output, view: View, retention_days: int = 0
    ) -> None:
        self.out, self.store, self.output, self.view = out, store, output, view
        self.retention_days = retention_days
        self._dirty = False  # committed since the view was last written
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def at(
        cls,
        directory: Path,
        layout: str = "flat",
        view_entries: int = 1000,
        retention_days: int = 0,
        output: Callable[[OutputDir], Output] = LocalFiles,
    ) -> Committer:
        """The results of `directory`, JPEGs in `output` (made for the directory; files
        in it by default). Raises SettingsError (a directory others could change, an
        object store it cannot use) or DiskError."""
        out = OutputDir(directory, layout)
        store = Store(out.root)
        return cls(out, store, output(out), View(out, view_entries), retention_days)

    @classmethod
    def from_settings(cls, settings: Settings) -> Committer:
        """The results as the settings describe them: JPEGs in OUTPUT_DIR, or in the
        object store of OBJECT_STORE_URL. Raises SettingsError or DiskError."""
        config = object_store_config(settings)

        def output(out: OutputDir) -> Output:
            if config is None:
                return LocalFiles(out, settings.public_base_url)
            from returner.objects import Objects  # the s3 extra's libraries load here

            return Objects(ObjectStore(config), daily=settings.output_layout == "daily")

        s = settings
        return cls.at(
            s.output_dir, s.output_layout, s.results_json_entries, s.results_retention_days, output
        )

    def open(self) -> None:
        """Finish dead writers' work, write the view, and start the upkeep thread.
        Raises DiskError."""
        self.output.sweep(self.store, self.store.db)
        self.view.write(self.store, None, LOCK_WAIT_S)
        # Connected here, so that a failure stops open() instead of killing the thread:
        # SQLite opens by the name /proc/self/fd resolves to, and a rename of OUTPUT_DIR
        # in the middle of connecting fails it.
        with as_disk_error("opening the results store"):
            conn = self.store.connect()
        self._thread = threading.Thread(
            target=self._maintain, args=(conn,), name="results", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the thread, write the view a last time (if `open` got as far as writing
        it a first time), and let go."""
        self._stop.set()
        opened = self._thread is not None
        if self._thread is not None:
            self._thread.join()
        if opened:
            with contextlib.suppress(DiskError):
                self.view.write(self.store, None, LOCK_WAIT_S)
        done = self.output.close(self.store)
        self.store.close()
        self.view.close()
        self.out.close(remove_temps=done)

    def is_completed(self, key: tuple[str, str] | None) -> bool:
        """Whether the task has a completed record (from any thread). Raises DiskError."""
        return self.recorded(key) is not None

    def recorded(self, key: tuple[str, str] | None) -> Recorded | None:
        """The task's completed record, if any (from any thread). Raises DiskError."""
        return None if key is None else self.store.completed(*key)

    def commit(self, outcomes: list[Outcome]) -> list[Decision]:
        """Record the outcomes in one transaction, then put their JPEGs in place.

        Raises DiskError: before the commit nothing is recorded (and the output keeps or
        drops the batch's JPEGs, as a retry needs them); after it, the records stand and
        a retry finds them completed. A JPEG that turned out not to be needed and could
        not be discarded leaves its delivery pending (PAUSE): its next delivery does it.
        """
        stamp = timestamp()
        try:
            with self.store.transaction("committing results") as tx:
                self.output.begin(tx)
                decisions = [self._decide_alone(tx, outcome, stamp) for outcome in outcomes]
                kinds = Counter(d.kind for d in decisions)  # the minutes the console charts
                failed = kinds[Kind.FAILED] + kinds[Kind.DEAD_LETTERED]
                tx.count_minute(stamp, kinds[Kind.COMPLETED], failed)
        except DiskError:
            for outcome in outcomes:
                if outcome.staged is not None:
                    self.output.abandon(outcome.staged)
            raise
        placed = []
        for d in decisions:
            if d.kind is Kind.COMPLETED and d.outcome.staged is not None and d.image_url:
                placed.append((d.outcome.staged, Placed(d.file_path, d.image_url)))
        self.output.finish(placed)
        self._dirty = True
        return [self._discard_unneeded(d) for d in decisions]

    def _discard_unneeded(self, decision: Decision) -> Decision:
        staged = decision.outcome.staged
        if staged is None or decision.kind is Kind.COMPLETED:
            return decision
        try:
            self.output.discard(staged)
        except TransientError as exc:
            log.warning(
                "could not discard the JPEG of entry %s: %s", decision.outcome.entry.id, exc
            )
            decision.outcome.pause(exc)
            return dataclasses.replace(decision, kind=Kind.PAUSE)
        return decision

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
        if outcome.staged is not None:
            self.output.abandon(outcome.staged)
            outcome.staged = None
        return Decision(outcome, Kind.RETRY, stamp)

    def _decide(self, tx: Tx, outcome: Outcome, stamp: str) -> Decision:
        if not outcome.kind.settles:
            return Decision(outcome, outcome.kind, stamp)
        key = outcome.key
        recorded = tx.completed(*key) if key else None
        if recorded is not None or outcome.kind is Kind.DUPLICATE:
            return self._duplicate(tx, outcome, stamp, recorded)
        entry = outcome.entry
        if outcome.kind is Kind.COMPLETED:
            assert outcome.staged is not None and key is not None
            at = self.output.place(tx, outcome.staged, key[1], entry.millis)
            path = str(at.file_path) if at.file_path else None
            tx.insert(Record(stamp, *key, path, at.image_url, "completed", None, entry.id))
            return Decision(outcome, Kind.COMPLETED, stamp, at.file_path, at.image_url)
        error = outcome.error or "failed"
        ids = outcome.request_id, outcome.image_id
        tx.insert(Record(stamp, *ids, None, None, "failed", error, entry.id))
        return Decision(outcome, outcome.kind, stamp)

    def _duplicate(
        self, tx: Tx, outcome: Outcome, stamp: str, recorded: Recorded | None
    ) -> Decision:
        """A task completed before: its event carries the earlier record's JPEG, which
        must be in place; a JPEG this delivery staged is not needed, unless it is that
        one (another delivery of the same entry found it)."""
        path, url = recorded or (None, None)
        if path:
            self.output.ensure(tx, path)
        if outcome.staged is not None and url is not None and outcome.staged.url == url:
            outcome.staged = None
        return Decision(outcome, Kind.DUPLICATE, stamp, Path(path) if path else None, url)

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
            before = timestamp(datetime.now(UTC) - timedelta(days=self.retention_days))
            deleted = self.store.prune(before, conn)
            due["prune"] = now + (TICK_S if deleted else PRUNE_IDLE_S)
            if deleted:
                log.info("retention: deleted %d records older than %s", deleted, before)
        if now >= due["sweep"]:
            due["sweep"] = now + SWEEP_EVERY_S
            self.output.sweep(self.store, conn)
