"""JPEGs as objects in an object store (OBJECT_STORE_URL): the second `Output`.

A JPEG is staged by creating its object with a conditional create (If-None-Match: *)
under the key a local file would have: PREFIX/ + `{image_id}_{YYYYMMDD_HHMMSS}.jpg`
(under `YYYY-MM-DD/` with the daily layout), from the stream entry, so a redelivery
tries the same key. The object's metadata names the request, the image and the stream
entry. A key that is taken holds either this entry's object (an earlier delivery, or a
PUT that timed out but was stored: it counts as uploaded) or another task's (a suffix
is tried, as for a local name): no task ever overwrites another's object.

Placing is nothing more (the key is the record's), so the record is committed once the
object exists, and acked after. An object that no record holds is removed: at once when
a commit finds its task completed already; and, for an entry an earlier delivery may
have staged before it crashed, by every delivery of it that does not complete (a
duplicate, a failure, one given up after MAX_DELIVERIES), which finds that entry's
objects by listing its name and reading their metadata.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from pathlib import PurePath

from returner.files import entry_time, file_name
from returner.objectstore import ObjectStore
from returner.output import Placed
from returner.store import Store, Tx
from returner.task import Outcome, Staged, echo

SUFFIXES = 1000  # keys tried for one frame before the task is given up as unplaceable


class Objects:
    """The objects of one bucket and prefix, through one pooled client."""

    forgets = True

    def __init__(self, store: ObjectStore, daily: bool = False) -> None:
        self.store, self.daily = store, daily

    def stage(self, data: bytes, outcome: Outcome) -> Staged:
        entry = outcome.entry
        meta = {"request-id": outcome.request_id or "", "image-id": outcome.image_id or ""}
        meta["entry-id"] = entry.id
        digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
        for suffix in range(SUFFIXES):
            key = self.store.key_for(self._name(outcome, suffix))
            if self.store.put_new(key, data, meta) or self._ours(key, entry.id, digest, data):
                return Staged(key, len(data), self.store.url_for(key))
        raise ValueError(f"no free key for {echo(outcome.image_id)}")

    def _ours(self, key: str, entry_id: str, digest: str, data: bytes) -> bool:
        """Whether the object at a taken key is this entry's, as this delivery encoded it:
        the same frame stored by an earlier delivery, or by a PUT that timed out. One of
        this entry's with other bytes (encoded with other settings) is replaced. Raises
        ObjectStoreUnavailable."""
        info = self.store.head(key)
        if info is None or info.metadata.get("entry-id") != entry_id:
            return False  # another task's (or gone since): the next key
        if info.md5_hex is None or info.md5_hex == digest:
            return True
        self.store.delete(key)
        meta = {"request-id": info.metadata.get("request-id", ""), "entry-id": entry_id}
        meta["image-id"] = info.metadata.get("image-id", "")
        return self.store.put_new(key, data, meta)

    def _name(self, outcome: Outcome, suffix: int) -> str:
        millis = outcome.entry.millis
        day = entry_time(millis).strftime("%Y-%m-%d/") if self.daily else ""
        return day + file_name(outcome.image_id or "", millis, suffix)

    def check(self) -> None:
        self.store.check()

    def begin(self, tx: Tx) -> None:
        return None

    def place(self, tx: Tx, staged: Staged, image_id: str, millis: int) -> Placed:
        return Placed(None, staged.url or self.store.url_for(staged.ref))

    def ensure(self, tx: Tx, recorded: str) -> None:
        return None

    def finish(self, placed: list[tuple[Staged, Placed]]) -> None:
        return None

    def discard(self, staged: Staged) -> None:
        self.store.delete(staged.ref)

    def abandon(self, staged: Staged) -> None:
        return None  # the retry finds it as its own

    def forget(self, outcome: Outcome, recorded_url: str | None) -> None:
        """Remove the objects of this entry that an earlier delivery staged, but the one
        the task's completed record holds. Raises ObjectStoreUnavailable."""
        if outcome.image_id is None:
            return  # nothing was staged for a task without ids
        for key in self._named(outcome):
            if self.store.url_for(key) == recorded_url:
                continue
            info = self.store.head(key)
            if info is not None and info.metadata.get("entry-id") == outcome.entry.id:
                self.store.delete(key)

    def _named(self, outcome: Outcome) -> list[str]:
        """The keys under this entry's name, whatever their suffix."""
        stem = PurePath(self._name(outcome, 0)).name.removesuffix(".jpg")
        prefix = self.store.key_for(self._name(outcome, 0)).removesuffix(".jpg")
        shape = re.compile(re.escape(stem) + r"(?:_\d+)?\.jpg")
        return [k for k in self.store.keys(prefix) if shape.fullmatch(k.rsplit("/", 1)[-1])]

    def sweep(self, store: Store, conn: sqlite3.Connection) -> None:
        return None

    def close(self, store: Store) -> bool:
        self.store.close()
        return True
