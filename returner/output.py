"""Files in OUTPUT_DIR: safe JPEG names, atomic writes, and the results log.

Every change is temp file -> fsync -> rename -> directory fsync. JPEGs get their
final name only inside `ResultsLog.commit`, under the same flock that guards
`results.json`, so a JPEG never becomes visible without the entry that references
it except between the two renames. Each JPEG name is noted in the lock file before
its rename and the note is cleared once results.json references it: whoever takes
the lock next removes the JPEGs of a writer that died in between, even if that
writer never starts again. `ResultsLog.open` also sweeps the whole directory.

A commit rewrites results.json whole, which is megabytes late in a rotation cycle.
So after each commit the next version is written ahead, on a thread of its own, up to
the entries it already holds; the next commit only appends its own entries to it,
fsyncs and renames it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from returner.errors import DiskError
from returner.task import Kind, Outcome

log = logging.getLogger(__name__)

RESULTS = "results.json"
LOCK = ".results.lock"
_ROTATED = re.compile(r"results\.\d{8}T\d{6}(?:_\d+)?\.json")
_OURS = re.compile(r".+_\d{8}_\d{6}(?:_\d+)?\.jpg")
_TEMP = re.compile(r"\.(\d+)-[0-9a-f]{32}\.tmp")
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
# 255 bytes in all: stem + "_YYYYMMDD_HHMMSS" + "_NNNNNN" suffix room + ".jpg"
STEM_MAX = 255 - 16 - 7 - 4
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}
# results.json is written ahead once its entries take this much; a smaller file is
# written whole by the commit, at little cost.
WRITE_AHEAD_MIN_BYTES = 256 * 1024


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


def file_name(image_id: str, millis: int, suffix: int = 0) -> str:
    """`{image_id}_{YYYYMMDD_HHMMSS}[_{n}].jpg`, the time being the stream entry's (UTC)."""
    stamp = datetime.fromtimestamp(millis / 1000, UTC).strftime("%Y%m%d_%H%M%S")
    tail = f"_{suffix}" if suffix else ""
    return f"{safe_stem(image_id)}_{stamp}{tail}.jpg"


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _disk_error(action: str, exc: OSError) -> DiskError:
    return DiskError(f"{action}: {exc.strerror or exc}")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, chunks: Iterable[bytes | bytearray]) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]


def _create(path: Path, chunks: Iterable[bytes | bytearray], sync: Callable[[int], None]) -> int:
    """Create `path` (a new dot-file) with the chunks and `sync` it; its descriptor, open.

    Raises DiskError, saying which step failed; a file it created is removed first.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise _disk_error(f"creating {path.name}", exc) from exc
    try:
        _write_all(fd, chunks)
        sync(fd)
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise _disk_error(f"writing {path.name}", exc) from exc
    return fd


def write_durably(path: Path, *chunks: bytes | bytearray) -> None:
    """Create `path` (a new dot-file) with the chunks and fsync it. Raises DiskError."""
    os.close(_create(path, chunks, os.fsync))


class OutputDir:
    """OUTPUT_DIR itself: temp names, the JPEG temp files, and clean-up of leftovers."""

    def __init__(self, path: Path) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _disk_error(f"creating {path}", exc) from exc
        self.path = path.resolve()

    def temp_path(self) -> Path:
        return self.path / f".{os.getpid()}-{uuid.uuid4().hex}.tmp"

    def write_jpeg(self, data: bytes) -> Path:
        """Write an encoded JPEG to a fsynced temp file; its final name comes at commit."""
        temp = self.temp_path()
        write_durably(temp, data)
        return temp

    def discard(self, temp: Path | None) -> None:
        if temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)

    def stale_temps(self) -> Iterator[Path]:
        """Temp files whose writer process is gone."""
        for entry in os.scandir(self.path):
            match = _TEMP.fullmatch(entry.name)
            if match and not process_alive(int(match.group(1))):
                yield Path(entry.path)

    def our_jpegs(self) -> Iterator[str]:
        for entry in os.scandir(self.path):
            if _OURS.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                yield entry.name


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


@dataclass
class _Draft:
    """The next results.json, written ahead: `[` and the first `length` bytes of the
    body of `generation` (a body is only ever appended to until it is replaced)."""

    temp: Path
    generation: int
    length: int
    fd: Future[int]

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            os.close(self.fd.result())
        with contextlib.suppress(OSError):
            os.unlink(self.temp)


class ResultsLog:
    """`results.json` plus its rotated files, shared safely by several processes.

    The file is always a JSON array with one entry per line, so what this process
    wrote is reused byte for byte and no entry is ever re-encoded. Every commit
    runs under an flock on `.results.lock`; if another process wrote since our
    last commit, what it added is read first: writers only ever append to the body,
    so unless one rotated (then the first line differs too), the file on disk is our
    body plus the lines after it.
    """

    def __init__(self, out: OutputDir, max_entries: int) -> None:
        self.out = out
        self.max_entries = max_entries
        self.path = out.path / RESULTS
        self._body = bytearray()  # the entries of results.json, joined by ",\n"
        self._count = 0
        self._completed: set[tuple[str, str]] = set()
        self._rotated: set[str] = set()
        self._seen: tuple[int, int, int] | None = None
        self._moved: list[Outcome] = []  # JPEGs renamed by the commit under way
        self._flushed = 0  # how many of those are already in a written results file
        self._lock_fd = os.open(out.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        self._intent = 0  # bytes of JPEG names noted in the lock file, not yet recorded
        self._generation = 0  # counts the times _body was replaced rather than appended to
        self._draft: _Draft | None = None
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="results")

    def close(self) -> None:
        """Remove our draft and the temp files dead writers left; release the lock file."""
        self._drop_draft()
        self._ahead.shutdown()
        with contextlib.suppress(OSError), self._locked():
            for temp in self.out.stale_temps():
                self.out.discard(temp)
        os.close(self._lock_fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def open(self) -> None:
        """Load every results file and sweep orphans and stale temps. Raises DiskError."""
        with self._locked():
            referenced = self._refresh(collect_names=True)
            self._clear_intent()  # the sweep below covers a dead writer's renames
            self._sweep(referenced)

    def is_completed(self, key: tuple[str, str] | None) -> bool:
        return key is not None and key in self._completed

    def __len__(self) -> int:
        return self._count

    def commit(self, outcomes: Iterable[Outcome]) -> None:
        """Make the outcomes durable: name and move JPEGs, append entries, fsync.

        A completed or failed outcome whose task already has a completed entry
        (perhaps written by another process) becomes a duplicate. On DiskError the
        outcomes not yet written out are forgotten and their JPEGs removed; those
        written before a rotation stay recorded (a retry finds them completed).
        """
        with self._locked():
            self._refresh()
            self._remove_unrecorded()
            self._moved, self._flushed = [], 0
            rotated_before = set(self._rotated)
            try:
                for outcome in outcomes:
                    self._record(outcome)
                self._write()
            except (OSError, DiskError) as exc:
                # Outcomes written before a rotation are durable and stay recorded.
                self._undo(self._moved[self._flushed :], self._rotated - rotated_before)
                if isinstance(exc, DiskError):
                    raise
                raise _disk_error("committing results", exc) from exc
            self._write_ahead()

    def _record(self, outcome: Outcome) -> None:
        if outcome.kind is Kind.RETRY or outcome.kind is Kind.DUPLICATE:
            return
        if self.is_completed(outcome.key):
            self.out.discard(outcome.temp_path)
            outcome.kind, outcome.temp_path = Kind.DUPLICATE, None
            return
        if outcome.kind is Kind.COMPLETED:
            assert outcome.temp_path is not None
            final = self._free_name(outcome)
            self._note_intent(final.name)
            os.rename(outcome.temp_path, final)
            outcome.temp_path, outcome.file_path = None, final
            self._moved.append(outcome)
            self._completed.add((outcome.request_id, outcome.image_id))  # type: ignore[arg-type]
        self._append(json.dumps(outcome.as_record(now_iso())).encode())

    def _free_name(self, outcome: Outcome) -> Path:
        # A file that exists here belongs to a completed entry of another task (orphans
        # were swept at open), so it gets a suffix rather than being overwritten.
        for suffix in range(1_000_000):
            candidate = self.out.path / file_name(
                outcome.image_id or "", outcome.entry.millis, suffix
            )
            if not os.path.lexists(candidate):
                return candidate
        raise OSError(errno.EEXIST, "no free file name")

    def _append(self, line: bytes) -> None:
        self._add_line(line)
        if self._count >= self.max_entries:  # full: archive it now, start afresh
            self._rotate()

    def _add_line(self, line: bytes) -> None:
        if self._count:
            self._body += b",\n"
        self._body += line
        self._count += 1

    def _rotate(self) -> None:
        # Write out what this commit added so far, then hard-link: results.json exists
        # at every instant, and the fresh file replaces it by rename at the end of the
        # commit (a link left alone by a crash is recognised by its inode at open).
        self._write()
        self._flushed = len(self._moved)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        for n in range(1000):
            name = f"results.{stamp}{'_' + str(n) if n else ''}.json"
            try:
                os.link(self.path, self.out.path / name)
            except FileExistsError:
                continue
            self._rotated.add(name)
            self._replace_body([])
            log.info("rotated results.json to %s", name)
            return
        raise OSError(errno.EEXIST, "no free name to rotate results.json")

    def _replace_body(self, lines: list[bytes]) -> None:
        self._body, self._count = bytearray(b",\n".join(lines)), len(lines)
        self._generation += 1

    def _write_ahead(self) -> None:
        """Start writing the next results.json, up to the entries it already holds."""
        if self._count and len(self._body) >= WRITE_AHEAD_MIN_BYTES:
            temp, body = self.out.temp_path(), bytes(self._body)
            future = self._ahead.submit(_create, temp, (b"[\n", body), os.fdatasync)
            self._draft = _Draft(temp, self._generation, len(body), future)

    def _drop_draft(self) -> None:
        draft, self._draft = self._draft, None
        if draft is not None:
            draft.discard()

    def _finish_draft(self) -> Path | None:
        """The draft completed with the entries added since and fsynced; None when there
        is none or it does not fit (the body was replaced: a rotation, a full reload)."""
        draft, self._draft = self._draft, None
        if draft is None:
            return None
        if draft.generation != self._generation or not self._count:
            draft.discard()
            return None
        try:
            fd = draft.fd.result()
        except DiskError:
            return None  # written whole instead (where a failing disk fails again)
        try:
            _write_all(fd, (self._body[draft.length :], b"\n]\n"))
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(draft.temp)
            raise _disk_error(f"writing {draft.temp.name}", exc) from exc
        finally:
            os.close(fd)
        return draft.temp

    def _write(self) -> None:
        temp = self._finish_draft()
        if temp is None:
            temp = self.out.temp_path()
            if self._count:
                write_durably(temp, b"[\n", self._body, b"\n]\n")
            else:
                write_durably(temp, b"[]\n")
        # The rename frees the replaced file's pages, megabytes late in a cycle, unless
        # something still holds it open: hold it, and let the log's thread close it.
        replaced: int | None = None
        with contextlib.suppress(OSError):
            replaced = os.open(self.path, os.O_RDONLY)
        try:
            os.rename(temp, self.path)
        except OSError:
            self.out.discard(temp)
            raise
        finally:
            if replaced is not None:
                self._ahead.submit(os.close, replaced)
        fsync_dir(self.out.path)
        st = os.stat(self.path)
        self._seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        self._clear_intent()  # every JPEG renamed so far is referenced now

    def _note_intent(self, name: str) -> None:
        """Record in the lock file a JPEG name about to appear, before it appears."""
        line = (name + "\n").encode()
        os.pwrite(self._lock_fd, line, self._intent)
        self._intent += len(line)

    def _clear_intent(self) -> None:
        os.ftruncate(self._lock_fd, 0)
        self._intent = 0

    def _remove_unrecorded(self) -> None:
        """Remove JPEGs that a writer renamed but died before recording."""
        size = os.fstat(self._lock_fd).st_size
        if not size:
            return
        for name in os.pread(self._lock_fd, size, 0).decode(errors="replace").split("\n"):
            path = self.out.path / name
            recorded = json.dumps(str(path)).encode() in self._body  # as as_record writes it
            if name and not recorded and path.exists():
                log.warning("removing orphan %s (its writer died before recording it)", name)
                self.out.discard(path)
        self._clear_intent()

    def _undo(self, moved: list[Outcome], rotated: set[str]) -> None:
        for outcome in moved:
            self.out.discard(outcome.file_path)
            self._completed.discard((outcome.request_id, outcome.image_id))
            outcome.file_path = None
        with contextlib.suppress(OSError):
            self._clear_intent()
        self._seen = None  # the lines in memory are not what is on disk: reload them
        with contextlib.suppress(OSError, DiskError):
            current = os.stat(self.path).st_ino
            for name in rotated:  # the archive that is still results.json is a duplicate
                if os.stat(self.out.path / name).st_ino == current:
                    self.out.discard(self.out.path / name)
                    self._rotated.discard(name)
            self._refresh()

    def _refresh(self, collect_names: bool = False) -> set[str]:
        """Catch up with what other processes wrote since our last write."""
        names: set[str] = set()
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns) if st else None
        if not collect_names:
            if stamp == self._seen:
                return names
            if st is not None and self._seen is not None and self._read_appended(st.st_size):
                self._seen = stamp
                return names
        # Not an extension of our body: another writer may have rotated (an inode
        # number tells nothing, the file system reuses them), so look for new archives.
        st = self._load_rotated(st, names, every=collect_names)
        self._replace_body(self._load(self.path, names) if st is not None else [])
        self._seen = stamp if st is not None else None
        return names

    def _read_appended(self, size: int) -> bool:
        """Take up the lines another writer appended after our body; False if the file
        is not our body plus appended lines (then everything is read again)."""
        lines = self._appended_lines(size)
        if lines is None:
            return False
        try:
            records = [json.loads(line) for line in lines]
        except ValueError:
            return False
        for record in records:
            self._index(record)
        for line in lines:
            self._add_line(line)
        return True

    def _appended_lines(self, size: int) -> list[bytes] | None:
        """The lines after our body, if the file starts with our first line and holds
        our body's end where our body ends; None otherwise (a rotation, or a file
        written from outside), and when our body is empty, which cannot tell."""
        if not self._count:
            return None
        body = self._body
        cut = body.find(b",\n")
        head = b"[\n" + (body[:cut] if cut >= 0 else body)
        start = 2 + len(body)  # where our body ends in the file
        overlap = min(len(body), 64)
        if size < start + 3:
            return None
        try:
            with open(self.path, "rb") as f:
                first = f.read(len(head))
                f.seek(start - overlap)
                data = f.read(size - start + overlap)
        except OSError:
            return None
        if first != head or data[:overlap] != body[len(body) - overlap :]:
            return None
        if not data.endswith(b"\n]\n"):
            return None
        tail = data[overlap:-3]
        if not tail:
            return []
        if not tail.startswith(b",\n"):
            return None
        return tail[2:].split(b",\n")

    def _load_rotated(
        self, st: os.stat_result | None, names: set[str], every: bool
    ) -> os.stat_result | None:
        """Load archived files not seen yet; None if results.json is itself archived."""
        for entry in sorted(os.scandir(self.out.path), key=lambda e: e.name):
            if not _ROTATED.fullmatch(entry.name) or (entry.name in self._rotated and not every):
                continue
            if st is not None and entry.inode() == st.st_ino:
                st = None  # a rotation was cut short: results.json is already archived
            self._load(Path(entry.path), names)
            self._rotated.add(entry.name)
        return st

    def _load(self, path: Path, names: set[str]) -> list[bytes]:
        try:
            records = json.loads(path.read_bytes())
        except ValueError as exc:
            raise DiskError(f"{path} is not valid JSON ({exc}); move it aside") from None
        except OSError as exc:
            raise _disk_error(f"reading {path}", exc) from exc
        if not isinstance(records, list):
            raise DiskError(f"{path} is not a JSON array; move it aside")
        for record in records:
            if self._index(record):
                names.add(os.path.basename(record.get("file_path") or ""))
        return [json.dumps(r).encode() for r in records]

    def _index(self, record: Any) -> bool:
        """Add a completed record to the once-only index; whether it was one."""
        if not _is_completed_record(record):
            return False
        self._completed.add((record["request_id"], record["image_id"]))
        return True

    def _sweep(self, referenced: set[str]) -> None:
        for temp in self.out.stale_temps():
            log.info("removing stale temp file %s", temp.name)
            self.out.discard(temp)
        for name in self.out.our_jpegs():
            if name not in referenced:
                log.warning("removing orphan %s (no results entry references it)", name)
                self.out.discard(self.out.path / name)
        if self._seen is None:  # no results.json yet, or a rotation to finish
            self._write()


def _is_completed_record(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and record.get("status") == "completed"
        and isinstance(record.get("request_id"), str)
        and isinstance(record.get("image_id"), str)
    )


def results_counts(directory: Path) -> tuple[int, int]:
    """Entries in results.json, and in it plus every rotated file (one entry per line)."""
    current = total = 0
    for path in directory.glob("results*.json"):
        if path.name != RESULTS and not _ROTATED.fullmatch(path.name):
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        count = data.count(b"\n{")
        total += count
        if path.name == RESULTS:
            current = count
    return current, total
