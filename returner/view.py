"""`results.json`, the seed's view of the results: the latest RESULTS_JSON_ENTRIES
records, oldest first, replaced by rename so that a reader always sees a whole document.

It is written under an flock of `.results.lock`, so that several processes never
rename an older selection over a newer one, and never fsynced: it is rebuilt from the
store at every start.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time

from returner.files import OutputDir, discard, disk_error, try_lock, write_file
from returner.store import Store, as_disk_error

RESULTS = "results.json"
LOCK = ".results.lock"


class View:
    """`results.json` of one OUTPUT_DIR: the latest `entries` records."""

    def __init__(self, out: OutputDir, entries: int) -> None:
        """Raises DiskError when the lock file cannot be opened."""
        self.out, self.entries = out, entries
        self.path = out.here(RESULTS)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
        try:
            self._lock_fd = os.open(out.here(LOCK), flags, 0o600)
            os.fchmod(self._lock_fd, 0o600)  # private, as an earlier version may not have left it
        except OSError as exc:
            raise disk_error(f"opening {LOCK}", exc) from exc

    def close(self) -> None:
        os.close(self._lock_fd)

    def write(self, store: Store, conn: sqlite3.Connection | None, wait_s: float = 0.0) -> bool:
        """Write the view unless another process is writing one; whether it was written.

        The selection is made under the lock, so a view never replaces a newer one.
        Raises DiskError.
        """
        if not self.entries:
            return True
        deadline = time.monotonic() + wait_s
        while not try_lock(self._lock_fd):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        try:
            with as_disk_error("reading the latest records"):
                records = store.recent(self.entries, conn)
            lines = ",\n".join(json.dumps(r) for r in records)
            temp = self.out.temp_path(".json")
            write_file(temp, f"[\n{lines}\n]\n".encode() if records else b"[]\n", sync=False)
            try:
                os.rename(temp, self.path)
            except OSError as exc:
                discard(temp)
                raise disk_error(f"replacing {RESULTS}", exc) from exc
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        return True
