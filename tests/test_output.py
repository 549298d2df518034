"""OUTPUT_DIR: safe names, the results log (commit, dedup, suffixes, rotation, sweep)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from returner import output
from returner.errors import DiskError
from returner.output import LOCK, RESULTS, OutputDir, ResultsLog, file_name, safe_stem
from returner.task import Entry, Kind, Outcome
from tests.conftest import read_results

MILLIS = 1_732_000_000_000  # 2024-11-19 07:06:40 UTC
STAMP = "20241119_070640"
ROTATED = re.compile(r"results\.(\d{8}T\d{6})(?:_\d+)?\.json")
HOSTILE_IDS = [
    "../x", "/abs", "..", ".", ".hidden", "", "a" * 400, "가" * 400, "nul\x00byte",
    "이미지_001", "\ud800", "a/b/../../c", "line\nbreak\r\t\x1b[31m", "a..b", "~", "%2F",
    "con", "x" * 228, "back\\slash", " spaced ", "\x7f",
]


def assert_safe_name(name: str) -> None:
    assert name == os.path.basename(name) and "/" not in name and "\\" not in name
    assert not any(ord(c) < 32 or ord(c) == 127 for c in name), repr(name)
    assert not name.startswith(".") and ".." not in name
    assert len(name.encode("utf-8")) <= 255  # also proves it has no lone surrogate
    assert name.endswith(".jpg")


# --- names -----------------------------------------------------------------------------


@pytest.mark.parametrize("image_id", HOSTILE_IDS)
def test_hostile_ids_give_one_safe_component(image_id: str, tmp_path: Path) -> None:
    for suffix in (0, 1, 999_999):
        name = file_name(image_id, MILLIS, suffix)
        assert_safe_name(name)
        target = tmp_path / name
        target.write_bytes(b"jpeg")  # the file system takes it, directly in the directory
        assert target.resolve().parent == tmp_path.resolve()


@pytest.mark.parametrize("image_id", HOSTILE_IDS)
def test_safe_stem_is_the_name_prefix(image_id: str) -> None:
    stem = safe_stem(image_id)
    assert file_name(image_id, MILLIS) == f"{stem}_{STAMP}.jpg"
    assert stem.isascii() and stem.isprintable()
    assert "/" not in stem and ".." not in stem and not stem.startswith(".")
    assert len(stem) <= 255 - len(f"_{STAMP}_999999.jpg")


def test_hostile_ids_give_distinct_names() -> None:
    names = {file_name(i, MILLIS) for i in HOSTILE_IDS}
    assert len(names) == len(HOSTILE_IDS)


def test_plain_ids_are_kept_readable() -> None:
    assert file_name("image_001", MILLIS) == f"image_001_{STAMP}.jpg"
    assert file_name("frame-7.v2", MILLIS, 2) == f"frame-7.v2_{STAMP}_2.jpg"


def test_long_ids_sharing_a_prefix_stay_distinct() -> None:
    base = "p" * 500
    names = {file_name(base + tail, MILLIS) for tail in ("", "a", "b", "가", "\x00")}
    assert len(names) == 5
    for name in names:
        assert_safe_name(name)


@pytest.fixture
def seoul_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Asia/Seoul")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("seoul_time")
@pytest.mark.parametrize(
    "millis", [MILLIS, 0, 1_704_067_199_999, 1_704_067_200_000, 4_102_444_800_123]
)
def test_timestamp_is_utc_time_of_entry(millis: int) -> None:
    expected = datetime.fromtimestamp(millis // 1000, UTC).strftime("%Y%m%d_%H%M%S")
    assert file_name("img", millis) == f"img_{expected}.jpg"


def test_timestamp_examples() -> None:
    assert file_name("img", 1_704_067_199_999) == "img_20231231_235959.jpg"
    assert file_name("img", 1_704_067_200_000) == "img_20240101_000000.jpg"


@given(st.lists(st.text(), min_size=2, max_size=6, unique=True), st.integers(0, 2**42))
def test_names_are_injective_and_safe(ids: list[str], millis: int) -> None:
    names = [file_name(i, millis) for i in ids]
    assert len(set(names)) == len(ids)
    for name in names:
        assert_safe_name(name)


@given(st.text(max_size=3), st.text(max_size=3), st.integers(0, 300))
def test_long_names_are_injective_and_safe(a: str, b: str, length: int) -> None:
    prefix = "가x/." * length
    first, second = file_name(prefix + a, MILLIS), file_name(prefix + b, MILLIS)
    assert (first == second) == (a == b)
    assert_safe_name(first)


# --- results log -----------------------------------------------------------------------


def entry(millis: int = MILLIS, seq: int = 0) -> Entry:
    return Entry(f"{millis}-{seq}", b"{}", 1)


def completed(out: OutputDir, request_id: str, image_id: str, millis: int = MILLIS,
              data: bytes | None = None) -> Outcome:
    temp = out.write_jpeg(data if data is not None else f"{request_id}/{image_id}".encode())
    return Outcome(entry(millis), Kind.COMPLETED, request_id, image_id, temp_path=temp)


def failed(request_id: str | None, image_id: str | None, error: str = "bad shape") -> Outcome:
    return Outcome(entry(), Kind.FAILED, request_id, image_id, error=error)


def open_log(directory: Path, max_entries: int = 100_000) -> tuple[OutputDir, ResultsLog]:
    out = OutputDir(directory)
    log = ResultsLog(out, max_entries)
    log.open()
    return out, log


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture
def opened(outdir: Path) -> Iterator[tuple[OutputDir, ResultsLog]]:
    out, log = open_log(outdir)
    yield out, log
    log.close()


def dot_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.startswith(".")}


def all_records(directory: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for path in sorted(directory.iterdir()):
        if path.name == RESULTS or ROTATED.fullmatch(path.name):
            records.extend(json.loads(path.read_bytes()))
    return records


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps(records))


def record(directory: Path, request_id: str, image_id: str, name: str) -> dict[str, Any]:
    return {"timestamp": "2024-01-01T00:00:00+00:00", "request_id": request_id,
            "image_id": image_id, "file_path": str(directory.resolve() / name),
            "status": "completed"}


def test_open_creates_an_empty_results_file(outdir: Path) -> None:
    _, log = open_log(outdir)
    assert read_results(outdir) == []
    assert len(log) == 0
    assert dot_files(outdir) == {LOCK}


def test_commit_completed(opened: tuple[OutputDir, ResultsLog], outdir: Path) -> None:
    out, log = opened
    outcome = completed(out, "req_001", "image_001", data=b"\xff\xd8jpeg-bytes")
    before = datetime.now(UTC)
    log.commit([outcome])
    after = datetime.now(UTC)

    final = out.path / f"image_001_{STAMP}.jpg"
    assert final.read_bytes() == b"\xff\xd8jpeg-bytes"
    assert outcome.file_path == final and outcome.temp_path is None
    assert outcome.kind is Kind.COMPLETED
    [rec] = read_results(outdir)
    assert rec["request_id"] == "req_001" and rec["image_id"] == "image_001"
    assert rec["status"] == "completed"
    assert rec["file_path"] == str(final) and Path(rec["file_path"]).is_absolute()
    assert "error" not in rec
    stamp = datetime.fromisoformat(rec["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    assert re.search(r"(\+00:00|Z)$", rec["timestamp"])
    assert before - timedelta(seconds=1) <= stamp <= after + timedelta(seconds=1)
    assert log.is_completed(("req_001", "image_001"))
    assert dot_files(outdir) == {LOCK}


def test_commit_failed(opened: tuple[OutputDir, ResultsLog], outdir: Path) -> None:
    _, log = opened
    log.commit([failed("req_x", "img_x", "shape [0, 4, 3]: bad"), failed(None, None)])
    first, second = read_results(outdir)
    assert first["status"] == "failed" and first["file_path"] is None
    assert first["error"] == "shape [0, 4, 3]: bad"
    assert (first["request_id"], first["image_id"]) == ("req_x", "img_x")
    assert second["request_id"] is None and second["image_id"] is None
    assert isinstance(second["error"], str) and second["error"]
    assert datetime.fromisoformat(second["timestamp"]).utcoffset() == timedelta(0)
    assert not log.is_completed(("req_x", "img_x"))
    assert not list(outdir.glob("*.jpg"))


def test_second_completion_is_a_duplicate(
    opened: tuple[OutputDir, ResultsLog], outdir: Path
) -> None:
    out, log = opened
    log.commit([completed(out, "r", "i")])
    again = completed(out, "r", "i", millis=MILLIS + 5000, data=b"second")
    temp = again.temp_path
    assert temp is not None and temp.exists()
    log.commit([again])
    assert again.kind is Kind.DUPLICATE
    assert not temp.exists()
    assert len(read_results(outdir)) == 1
    assert [p.name for p in outdir.glob("*.jpg")] == [f"i_{STAMP}.jpg"]
    assert (outdir / f"i_{STAMP}.jpg").read_bytes() == b"r/i"
    assert dot_files(outdir) == {LOCK}


def test_duplicate_within_one_batch(opened: tuple[OutputDir, ResultsLog], outdir: Path) -> None:
    out, log = opened
    first, second = completed(out, "r", "i"), completed(out, "r", "i")
    log.commit([first, second])
    assert (first.kind, second.kind) == (Kind.COMPLETED, Kind.DUPLICATE)
    assert len(read_results(outdir)) == 1
    assert dot_files(outdir) == {LOCK}


def test_failure_after_completion_is_a_duplicate(
    opened: tuple[OutputDir, ResultsLog], outdir: Path
) -> None:
    out, log = opened
    log.commit([completed(out, "r", "i")])
    late = failed("r", "i", "segment gone")
    log.commit([late])
    assert late.kind is Kind.DUPLICATE
    assert [r["status"] for r in read_results(outdir)] == ["completed"]


def test_completion_after_failure_is_recorded(
    opened: tuple[OutputDir, ResultsLog], outdir: Path
) -> None:
    out, log = opened
    log.commit([failed("r", "i")])
    retry = completed(out, "r", "i")
    log.commit([retry])
    assert retry.kind is Kind.COMPLETED
    assert [r["status"] for r in read_results(outdir)] == ["failed", "completed"]


def test_duplicate_seen_through_another_log(outdir: Path) -> None:
    out_a, log_a = open_log(outdir)
    out_b, log_b = open_log(outdir)  # as another process would, opened before A commits
    log_a.commit([completed(out_a, "r", "i")])
    late = completed(out_b, "r", "i", data=b"b")
    log_b.commit([late])
    assert late.kind is Kind.DUPLICATE
    assert len(read_results(outdir)) == 1
    log_b.commit([completed(out_b, "r2", "i2")])
    assert [r["request_id"] for r in read_results(outdir)] == ["r", "r2"]
    assert dot_files(outdir) == {LOCK}


def test_another_writers_lines_are_taken_up_without_reading_everything_again(
    outdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_a, log_a = open_log(outdir)
    out_b, log_b = open_log(outdir)
    log_b.commit([completed(out_b, "b0", "i")])
    log_a.commit([completed(out_a, "a", "i")])  # an empty body cannot tell: read in full
    full_loads: list[Path] = []
    real_load = ResultsLog._load

    def counted_load(self: ResultsLog, path: Path, names: set[str]) -> list[bytes]:
        full_loads.append(path)
        return real_load(self, path, names)

    monkeypatch.setattr(ResultsLog, "_load", counted_load)
    for n in range(3):
        log_a.commit([completed(out_a, f"a{n}", "i"), failed(f"f{n}", "i")])
        late = completed(out_b, f"a{n}", "i", data=b"b")
        log_b.commit([late, completed(out_b, f"b{n + 1}", "i")])
        assert late.kind is Kind.DUPLICATE
    assert full_loads == []  # each caught up with the other's appended lines only
    on_disk = (outdir / RESULTS).read_bytes()
    for log in (log_a, log_b):
        log.commit([])
        assert bytes(log._body) == on_disk[2:-3] and len(log) == 11
    assert [r["request_id"] for r in read_results(outdir)] == [
        "b0", "a", "a0", "f0", "b1", "a1", "f1", "b2", "a2", "f2", "b3"]


def test_a_rotation_by_another_writer_is_noticed(outdir: Path) -> None:
    out_a, log_a = open_log(outdir, max_entries=3)
    out_b, log_b = open_log(outdir, max_entries=3)
    log_b.commit([completed(out_b, "b0", "i")])
    log_a.commit([completed(out_a, f"r{n}", "i") for n in range(4)])  # rotates: b0 r0 r1
    assert len(rotated_files(outdir)) == 1
    log_b.commit([completed(out_b, f"r{n}", "i", data=b"b") for n in range(1, 3)])
    assert len(all_records(outdir)) == 5  # r1 and r2 were duplicates: one in the archive
    assert sorted(r["request_id"] for r in all_records(outdir)) == ["b0", "r0", "r1", "r2", "r3"]


def test_a_rotation_is_noticed_when_the_new_file_looks_like_ours_where_our_body_ends(
    outdir: Path,
) -> None:
    # Lines of equal length that end alike: after another writer's rotation, the file
    # holds at our body's end the same bytes as our body's end. Only the first line
    # differs.
    ids = [f"{n}" + "z" * 70 for n in range(4)]
    out_a, log_a = open_log(outdir, max_entries=3)
    out_b, log_b = open_log(outdir, max_entries=3)
    log_b.commit([completed(out_b, "b0", ids[0])])
    log_a.commit([completed(out_a, f"r{n}", ids[n + 1]) for n in range(3)])  # archives b0 r0 r1
    assert [r["request_id"] for r in read_results(outdir)] == ["r2"]
    archived = completed(out_b, "r0", ids[1], data=b"b")
    log_b.commit([archived])
    assert archived.kind is Kind.DUPLICATE


def test_a_rotation_by_another_writer_is_noticed_even_from_an_empty_body(outdir: Path) -> None:
    out_a, log_a = open_log(outdir, max_entries=3)
    out_b, log_b = open_log(outdir, max_entries=3)  # holds nothing yet
    log_a.commit([completed(out_a, f"r{n}", "i") for n in range(4)])  # 3 archived, 1 left
    assert len(rotated_files(outdir)) == 1 and len(read_results(outdir)) == 1
    archived = completed(out_b, "r0", "i", data=b"b")
    log_b.commit([archived])
    assert archived.kind is Kind.DUPLICATE
    assert len(all_records(outdir)) == 4


def test_a_results_file_rewritten_from_outside_is_read_again(outdir: Path) -> None:
    out_a, log_a = open_log(outdir)
    log_a.commit([completed(out_a, "r0", "i")])
    records = json.loads((outdir / RESULTS).read_bytes())
    records.append(record(outdir, "r9", "i", "elsewhere.jpg"))
    (outdir / RESULTS).write_text(json.dumps(records))  # one line: not our layout
    again = completed(out_a, "r9", "i", data=b"again")
    log_a.commit([again, completed(out_a, "r1", "i")])
    assert again.kind is Kind.DUPLICATE
    assert [r["request_id"] for r in read_results(outdir)] == ["r0", "r9", "r1"]


def test_name_of_another_task_gets_a_suffix(
    opened: tuple[OutputDir, ResultsLog], outdir: Path
) -> None:
    out, log = opened
    outcomes = [completed(out, f"req_{n}", "same", millis=MILLIS + 100 * n) for n in range(3)]
    log.commit(outcomes[:1])
    log.commit(outcomes[1:])
    names = [o.file_path.name for o in outcomes if o.file_path]
    assert names == [f"same_{STAMP}.jpg", f"same_{STAMP}_1.jpg", f"same_{STAMP}_2.jpg"]
    for n, name in enumerate(names):
        assert (outdir / name).read_bytes() == f"req_{n}/same".encode()
    assert [r["file_path"] for r in read_results(outdir)] == [str(out.path / n) for n in names]


def test_suffix_also_after_reopening(outdir: Path) -> None:
    out, log = open_log(outdir)
    log.commit([completed(out, "req_a", "same")])
    log.close()
    out, log = open_log(outdir)
    later = completed(out, "req_b", "same")
    log.commit([later])
    assert later.file_path == out.path / f"same_{STAMP}_1.jpg"
    assert (outdir / f"same_{STAMP}.jpg").read_bytes() == b"req_a/same"


def test_redelivery_after_crash_reuses_its_name(outdir: Path) -> None:
    # A crash between the JPEG rename and the results write leaves an orphan with the
    # task's own name; it is swept at open and the redelivery writes the same name.
    outdir.mkdir()
    (outdir / f"img_{STAMP}.jpg").write_bytes(b"half-done")
    out, log = open_log(outdir)
    again = completed(out, "r", "img", data=b"redelivered")
    log.commit([again])
    assert again.file_path == out.path / f"img_{STAMP}.jpg"
    assert again.file_path.read_bytes() == b"redelivered"
    assert sorted(p.name for p in outdir.glob("*.jpg")) == [f"img_{STAMP}.jpg"]


def test_hostile_image_ids_land_in_the_directory(
    opened: tuple[OutputDir, ResultsLog], outdir: Path
) -> None:
    out, log = opened
    ids = ["../escape", "/abs", "..", ".hidden", "가" * 300, "nul\x00"]
    outcomes = [completed(out, f"r{n}", i) for n, i in enumerate(ids)]
    log.commit(outcomes)
    for o in outcomes:
        assert o.kind is Kind.COMPLETED and o.file_path is not None
        assert o.file_path.parent == out.path and o.file_path.exists()
    assert not (outdir.parent / f"escape_{STAMP}.jpg").exists()
    assert len(list(outdir.glob("*.jpg"))) == len(ids)
    assert [r["image_id"] for r in read_results(outdir)] == ids


def rotated_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if ROTATED.fullmatch(p.name))


def test_rotation(outdir: Path) -> None:
    out, log = open_log(outdir, max_entries=3)
    before = datetime.now(UTC).replace(microsecond=0)
    for n in range(2):
        log.commit([completed(out, f"r{n}", f"i{n}")])
    assert len(read_results(outdir)) == 2 and rotated_files(outdir) == []
    log.commit([completed(out, "r2", "i2")])  # now it holds 3: rotated at once
    after = datetime.now(UTC)
    assert read_results(outdir) == []
    log.commit([completed(out, "r3", "i3")])

    [archive] = rotated_files(outdir)
    match = ROTATED.fullmatch(archive.name)
    assert match is not None
    stamp = datetime.strptime(match.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    assert before <= stamp <= after
    assert [r["request_id"] for r in json.loads(archive.read_bytes())] == ["r0", "r1", "r2"]
    assert [r["request_id"] for r in read_results(outdir)] == ["r3"]
    for rec in all_records(outdir):
        assert Path(rec["file_path"]).exists()
    assert dot_files(outdir) == {LOCK}


def test_rotation_inside_one_batch_keeps_every_entry(outdir: Path) -> None:
    out, log = open_log(outdir, max_entries=3)
    log.commit([completed(out, "r0", "i0")])
    log.commit([completed(out, f"r{n}", f"i{n}") for n in range(1, 8)])
    records = all_records(outdir)
    assert sorted(r["request_id"] for r in records) == [f"r{n}" for n in range(8)]
    referenced = {Path(r["file_path"]).name for r in records}
    assert referenced == {p.name for p in outdir.glob("*.jpg")}
    for path in [*rotated_files(outdir), outdir / RESULTS]:
        assert len(json.loads(path.read_bytes())) <= 3


def test_dedup_spans_rotated_files(outdir: Path) -> None:
    out, log = open_log(outdir, max_entries=2)
    for n in range(5):
        log.commit([completed(out, f"r{n}", f"i{n}")])
    log.close()
    assert len(rotated_files(outdir)) == 2

    out, fresh = open_log(outdir, max_entries=2)
    for n in range(5):
        assert fresh.is_completed((f"r{n}", f"i{n}"))
    assert not fresh.is_completed(("r5", "i5"))
    again = completed(out, "r0", "i0")
    fresh.commit([again])
    assert again.kind is Kind.DUPLICATE
    assert len(all_records(outdir)) == 5
    assert len(list(outdir.glob("*.jpg"))) == 5


def test_open_sweeps_orphans_only(outdir: Path) -> None:
    outdir.mkdir()
    write_records(outdir / RESULTS, [record(outdir, "r", "kept", "kept_20240101_000000.jpg")])
    write_records(outdir / "results.20240101T000000.json",
                  [record(outdir, "r0", "old", "old_20231231_000000.jpg")])
    keep = ["kept_20240101_000000.jpg", "old_20231231_000000.jpg", "notes.txt", "photo.jpg"]
    gone = ["x_20240101_000000.jpg", "x_20240101_000000_1.jpg"]
    for name in keep + gone:
        (outdir / name).write_bytes(b"data")

    _, log = open_log(outdir)
    for name in keep:
        assert (outdir / name).exists(), name
    for name in gone:
        assert not (outdir / name).exists(), name
    assert log.is_completed(("r", "kept")) and log.is_completed(("r0", "old"))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_open_removes_stale_temps_of_dead_processes(outdir: Path) -> None:
    outdir.mkdir()
    stale = outdir / f".{dead_pid()}-{uuid.uuid4().hex}.tmp"
    live = outdir / f".{os.getppid()}-{uuid.uuid4().hex}.tmp"  # another process, alive
    for path in (stale, live, outdir / ".keepme"):
        path.write_bytes(b"partial")
    open_log(outdir)
    assert not stale.exists()
    assert live.exists() and (outdir / ".keepme").exists()


def test_open_finishes_a_cut_short_rotation(outdir: Path) -> None:
    out, log = open_log(outdir)
    log.commit([completed(out, "r0", "i0"), completed(out, "r1", "i1")])
    log.close()
    archive = outdir / "results.20240101T000000.json"
    os.link(outdir / RESULTS, archive)  # crash after the link, before the replacement

    out, log = open_log(outdir)
    assert read_results(outdir) == []
    assert [r["request_id"] for r in json.loads(archive.read_bytes())] == ["r0", "r1"]
    assert os.stat(archive).st_ino != os.stat(outdir / RESULTS).st_ino
    assert log.is_completed(("r0", "i0")) and log.is_completed(("r1", "i1"))
    assert len(list(outdir.glob("*.jpg"))) == 2  # still referenced by the archive

    dup, new = completed(out, "r1", "i1"), completed(out, "r2", "i2")
    log.commit([dup, new])
    assert (dup.kind, new.kind) == (Kind.DUPLICATE, Kind.COMPLETED)
    assert sorted(r["request_id"] for r in all_records(outdir)) == ["r0", "r1", "r2"]
    assert dot_files(outdir) == {LOCK}


def test_readers_always_see_a_complete_document(
    opened: tuple[OutputDir, ResultsLog], outdir: Path
) -> None:
    out, log = opened
    for n in range(20):
        log.commit([completed(out, f"r{n}", f"i{n}"), failed(f"f{n}", f"i{n}")])
        assert len(read_results(outdir)) == 2 * (n + 1)
    assert len(log) == 40
    assert dot_files(outdir) == {LOCK}


def test_a_disk_error_writing_results_forgets_the_batch(
    opened: tuple[OutputDir, ResultsLog], outdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, log = opened
    log.commit([completed(out, "r0", "i0")])
    lost = completed(out, "r1", "i1", millis=MILLIS + 1000)

    def full_disk(path: Path, *chunks: bytes | bytearray) -> None:
        raise DiskError(f"writing {path.name}: No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(output, "write_durably", full_disk)
        with pytest.raises(DiskError):
            log.commit([lost])
    # Not durable, so not done: a retry must write it, not take it for a duplicate.
    assert not log.is_completed(("r1", "i1"))
    assert [p.name for p in outdir.glob("*.jpg")] == [f"i0_{STAMP}.jpg"]
    retry = completed(out, "r1", "i1", millis=MILLIS + 1000)
    log.commit([retry])
    assert retry.kind is Kind.COMPLETED
    assert [r["request_id"] for r in read_results(outdir)] == ["r0", "r1"]


# --- results.json written ahead -------------------------------------------------------


@pytest.fixture
def ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Write results.json ahead whatever its size (the service does from 256 KiB)."""
    monkeypatch.setattr(output, "WRITE_AHEAD_MIN_BYTES", 0)


def temp_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.endswith(".tmp")}


def document(log: ResultsLog) -> bytes:
    """results.json as a commit writes it whole."""
    return b"[\n" + bytes(log._body) + b"\n]\n" if len(log) else b"[]\n"


@pytest.mark.usefixtures("ahead")
def test_results_written_ahead_are_what_a_whole_write_gives(outdir: Path) -> None:
    out, log = open_log(outdir)
    assert temp_files(outdir) == set()  # nothing to write ahead of an empty file
    for n in range(5):
        log.commit([completed(out, f"r{n}", f"i{n}"), failed(f"f{n}", f"i{n}")])
        assert (outdir / RESULTS).read_bytes() == document(log)
        assert log._draft is not None
        log._draft.fd.result()  # written on the log's own thread
        [draft] = temp_files(outdir)  # the next version, holding every entry so far
        assert (outdir / draft).read_bytes() == b"[\n" + bytes(log._body)
    assert [r["request_id"] for r in read_results(outdir)] == [
        x for n in range(5) for x in (f"r{n}", f"f{n}")
    ]
    log.close()
    assert dot_files(outdir) == {LOCK}  # the draft goes with a clean shutdown


@pytest.mark.usefixtures("ahead")
def test_results_written_ahead_take_up_another_writers_lines(outdir: Path) -> None:
    out_a, log_a = open_log(outdir)
    out_b, log_b = open_log(outdir)
    log_a.commit([completed(out_a, "a0", "i")])
    log_b.commit([completed(out_b, "b0", "j")])
    log_a.commit([completed(out_a, "a1", "k")])  # its draft lacked b0: appended with a1
    log_b.commit([completed(out_b, "b1", "l")])
    assert [r["request_id"] for r in read_results(outdir)] == ["a0", "b0", "a1", "b1"]
    assert (outdir / RESULTS).read_bytes() == document(log_b)
    for log in (log_a, log_b):
        log.close()
    assert dot_files(outdir) == {LOCK}


@pytest.mark.usefixtures("ahead")
def test_results_written_ahead_survive_rotations(outdir: Path) -> None:
    out_a, log_a = open_log(outdir, max_entries=3)
    out_b, log_b = open_log(outdir, max_entries=3)
    log_a.commit([completed(out_a, "r0", "i0")])
    log_a.commit([completed(out_a, f"r{n}", f"i{n}") for n in range(1, 5)])  # rotates
    log_b.commit([completed(out_b, "r5", "i5"), completed(out_b, "r6", "i6")])  # rotates
    log_a.commit([completed(out_a, "r7", "i7")])  # its draft is of a body rotated away
    records = all_records(outdir)
    assert sorted(r["request_id"] for r in records) == [f"r{n}" for n in range(8)]
    assert {Path(r["file_path"]).name for r in records} == {p.name for p in outdir.glob("*.jpg")}
    for path in [*rotated_files(outdir), outdir / RESULTS]:
        assert len(json.loads(path.read_bytes())) <= 3
    for log in (log_a, log_b):
        log.close()
    assert dot_files(outdir) == {LOCK}


def open_files_in(directory: Path) -> list[str]:
    """What this process holds open in `directory` (deleted files included)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(directory)):
                held.append(target)
    return held


@pytest.mark.parametrize("ahead", [False, True], ids=["whole", "written-ahead"])
def test_replaced_results_files_are_not_held_open(
    outdir: Path, monkeypatch: pytest.MonkeyPatch, ahead: bool
) -> None:
    if ahead:
        monkeypatch.setattr(output, "WRITE_AHEAD_MIN_BYTES", 0)
    out, log = open_log(outdir)
    for n in range(5):
        log.commit([completed(out, f"r{n}", f"i{n}")])
    log._ahead.submit(lambda: None).result()  # what the log's thread had to do is done
    held = open_files_in(outdir)
    assert all(name.endswith(LOCK) or ".tmp" in name for name in held), held
    assert len(held) == 1 + ahead  # the lock file, and the next version being prepared
    log.close()
    assert open_files_in(outdir) == []


@pytest.mark.usefixtures("ahead")
def test_a_draft_that_could_not_be_written_falls_back_to_a_whole_write(
    outdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, log = open_log(outdir)
    log.commit([completed(out, "r0", "i0")])

    real_create = output._create
    failed_drafts: list[str] = []

    def failing_drafts(path: Path, chunks: Any, sync: Any) -> int:
        if sync is os.fdatasync:  # the draft's, not the whole write's
            failed_drafts.append(path.name)
            raise DiskError(f"writing {path.name}: No space left on device")
        return real_create(path, chunks, sync)

    monkeypatch.setattr(output, "_create", failing_drafts)
    log.commit([completed(out, "r1", "i1")])  # the draft was good: used
    log.commit([completed(out, "r2", "i2")])  # this one's draft failed: written whole
    assert [r["request_id"] for r in read_results(outdir)] == ["r0", "r1", "r2"]
    log.close()
    assert len(failed_drafts) == 2  # the drafts after r1 and after r2
    assert dot_files(outdir) == {LOCK}


# --- several processes -----------------------------------------------------------------


def commit_many(directory: str, proc: int, count: int, barrier: Barrier, ahead: bool) -> None:
    """Run in a child: commit `count` outcomes one by one; image ids clash across children."""
    if ahead:
        output.WRITE_AHEAD_MIN_BYTES = 0
    out, log = open_log(Path(directory))
    barrier.wait(timeout=60)
    for i in range(count):
        log.commit([completed(out, f"req_{proc}_{i}", f"img_{i:03d}", data=f"{proc}:{i}".encode())])
    log.close()


@pytest.mark.parametrize("ahead", [False, True], ids=["whole", "written-ahead"])
def test_two_processes_share_one_directory(outdir: Path, ahead: bool) -> None:
    count = 200
    outdir.mkdir()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=commit_many, args=(str(outdir), proc, count, barrier, ahead))
        for proc in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]

    records = read_results(outdir)
    assert len(records) == 2 * count
    keys = {(r["request_id"], r["image_id"]) for r in records}
    assert len(keys) == 2 * count
    paths = [r["file_path"] for r in records]
    assert len(set(paths)) == len(paths)
    for rec in records:
        assert rec["status"] == "completed"
        _, proc, i = rec["request_id"].split("_")
        assert Path(rec["file_path"]).read_bytes() == f"{proc}:{i}".encode()
    names = {Path(p).name for p in paths}
    assert names == {p.name for p in outdir.glob("*.jpg")}
    # both children named img_{i} for the same second: one of each pair got the suffix
    assert sum(name.endswith(f"{STAMP}_1.jpg") for name in names) == count
    assert dot_files(outdir) == {LOCK}
