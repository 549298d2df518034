"""Taking over an OUTPUT_DIR of an earlier version, once.

Its results.json and the results.<UTC YYYYMMDDTHHMMSS>.json archives rotated from it are
imported into the store in one transaction (so that of several processes starting
together only one does it, and a process killed half way leaves the store as it was:
the next start imports everything again). results.json is first renamed like an
archive; archives are kept and never read again. The earlier design's leftovers are
removed: its temp files, and JPEGs its lock file names that no record references.
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
from returner.output import RESULTS, OutputDir, discard, fsync_dir, process_alive
from returner.results import Store

log = logging.getLogger(__name__)

_ARCHIVE = re.compile(r"results\.\d{8}T\d{6}(?:_\d+)?\.json")
_JPEG = re.compile(r"[^/]+_\d{8}_\d{6}(?:_\d+)?\.jpg")
_TEMP = re.compile(r"\.(\d+)-[0-9a-f]{32}\.tmp")


def upgrade(out: OutputDir, store: Store, notes: list[str]) -> None:
    """Import the earlier results files of `out` and remove the earlier design's
    leftovers; `notes` are the JPEG names its lock file held. Raises DiskError (a file
    that is not a JSON array names itself)."""
    started = time.perf_counter()
    total = store.import_records(lambda: _archives(out))
    if total:
        rate = total / max(time.perf_counter() - started, 1e-9)
        log.info("imported %d earlier records (%.0f/s)", total, rate)
    _remove_leftovers(out, store, notes)


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


def _remove_leftovers(out: OutputDir, store: Store, notes: list[str]) -> None:
    for name in filter(_JPEG.fullmatch, notes):
        if not store.references(str(out.path / name)):
            log.warning("removing orphan %s (its writer died before recording it)", name)
            discard(out.here(name))
    for entry in os.scandir(out.root):
        match = _TEMP.fullmatch(entry.name)
        if match and entry.is_file(follow_symlinks=False) and not process_alive(int(match[1])):
            discard(entry.path)
