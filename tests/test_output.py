"""OUTPUT_DIR: safe names, the results log (commit, dedup, suffixes, rotation, sweep)."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from returner import commit, files
from returner.commit import Committer
from returner.errors import DiskError
from returner.files import TEMPS, file_name, safe_stem
from returner.output import LocalFiles
from returner.task import Entry, Kind, Outcome
from tests.conftest import open_results, read_results, wait_for

MILLIS = 1_732_000_000_000  # 2024-11-19 07:06:40 UTC
STAMP = "20241119_070640"
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


def completed(results: Committer, request_id: str, image_id: str, millis: int = MILLIS) -> Outcome:
    temp = results.output.stage(f"{request_id}/{image_id}".encode())
    return Outcome(entry(millis), Kind.COMPLETED, request_id, image_id, staged=temp)


@pytest.fixture
def results(tmp_path: Path) -> Iterator[Committer]:
    opened = open_results(tmp_path / "out")
    yield opened
    opened.close()


def temp_files(results: Committer) -> list[str]:
    return [p.name for p in results.out.temps.iterdir()]


def test_far_future_entry_ids_still_get_a_name() -> None:
    assert file_name("x", 10**20) == "x_99991231_235959.jpg"
    assert file_name("x", -5) == "x_19700101_000000.jpg"


def test_a_failing_store_forgets_the_batch_and_its_jpegs(
    results: Committer, monkeypatch: pytest.MonkeyPatch
) -> None:
    results.commit([completed(results, "r0", "i0")])
    lost = completed(results, "r1", "i1", millis=MILLIS + 1000)

    def full_disk(*_args: Any, **_kwargs: Any) -> Any:
        raise DiskError("committing results: database or disk is full")

    with monkeypatch.context() as patched:
        patched.setattr(results.store, "transaction", full_disk)
        with pytest.raises(DiskError):
            results.commit([lost])
    # Not durable, so not done: a retry must write it, not take it for a duplicate.
    assert not results.is_completed(("r1", "i1"))
    assert temp_files(results) == []
    assert [p.name for p in results.out.path.glob("*.jpg")] == [f"i0_{STAMP}.jpg"]
    [decision] = results.commit([completed(results, "r1", "i1", millis=MILLIS + 1000)])
    assert decision.kind is Kind.COMPLETED
    assert [r["request_id"] for r in read_results(results.out.path)] == ["r0", "r1"]


def test_a_failure_after_the_commit_keeps_the_record_and_its_jpeg(
    results: Committer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The records are durable before the JPEGs are renamed: a failing rename raises (so
    nothing is acked), and the retry finds a duplicate whose file is then in place."""
    task = completed(results, "r0", "i0")

    def failing(_directory: Path) -> None:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patched:
        patched.setattr(files, "fsync_dir", failing)
        with pytest.raises(DiskError):
            results.commit([task])
    assert results.is_completed(("r0", "i0"))
    retry = completed(results, "r0", "i0")
    [decision] = results.commit([retry])
    final = results.out.path / f"i0_{STAMP}.jpg"
    assert (decision.kind, decision.file_path) == (Kind.DUPLICATE, final)
    assert final.read_bytes() == b"r0/i0"
    assert temp_files(results) == []
    assert results.store.db.execute("SELECT count(*) FROM moves").fetchone() == (0,)


def test_a_live_writers_temp_directory_is_left_alone(results: Committer) -> None:
    other = open_results(results.out.path)
    try:
        temp = other.output.stage(b"in flight")
        results.output.sweep(results.store, results.store.db)
        assert Path(temp.ref).exists()
    finally:
        other.close()
    assert sorted(p.name for p in (results.out.path / TEMPS).iterdir()) == [results.out.writer]


def sweep_dead_writer(directory: str) -> None:
    """A child that writes a temp file and dies without cleaning up."""
    child = open_results(Path(directory))
    child.output.stage(b"half done")
    os._exit(0)


def test_a_dead_writers_temp_files_are_removed(results: Committer) -> None:
    child = multiprocessing.get_context("spawn").Process(
        target=sweep_dead_writer, args=(str(results.out.path),))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert len(list((results.out.path / TEMPS).iterdir())) == 2
    results.output.sweep(results.store, results.store.db)
    assert [p.name for p in (results.out.path / TEMPS).iterdir()] == [results.out.writer]


def test_a_writer_starting_while_another_sweeps_gets_a_directory_of_its_own(
    results: Committer,
) -> None:
    """A sweeper can see a new temp directory before its writer has locked it, and
    remove it: the starting writer then takes another name instead of failing."""
    stop = threading.Event()

    def sweep() -> None:
        while not stop.is_set():
            for writer in results.out.dead_writers():
                files.remove_tree(results.out.temps_root / writer)

    sweeper = threading.Thread(target=sweep)
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the two threads as two processes would
    sweeper.start()
    try:
        for _ in range(300):
            out = files.OutputDir(results.out.path)
            assert (out.temps_root / out.writer).is_dir()
            out.close()
    finally:
        stop.set()
        sweeper.join()
        sys.setswitchinterval(switching)


def test_an_unforeseen_error_in_one_outcome_leaves_the_rest_committed(
    results: Committer, monkeypatch: pytest.MonkeyPatch
) -> None:
    free_name = LocalFiles._free_name

    def buggy(self: LocalFiles, tx: Any, image_id: str, millis: int) -> Path:
        if image_id == "bug":
            raise RuntimeError("a bug in naming")
        return free_name(self, tx, image_id, millis)

    monkeypatch.setattr(LocalFiles, "_free_name", buggy)
    batch = [completed(results, "r", "before"), completed(results, "r", "bug"),
             completed(results, "r", "after")]
    kinds = [d.kind for d in results.commit(batch)]
    assert kinds == [Kind.COMPLETED, Kind.RETRY, Kind.COMPLETED]
    assert [r["image_id"] for r in read_results(results.out.path)] == ["before", "after"]
    assert temp_files(results) == []  # the pending one is encoded again when redelivered
    assert sorted(p.name for p in results.out.path.glob("*.jpg")) == [
        f"after_{STAMP}.jpg", f"before_{STAMP}.jpg"]


def test_output_dir_swapped_for_a_link_while_running_redirects_nothing(tmp_path: Path) -> None:
    """Finding 6: the service works through a descriptor of OUTPUT_DIR held since start."""
    real, moved, elsewhere = tmp_path / "out", tmp_path / "moved", tmp_path / "elsewhere"
    results = open_results(real)
    try:
        os.rename(real, moved)
        elsewhere.mkdir()
        real.symlink_to(elsewhere)
        [decision] = results.commit([completed(results, "r", "i")])
        assert decision.kind is Kind.COMPLETED
    finally:
        results.close()
    assert (moved / f"i_{STAMP}.jpg").read_bytes() == b"r/i"
    assert (moved / "results.json").exists()
    assert list(elsewhere.iterdir()) == []


def test_the_view_is_written_at_most_about_once_a_second(tmp_path: Path) -> None:
    """Each version of results.json reaches the disk: under a steady trickle of commits
    it is replaced on a schedule, not after every commit."""
    results = open_results(tmp_path / "out")
    view = results.out.path / "results.json"
    versions: set[tuple[int, int]] = set()
    started = time.monotonic()
    try:
        for i in range(30):  # a commit every 0.1 s for 3 s: a paced producer
            results.commit([completed(results, f"r{i}", "i", millis=MILLIS + i)])
            st = view.stat()
            versions.add((st.st_ino, st.st_mtime_ns))
            time.sleep(0.1)
        wait_for(lambda: len(json.loads(view.read_bytes())) == 30, what="the last commit")
    finally:
        results.close()
    elapsed = time.monotonic() - started
    assert len(versions) <= elapsed / commit.VIEW_EVERY_S + 2, (len(versions), elapsed)
