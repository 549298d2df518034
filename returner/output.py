"""Where a JPEG goes, behind one small interface the commit drives: `Output`.

An output *stages* an encoded JPEG on an I/O thread (durable, but under no final name
and in no record yet), *places* it inside the commit's transaction (the name its record
will hold), and *finishes* the placing once that transaction is durable. A JPEG that
turns out not to be needed (a duplicate, a rolled-back commit) is *discarded*.

`LocalFiles` is the output for files in OUTPUT_DIR. A JPEG is written and fsynced under
a temp name in this process's own directory `.tmp/<writer>/`, which it holds an flock
on while it lives. The commit records, with the outcomes, the moves that will put each
JPEG under its final name; only after that transaction is durable are the files renamed
and their directory fsynced. So no JPEG ever has its final name without a record, and a
record whose file is still at its temp name has a move row that anyone can finish: a
process that dies in between has its moves finished, and its temp files removed, by
the next process that sweeps `.tmp/` (at start, and every few seconds while running).
Start-up work grows with the number of writers, not with the number of JPEGs. The
moves table holds paths relative to OUTPUT_DIR; records hold absolute ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Protocol
from urllib.parse import quote

from returner.errors import DiskError
from returner.files import (
    OutputDir,
    discard,
    disk_error,
    file_name,
    move_all,
    remove_tree,
    write_file,
)
from returner.store import Store, Tx
from returner.task import Outcome, Staged, echo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placed:
    """Where a committed JPEG is: the record's file_path (None for an object) and its
    image_url."""

    file_path: Path | None
    image_url: str


class Output(Protocol):
    """Where JPEGs go. `stage` and `forget` run on I/O threads, the rest on the
    committing thread."""

    # Whether a redelivery that does not complete must `forget` what an earlier delivery
    # of its entry may have staged (a crash between staging and committing).
    forgets: bool

    def stage(self, data: bytes, outcome: Outcome) -> Staged:
        """Put an encoded JPEG where it goes, durably, under no record yet. Raises a
        TransientError when the output fails."""

    def check(self) -> None:
        """At start: refuse what can never work (SettingsError, one line); a failing but
        usable output is a TransientError."""

    def begin(self, tx: Tx) -> None:
        """The first step of every commit's transaction."""

    def place(self, tx: Tx, staged: Staged, image_id: str, millis: int) -> Placed:
        """Inside the commit: where a staged JPEG is for its record."""

    def ensure(self, tx: Tx, recorded: str) -> None:
        """Inside the commit of a duplicate: make sure the JPEG its earlier record holds
        is in place (another process may have died placing it)."""

    def finish(self, placed: list[tuple[Staged, Placed]]) -> None:
        """After the commit is durable: complete the placing. Raises DiskError."""

    def discard(self, staged: Staged) -> None:
        """After the commit: remove a staged JPEG that no record holds. Raises a
        TransientError."""

    def abandon(self, staged: Staged) -> None:
        """A staged JPEG whose commit failed: remove it, or keep it for the retry."""

    def forget(self, outcome: Outcome, recorded_url: str | None) -> None:
        """Remove what an earlier delivery of the outcome's entry staged, but the JPEG of
        `recorded_url`. Raises a TransientError."""

    def sweep(self, store: Store, conn: sqlite3.Connection) -> None:
        """Complete what processes that died left half done."""

    def close(self, store: Store) -> bool:
        """Let go; whether nothing staged here is still needed (this process's temp
        directory may go)."""


class LocalFiles:
    """JPEG files in OUTPUT_DIR (its layout flat or daily); their image_url is
    `public_base_url/` + the path relative to OUTPUT_DIR, else a file:// URL."""

    forgets = False  # a dead writer's temp files are swept instead

    def __init__(self, out: OutputDir, public_base_url: str | None = None) -> None:
        self.out, self.public_base_url = out, public_base_url
        self._placed = True  # the moves of our last commit are done

    def stage(self, data: bytes, outcome: Outcome | None = None) -> Staged:
        temp = self.out.temp_path()
        write_file(temp, data)
        return Staged(str(temp), len(data))

    def check(self) -> None:
        return None  # OUTPUT_DIR was checked when it was opened

    def begin(self, tx: Tx) -> None:
        if self._placed:
            tx.forget_moves(self.out.writer)
        else:  # the renames after our last commit failed: do them now
            self._finish(tx, self.out.writer)

    def place(self, tx: Tx, staged: Staged, image_id: str, millis: int) -> Placed:
        name = self._free_name(tx, image_id, millis)
        tx.add_move(self.out.writer, str(self.out.inside(staged.ref)), str(name))
        return Placed(self.out.path / name, self.url_for(name))

    def url_for(self, name: PurePath) -> str:
        """The image_url of the JPEG at `name` (relative to OUTPUT_DIR)."""
        if self.public_base_url:
            return f"{self.public_base_url}/{quote(name.as_posix())}"
        return (self.out.path / name).as_uri()

    def ensure(self, tx: Tx, recorded: str) -> None:
        # Ours are all of this transaction, which renames them itself once committed.
        target = self.out.inside(recorded)
        if target:
            moves = tx.moves(final=str(target))
            self._move([m for m in moves if m[0] != self.out.writer])

    def finish(self, placed: list[tuple[Staged, Placed]]) -> None:
        self._placed = False
        moves = [
            (Path(staged.ref), self.out.here(at.file_path.relative_to(self.out.path)))
            for staged, at in placed
            if at.file_path is not None
        ]
        try:
            move_all(moves)
        except OSError as exc:
            raise disk_error("moving JPEGs into place", exc) from exc
        self._placed = True

    def discard(self, staged: Staged) -> None:
        discard(staged.ref)

    def abandon(self, staged: Staged) -> None:
        discard(staged.ref)

    def forget(self, outcome: Outcome, recorded_url: str | None) -> None:
        return None

    def sweep(self, store: Store, conn: sqlite3.Connection) -> None:
        """Finish the moves of writers that died, and remove their temp files."""
        for writer in self.out.dead_writers():
            with store.transaction("finishing a dead writer's moves", conn) as tx:
                self._finish(tx, writer)
            remove_tree(self.out.temps_root / writer)
            log.info("finished the work of a writer that died (%s)", writer)

    def close(self, store: Store) -> bool:
        """Forget our finished moves: nothing in our temp directory is needed then.
        After a failed rename both stay, for the next sweep."""
        if self._placed:
            with (
                contextlib.suppress(DiskError),
                store.transaction("closing the results store") as tx,
            ):
                tx.forget_moves(self.out.writer)
        return self._placed

    def _free_name(self, tx: Tx, image_id: str, millis: int) -> PurePath:
        """A free name in OUTPUT_DIR (relative to it). A name that exists, or that a
        recorded move will create, belongs to another task: a suffix, not overwriting."""
        directory = self.out.directory_for(millis)
        for suffix in range(1_000_000):
            candidate = directory / file_name(image_id, millis, suffix)
            if not os.path.lexists(self.out.here(candidate)) and not tx.claimed(str(candidate)):
                return candidate
        raise DiskError(f"no free file name for {echo(image_id)}")

    def _move(self, moves: list[tuple[str, ...]]) -> None:
        """Finish recorded moves (writer, temp, final) and make them durable."""
        move_all([(self.out.here(temp), self.out.here(final)) for _, temp, final in moves])

    def _finish(self, tx: Tx, writer: str) -> None:
        """Finish a writer's recorded moves and forget them."""
        self._move(tx.moves(writer))
        tx.forget_moves(writer)
