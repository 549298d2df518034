"""Taking over an OUTPUT_DIR of the seed module or an earlier version, once, before
the results open.

Its results.json and the results.<UTC YYYYMMDDTHHMMSS>.json archives rotated from it are
imported into the store in one transaction (so that of several processes starting
together only one does it, and a process killed half way leaves the store as it was:
the next start imports everything again). results.json is first renamed like an
archive; archives are kept and never read again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from returner.errors import DiskError
from returner.files import OutputDir, fsync_dir
from returner.store import BUSY_TIMEOUT_S, Store, timestamp
from returner.view import RESULTS

log = logging.getLogger(__name__)

# The import is one transaction; other processes starting meanwhile wait this long.
IMPORT_WAIT_S = 600.0
_ARCHIVE = re.compile(r"results\.\d{8}T\d{6}(?:_\d+)?\.json")


def take_over(out: OutputDir, store: Store) -> None:
    """Import the earlier results files of `out` unless done already. Raises DiskError
    (a file that is not a JSON array names itself)."""
    if store.imported:
        return
    started = time.perf_counter()
    total = _import(out, store)
    if total:
        rate = total / max(time.perf_counter() - started, 1e-9)
        log.info("imported %d earlier records (%.0f/s)", total, rate)


def _import(out: OutputDir, store: Store) -> int:
    """Take in every archive in one transaction, then index; the records taken in.
    Only if no other process has done it meanwhile."""
    total = 0
    store.db.execute(f"PRAGMA busy_timeout = {int(IMPORT_WAIT_S * 1000)}")
    try:
        with store.transaction("importing earlier results") as tx:
            if store.imported:  # another process did it while we waited
                return 0
            for name, records in _archives(out):
                rows = [legacy_row(r) for r in records if isinstance(r, dict)]
                tx.insert_rows(rows)
                total += len(rows)
                log.info("imported %d records from %s (%d so far)", len(rows), name, total)
            tx.mark_imported()
    finally:
        store.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    return total


def _archives(out: OutputDir) -> Iterator[tuple[str, list[Any]]]:
    path = out.here(RESULTS)
    if path.is_file() and not path.is_symlink():
        archive = _archive_name(out)
        os.rename(path, archive)
        fsync_dir(out.root)
        log.info("kept the earlier results.json as %s", archive.name)
    for archive in sorted(p for p in out.root.iterdir() if _ARCHIVE.fullmatch(p.name)):
        yield _read(archive)


def _archive_name(out: OutputDir) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    for n in range(1000):
        archive = out.here(f"results.{stamp}{f'_{n}' if n else ''}.json")
        if not os.path.lexists(archive):
            return archive
    raise DiskError("no free name to archive results.json")


def _read(path: Path) -> tuple[str, list[Any]]:
    try:
        records = json.loads(path.read_bytes())
    except ValueError as exc:
        raise DiskError(f"{path.name} is not valid JSON ({exc}); move it aside") from None
    except OSError as exc:
        raise DiskError(f"reading {path.name}: {exc.strerror}") from None
    if not isinstance(records, list):
        raise DiskError(f"{path.name} is not a JSON array; move it aside")
    return path.name, records


def legacy_row(record: dict[str, Any]) -> tuple[str | None, ...]:
    """An entry of an earlier results.json as a row of the store (entry_id unknown)."""
    status = "completed" if record.get("status") == "completed" else "failed"
    return (
        utc_timestamp(_as_text(record.get("timestamp")) or ""),
        _as_text(record.get("request_id")),
        _as_text(record.get("image_id")),
        _as_text(record.get("file_path")),
        _as_text(record.get("image_url")),
        status,
        None if status == "completed" else _as_text(record.get("error")) or "failed",
        None,
    )


def utc_timestamp(value: str) -> str:
    """An earlier version's timestamp as the store writes them: UTC, with microseconds.

    The seed wrote local time without an offset: taken as this host's local time. A
    value that is not ISO-8601 is kept as it is.
    """
    if len(value) == 32 and value.endswith("+00:00"):
        return value  # already so
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    return timestamp(moment)


def _as_text(value: Any) -> str | None:
    """A legacy JSON value as the text a record holds (a number is written out)."""
    return value if isinstance(value, str) else None if value is None else str(value)
