"""The first start on an OUTPUT_DIR of an earlier version: the seed's results.json and the
`results.<UTC stamp>.json` archives are imported into the store once, in archive order;
results.json is kept byte for byte as an archive before the first view is written; an
import killed half way is done whole at the next start; a malformed archive stops it."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from returner import upgrade
from returner.commit import Committer
from returner.errors import DiskError
from returner.store import STORE
from returner.task import Entry, Kind, Outcome
from returner.view import LOCK, RESULTS
from tests.conftest import opened, read_results, read_view, wait_for

ARCHIVE = re.compile(r"results\.\d{8}T\d{6}(?:_\d+)?\.json")
FIRST, SECOND = "results.20260101T000000.json", "results.20260102T000000.json"
STORED = (
    "timestamp", "request_id", "image_id", "file_path", "image_url", "status", "error", "entry_id"
)


def seed_format(records: list[dict[str, Any]]) -> bytes:
    """results.json as the seed wrote it."""
    return json.dumps(records, indent=2, ensure_ascii=False).encode("utf-8")


def line_format(records: list[dict[str, Any]]) -> bytes:
    """An archive of an earlier version: one entry a line."""
    lines = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    return f"[\n{lines}\n]\n".encode()


def stored(record: dict[str, Any]) -> dict[str, Any]:
    """What the store gives back for an imported record: its time in UTC (the seed's
    local time without an offset taken as this host's), no stream entry known."""
    doc = {k: record.get(k) for k in STORED}
    local = datetime.fromisoformat(doc["timestamp"])
    doc["timestamp"] = local.astimezone(UTC).isoformat(timespec="microseconds")
    if doc["status"] == "completed":
        del doc["error"]
    return doc


def archives(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ARCHIVE.fullmatch(p.name))


def meta_imported(directory: Path) -> bool:
    conn = sqlite3.connect(directory / STORE)
    try:
        return bool(conn.execute("SELECT count(*) FROM meta WHERE key = 'imported'").fetchone()[0])
    finally:
        conn.close()


@dataclass
class Legacy:
    """An OUTPUT_DIR as an earlier version left it."""

    directory: Path
    files: dict[str, list[dict[str, Any]]]  # file name -> its records
    results_json: bytes

    def jpeg(self, image_id: str, stamp: str) -> Path:
        return self.directory / f"{image_id}_{stamp}.jpg"


@pytest.fixture
def legacy(tmp_path: Path) -> Legacy:
    directory = (tmp_path / "out").resolve()
    directory.mkdir()

    def done(ts: str, request_id: str, image_id: str, stamp: str) -> dict[str, Any]:
        path = directory / f"{image_id}_{stamp}.jpg"
        path.write_bytes(f"jpeg of {request_id}/{image_id}".encode())
        return {"timestamp": ts, "request_id": request_id, "image_id": image_id,
                "file_path": str(path), "status": "completed"}

    def bad(ts: str, request_id: str | None, image_id: str | None, error: str
            ) -> dict[str, Any]:
        return {"timestamp": ts, "request_id": request_id, "image_id": image_id,
                "file_path": None, "status": "failed", "error": error}

    first = [done(f"2025-12-31T23:5{i}:00.000000+00:00", "req_old", f"img_{i}",
                  f"20251231_235{i}00") for i in range(4)]
    first.append(bad("2025-12-31T23:59:00.000000+00:00", None, None, "message is not JSON"))
    second = [done("2026-01-01T10:00:00.000000+00:00", "req_mid", "이미지_001",
                   "20260101_100000"),
              bad("2026-01-01T10:00:01.000000+00:00", "req_mid", "이미지_002", "bad shape")]
    current = [
        done("2026-11-29T14:30:22.123456", "req_01", "画像_01", "20261129_143022"),
        bad("2026-11-29T14:30:23.000001", "req_01", "画像_02", "segment 'img_shm_1' is gone"),
        done("2026-11-29T14:30:24.5", "req_01", "画像_03", "20261129_143024"),
        # The seed design could write a task twice: both records are history.
        done("2026-11-29T14:30:25.000000", "req_02", "画像_01", "20261129_143025"),
        done("2026-11-29T14:30:26.000000", "req_02", "画像_01", "20261129_143025_1"),
        done("2026-11-29T14:30:27.000000", "req_old", "img_0", "20261129_143027"),
    ]
    (directory / FIRST).write_bytes(line_format(first))
    (directory / SECOND).write_bytes(line_format(second))
    body = seed_format(current)
    (directory / RESULTS).write_bytes(body)
    return Legacy(directory, {FIRST: first, SECOND: second, RESULTS: current}, body)


def renamed(legacy: Legacy) -> str:
    """The archive name results.json was given."""
    [name] = set(archives(legacy.directory)) - {FIRST, SECOND}
    return name


def expected_order(legacy: Legacy) -> list[dict[str, Any]]:
    """Every record, archive by archive in name order (results.json under its new name)."""
    by_name = {**{k: v for k, v in legacy.files.items() if k != RESULTS},
               renamed(legacy): legacy.files[RESULTS]}
    return [stored(r) for name in sorted(by_name) for r in by_name[name]]


def test_earlier_results_files_are_imported_in_archive_order(
    legacy: Legacy, caplog: pytest.LogCaptureFixture
) -> None:
    jpegs = {p: p.read_bytes() for p in legacy.directory.glob("*.jpg")}
    with caplog.at_level(logging.INFO, logger="returner"), opened(legacy.directory):
        pass
    records = read_results(legacy.directory)
    assert records == expected_order(legacy)
    assert len(records) == sum(len(v) for v in legacy.files.values())
    assert renamed(legacy) > SECOND  # results.json is the newest archive
    assert {p: p.read_bytes() for p in legacy.directory.glob("*.jpg")} == jpegs
    assert any("imported" in m and "records" in m for m in caplog.messages), caplog.messages


def test_the_old_results_json_is_kept_as_an_archive_and_a_view_takes_its_place(
    legacy: Legacy,
) -> None:
    old = {name: (legacy.directory / name).read_bytes() for name in (FIRST, SECOND)}
    with opened(legacy.directory, view_entries=5):
        archived = legacy.directory / renamed(legacy)
        assert archived.read_bytes() == legacy.results_json
        assert read_view(legacy.directory) == read_results(legacy.directory)[-5:]
    assert {name: (legacy.directory / name).read_bytes() for name in (FIRST, SECOND)} == old
    assert len(archives(legacy.directory)) == 3


def test_the_once_only_check_sees_imported_completions(legacy: Legacy) -> None:
    with opened(legacy.directory) as results:
        assert results.is_completed(("req_01", "画像_01"))
        assert results.is_completed(("req_mid", "이미지_001"))
        assert not results.is_completed(("req_01", "画像_02"))  # it failed: may be redone
        temp = results.output.stage(b"a redelivery")
        redelivery = Outcome(Entry("1764426622000-0", b"{}", 2), Kind.COMPLETED, "req_02",
                             "画像_01", staged=temp)
        [dup] = results.commit([redelivery])
        assert dup.kind is Kind.DUPLICATE
        assert dup.file_path == legacy.jpeg("画像_01", "20261129_143025")  # the first of two
        assert not Path(temp.ref).exists()
        retried = results.output.stage(b"now it works")
        [redo] = results.commit([Outcome(Entry("1764426623000-0", b"{}", 1), Kind.COMPLETED,
                                         "req_01", "画像_02", staged=retried)])
        assert redo.kind is Kind.COMPLETED
        assert redo.file_path is not None and redo.file_path.read_bytes() == b"now it works"


def test_a_second_open_imports_nothing_again(legacy: Legacy) -> None:
    with opened(legacy.directory, view_entries=3):
        pass
    imported = read_results(legacy.directory)
    view = (legacy.directory / RESULTS).read_bytes()
    late = legacy.directory / "results.20261130T000000_7.json"
    late.write_bytes(line_format([{"timestamp": "x", "request_id": "late", "image_id": "late",
                                   "file_path": None, "status": "failed"}]))
    names = archives(legacy.directory)
    with opened(legacy.directory, view_entries=3):
        assert read_view(legacy.directory) == imported[-3:]
    assert read_results(legacy.directory) == imported
    assert archives(legacy.directory) == names, "the view was taken for an old results.json"
    assert (legacy.directory / RESULTS).read_bytes() == view


def test_a_directory_without_earlier_files_imports_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "out"
    with opened(directory):
        pass
    assert read_results(directory) == [] and archives(directory) == []
    assert meta_imported(directory)


def test_an_earlier_lock_file_is_made_private_and_its_jpegs_are_kept(legacy: Legacy) -> None:
    """An earlier version left its lock file readable by others; the JPEGs it names are
    the records' and stay."""
    recorded = legacy.jpeg("画像_03", "20261129_143024")
    (legacy.directory / LOCK).write_text(f"{recorded.name}\n")
    os.chmod(legacy.directory / LOCK, 0o644)
    with opened(legacy.directory):
        pass
    assert recorded.read_bytes() == "jpeg of req_01/画像_03".encode()
    assert oct(os.stat(legacy.directory / LOCK).st_mode & 0o777) == oct(0o600)


IMPORTER = """
import logging, sys
from pathlib import Path
from returner import upgrade
from returner.commit import Committer
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
results = Committer.at(Path(sys.argv[1]))
upgrade.take_over(results.out, results.store)
results.open()
print("open", flush=True)
"""


def test_an_import_killed_half_way_is_done_whole_at_the_next_open(tmp_path: Path) -> None:
    directory = (tmp_path / "out").resolve()
    directory.mkdir()
    small = [{"timestamp": f"2025-12-01T00:00:{i % 60:02d}.000000+00:00", "request_id": "a",
              "image_id": f"a_{i}", "file_path": None, "status": "failed", "error": "x"}
             for i in range(2000)]
    large = [{"timestamp": f"2026-11-29T14:{i // 6000 % 60:02d}:{i // 100 % 60:02d}.{i:06d}",
              "request_id": f"req_{i // 100}", "image_id": f"画像_{i}",
              "file_path": str(directory / f"画像_{i}_20261129_143022.jpg"),
              "status": "completed"} for i in range(300_000)]
    (directory / FIRST).write_bytes(line_format(small))
    body = seed_format(large)
    (directory / RESULTS).write_bytes(body)
    del large
    log = tmp_path / "import.log"
    with open(log, "wb") as err:
        child = subprocess.Popen([sys.executable, "-c", IMPORTER, str(directory)],
                                 stdout=subprocess.PIPE, stderr=err)
    try:
        # The first archive is in the open transaction; the large one is being read.
        wait_for(lambda: f"imported 2000 records from {FIRST}" in log.read_text()
                 or child.poll() is not None, timeout=60, what="the import to start")
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL, log.read_text()
    assert not meta_imported(directory), "killed too late: the import had finished"
    assert read_results(directory) == []
    assert not (directory / RESULTS).exists()
    [kept] = set(archives(directory)) - {FIRST}
    assert (directory / kept).read_bytes() == body

    with opened(directory, view_entries=10):
        pass
    assert meta_imported(directory)
    conn = sqlite3.connect(directory / STORE)
    try:
        total, distinct, first_id, last_id = conn.execute(
            "SELECT count(*), count(DISTINCT request_id || '/' || image_id),"
            " (SELECT image_id FROM records ORDER BY id LIMIT 1),"
            " (SELECT image_id FROM records ORDER BY id DESC LIMIT 1) FROM records"
        ).fetchone()
    finally:
        conn.close()
    assert (total, distinct) == (302_000, 302_000)
    assert (first_id, last_id) == ("a_0", "画像_299999")
    assert [r["image_id"] for r in read_view(directory)] == [
        f"画像_{i}" for i in range(299_990, 300_000)]


@pytest.mark.parametrize("body", [b"[{\"timestamp\": ", b"not json", b"{\"a\": 1}",
                                  b"\xff\xfe[]", b""], ids=["cut", "text", "object",
                                                            "not-utf8", "empty"])
def test_a_malformed_archive_stops_open_with_a_disk_error_naming_it(
    legacy: Legacy, body: bytes
) -> None:
    (legacy.directory / SECOND).write_bytes(body)
    for _ in range(2):  # it keeps refusing until someone moves the file aside
        results = Committer.at(legacy.directory)
        try:
            with pytest.raises(DiskError, match=re.escape(SECOND)):
                upgrade.take_over(results.out, results.store)
        finally:
            results.close()
        assert read_results(legacy.directory) == []
        assert not meta_imported(legacy.directory)
    aside = legacy.directory / "aside"
    aside.mkdir()
    (legacy.directory / SECOND).rename(aside / SECOND)
    with opened(legacy.directory):
        pass
    count = len(legacy.files[FIRST]) + len(legacy.files[RESULTS])
    assert len(read_results(legacy.directory)) == count


def test_a_refused_start_leaves_no_view_to_be_archived_by_the_next(legacy: Legacy) -> None:
    (legacy.directory / SECOND).write_bytes(b"not json")
    for _ in range(2):
        results = Committer.at(legacy.directory)
        try:
            with pytest.raises(DiskError):
                upgrade.take_over(results.out, results.store)
        finally:
            results.close()
    assert not (legacy.directory / RESULTS).exists()
    assert archives(legacy.directory) == sorted([FIRST, SECOND, renamed(legacy)])
