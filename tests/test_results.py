"""The results store and `Results` against a real SQLite file and real files: once-only
within a commit, across instances and across processes; file names and their suffixes;
the moves of a writer killed between its commit and its renames; export, get, prune and
counts; the results.json view; the daily layout; what a clean close leaves."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import simplejpeg

from returner import commit
from returner.commit import Committer
from returner.errors import DiskError
from returner.files import TEMPS
from returner.output import LocalFiles
from returner.store import EXPORT_STEP, PRUNE_STEP, STORE, Record, Store
from returner.task import Entry, Kind, Outcome
from returner.view import LOCK, RESULTS
from tests.conftest import (
    CLEAN_DOT_FILES,
    dot_files,
    open_results,
    opened,
    random_frame,
    read_results,
    read_view,
    wait_for,
)

MILLIS = 1_732_000_000_000  # 2024-11-19 07:06:40.000 UTC
STAMP = "20241119_070640"
BASE = datetime(2026, 1, 1, tzinfo=UTC)
VIEW_DEADLINE_S = 2.5  # results.json trails a commit by about a second; slack for a busy host


def jpeg(seed: int = 0) -> bytes:
    """A small real JPEG (the store does not look inside, but the files are real)."""
    return bytes(simplejpeg.encode_jpeg(random_frame((32, 48, 3), seed=seed), quality=80))


def completed(results: Committer, request_id: str, image_id: str, millis: int = MILLIS,
              seq: int = 0, data: bytes | None = None) -> Outcome:
    """An encoded frame, fsynced at its temp name, ready to commit."""
    temp = results.output.stage(data if data is not None else jpeg())
    entry = Entry(f"{millis}-{seq}", b"{}", 1)
    return Outcome(entry, Kind.COMPLETED, request_id, image_id, staged=temp)


def failed(request_id: str | None, image_id: str | None, millis: int = MILLIS,
           seq: int = 0, error: str = "bad shape") -> Outcome:
    return Outcome(Entry(f"{millis}-{seq}", b"{}", 1), Kind.FAILED, request_id, image_id,
                   error=error)


def query(directory: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """A statement on a connection of our own, closed at once."""
    conn = sqlite3.connect(directory / STORE)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def moves(directory: Path) -> list[tuple[Any, ...]]:
    return query(directory, "SELECT writer, temp, final FROM moves")


def temp_files(directory: Path) -> list[str]:
    """Every file under .tmp/, whatever writer it belongs to."""
    return sorted(str(p.relative_to(directory)) for p in (directory / TEMPS).rglob("*")
                  if p.is_file())


def completed_records(directory: Path, request_id: str, image_id: str) -> list[dict[str, Any]]:
    return [r for r in read_results(directory) if r["request_id"] == request_id
            and r["image_id"] == image_id and r["status"] == "completed"]


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    return (tmp_path / "out").resolve()


@pytest.fixture
def results(outdir: Path) -> Iterator[Committer]:
    with opened(outdir) as res:
        yield res


def test_two_deliveries_in_one_commit_record_one_completion(results: Committer,
                                                            outdir: Path) -> None:
    first = completed(results, "req", "img", seq=0, data=jpeg(1))
    second = completed(results, "req", "img", seq=1, data=jpeg(2))
    decided = results.commit([first, second])
    assert [d.kind for d in decided] == [Kind.COMPLETED, Kind.DUPLICATE]
    assert decided[0].file_path == decided[1].file_path == outdir / f"img_{STAMP}.jpg"
    assert decided[0].file_path.read_bytes() == jpeg(1)
    assert second.staged is not None and not Path(second.staged.ref).exists()
    assert len(completed_records(outdir, "req", "img")) == 1
    assert temp_files(outdir) == []


def test_a_second_instance_on_the_directory_answers_duplicate_with_the_recorded_file(
    outdir: Path,
) -> None:
    with opened(outdir) as first, opened(outdir) as second:
        [done] = first.commit([completed(first, "req", "画像_01", data=jpeg(1))])
        assert second.is_completed(("req", "画像_01"))
        again = completed(second, "req", "画像_01", seq=1, data=jpeg(2))
        [dup] = second.commit([again])
        assert dup.kind is Kind.DUPLICATE and dup.file_path == done.file_path
        assert again.staged is not None and not Path(again.staged.ref).exists()
    assert done.file_path is not None and done.file_path.read_bytes() == jpeg(1)
    assert len(completed_records(outdir, "req", "画像_01")) == 1
    assert sorted(p.name for p in outdir.glob("*.jpg")) == [done.file_path.name]


def race(directory: str, name: str, keys: int, ready: Any, answers: Any) -> None:
    """In a child process: commit every key once, each in its own commit, after a barrier."""
    results = open_results(Path(directory))
    try:
        ready.wait()
        decided: list[tuple[str, str | None]] = []
        for i in range(keys):
            [d] = results.commit([completed(results, "race", f"img_{i}", millis=MILLIS + i,
                                            data=f"{name} {i}".encode())])
            decided.append((d.kind.value, str(d.file_path) if d.file_path else None))
        answers.put((name, decided))
    finally:
        results.close()


def open_new_stores(directories: list[str], ready: Any, answers: Any) -> None:
    """A child that opens each new store at the same instant as its siblings."""
    errors = []
    for directory in directories:
        ready.wait()
        try:
            Store(Path(directory)).close()
        except DiskError as exc:
            errors.append(str(exc))
    answers.put(errors)


def test_processes_opening_a_new_store_at_once_all_open_it(tmp_path: Path) -> None:
    """Switching a new store to WAL takes an exclusive lock that SQLite refuses at once,
    without waiting, while a sibling holds a lock: several workers starting together
    on a new OUTPUT_DIR each failed now and then with "database is locked"."""
    processes, rounds = 6, 100
    directories = [str(tmp_path / f"out{i}") for i in range(rounds)]
    for directory in directories:
        os.mkdir(directory)
    ctx = multiprocessing.get_context("spawn")
    ready, answers = ctx.Barrier(processes), ctx.Queue()
    children = [ctx.Process(target=open_new_stores, args=(directories, ready, answers))
                for _ in range(processes)]
    for child in children:
        child.start()
    errors = [e for _ in children for e in answers.get(timeout=120)]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    assert errors == []
    for directory in directories:
        db = sqlite3.connect(Path(directory) / STORE)
        try:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        finally:
            db.close()


def test_two_processes_racing_on_the_same_tasks_complete_each_task_once(outdir: Path) -> None:
    keys = 40
    ctx = multiprocessing.get_context("spawn")
    ready, answers = ctx.Barrier(2), ctx.Queue()
    children = [ctx.Process(target=race, args=(str(outdir), n, keys, ready, answers))
                for n in ("a", "b")]
    for child in children:
        child.start()
    got = dict(answers.get(timeout=60) for _ in children)
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    for i in range(keys):
        (kind_a, path_a), (kind_b, path_b) = got["a"][i], got["b"][i]
        assert sorted((kind_a, kind_b)) == ["completed", "duplicate"], i
        assert path_a == path_b == str(outdir / f"img_{i}_{STAMP}.jpg")
        winner = "a" if kind_a == "completed" else "b"
        assert Path(path_a).read_bytes() == f"{winner} {i}".encode()
    records = read_results(outdir)
    assert len(records) == keys and {r["status"] for r in records} == {"completed"}
    assert len(list(outdir.glob("*.jpg"))) == keys
    assert temp_files(outdir) == [] and moves(outdir) == []


def test_a_failure_after_a_completion_is_a_duplicate_carrying_the_file(results: Committer,
                                                                       outdir: Path) -> None:
    [done] = results.commit([completed(results, "req", "img")])
    [late] = results.commit([failed("req", "img", seq=1, error="segment is gone")])
    assert late.kind is Kind.DUPLICATE and late.file_path == done.file_path
    assert [r["status"] for r in read_results(outdir)] == ["completed"]


def test_a_completion_after_a_failure_is_recorded(results: Committer, outdir: Path) -> None:
    [first] = results.commit([failed("req", "img")])
    [then] = results.commit([completed(results, "req", "img", seq=1)])
    assert (first.kind, then.kind) == (Kind.FAILED, Kind.COMPLETED)
    records = read_results(outdir)
    assert [r["status"] for r in records] == ["failed", "completed"]
    assert records[0]["file_path"] is None and records[0]["error"] == "bad shape"
    assert "error" not in records[1] and records[1]["entry_id"] == f"{MILLIS}-1"


def test_a_failure_without_readable_ids_is_recorded_with_null_ids(results: Committer,
                                                                   outdir: Path) -> None:
    [d] = results.commit([failed(None, None, error="message is not JSON")])
    assert d.kind is Kind.FAILED
    [record] = read_results(outdir)
    assert (record["request_id"], record["image_id"], record["file_path"]) == (None, None, None)
    assert record["timestamp"].endswith("+00:00")


def test_a_name_another_tasks_record_holds_gets_a_suffix(outdir: Path) -> None:
    with opened(outdir) as results:
        decided = results.commit([
            completed(results, "req_a", "img", millis=MILLIS + 100, data=jpeg(1)),
            completed(results, "req_b", "img", millis=MILLIS + 900, data=jpeg(2)),
        ])
    with opened(outdir) as again:  # a later process sees the names through the store
        [third] = again.commit([completed(again, "req_c", "img", millis=MILLIS + 500,
                                          data=jpeg(3))])
    names = [d.file_path.name for d in [*decided, third] if d.file_path]
    assert names == [f"img_{STAMP}.jpg", f"img_{STAMP}_1.jpg", f"img_{STAMP}_2.jpg"]
    for d, seed in zip([*decided, third], (1, 2, 3), strict=True):
        assert d.file_path is not None and d.file_path.read_bytes() == jpeg(seed)
    assert [r["file_path"] for r in read_results(outdir)] == [str(outdir / n) for n in names]


@pytest.mark.parametrize("plant", ["file", "symlink", "dangling symlink", "fifo"])
def test_a_name_taken_by_a_planted_entry_gets_a_suffix_and_the_entry_is_untouched(
    results: Committer, outdir: Path, tmp_path: Path, plant: str
) -> None:
    name = outdir / f"img_{STAMP}.jpg"
    target = tmp_path / "target.jpg"
    target.write_bytes(b"someone else's")
    links = {"symlink": target, "dangling symlink": tmp_path / "nowhere.jpg"}
    if plant == "file":
        name.write_bytes(b"planted")
    elif plant in links:
        name.symlink_to(links[plant])
    else:
        os.mkfifo(name)
    before = os.lstat(name)
    [d] = results.commit([completed(results, "req", "img", data=jpeg(1))])
    assert d.kind is Kind.COMPLETED and d.file_path == outdir / f"img_{STAMP}_1.jpg"
    assert d.file_path.read_bytes() == jpeg(1)
    after = os.lstat(name)
    assert (after.st_ino, after.st_mode, after.st_size) == (
        before.st_ino, before.st_mode, before.st_size)
    if plant == "file":
        assert name.read_bytes() == b"planted"
    elif plant == "fifo":
        assert stat.S_ISFIFO(after.st_mode)
    else:
        assert os.readlink(name) == str(links[plant])
    assert target.read_bytes() == b"someone else's"
    assert not (tmp_path / "nowhere.jpg").exists()


def commit_then_die(directory: str, request_id: str, image_id: str, millis: int,
                    data: bytes) -> None:
    """In a child process: commit one completed frame, then die (like SIGKILL) where the
    JPEG would be renamed into place: the record and its move are durable, the file is not
    at its name."""
    results = open_results(Path(directory))

    def die(_self: LocalFiles, _placed: list[Any]) -> None:
        os._exit(9)

    LocalFiles.finish = die  # type: ignore[method-assign]
    results.commit([completed(results, request_id, image_id, millis=millis, data=data)])
    os._exit(0)  # not reached


def die_after_commit(directory: Path, request_id: str = "req", image_id: str = "img",
                     millis: int = MILLIS, data: bytes = b"") -> Path:
    """Run `commit_then_die` in a child; the final path its record names."""
    child = multiprocessing.get_context("spawn").Process(
        target=commit_then_die, args=(str(directory), request_id, image_id, millis, data))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 9, "the child should have died right after its commit"
    [record] = completed_records(directory, request_id, image_id)
    final = Path(record["file_path"])
    assert not final.exists(), "the child died before renaming: its file is at a temp name"
    assert [m[2] for m in moves(directory)] == [final.name]  # relative to OUTPUT_DIR
    assert len(temp_files(directory)) == 1
    return final


def test_the_next_open_finishes_the_moves_of_a_writer_killed_after_its_commit(
    outdir: Path,
) -> None:
    final = die_after_commit(outdir, data=jpeg(7))
    with opened(outdir) as results:
        assert final.read_bytes() == jpeg(7)
        assert temp_files(outdir) == []
        assert moves(outdir) == []
        assert [p.name for p in (outdir / TEMPS).iterdir()] == [results.out.writer]
        [dup] = results.commit([completed(results, "req", "img", seq=1)])
        assert dup.kind is Kind.DUPLICATE and dup.file_path == final
    assert list((outdir / TEMPS).iterdir()) == []
    assert sorted(p.name for p in outdir.glob("*.jpg")) == [final.name]


@pytest.fixture
def no_sweeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The running sweep happens every few seconds; these tests act before any."""
    monkeypatch.setattr(commit, "SWEEP_EVERY_S", 3600.0)


@pytest.mark.usefixtures("no_sweeps")
@pytest.mark.parametrize("delivery", ["encoded again", "found completed", "failed"])
def test_a_duplicate_seen_by_a_live_instance_finishes_the_dead_writers_move_first(
    outdir: Path, delivery: str
) -> None:
    with opened(outdir) as live:  # opened before the child dies: its start-up sweep missed it
        final = die_after_commit(outdir, data=jpeg(7))
        if delivery == "encoded again":
            outcome = completed(live, "req", "img", seq=1, data=jpeg(8))
        elif delivery == "found completed":  # the pipeline's check before the segment
            outcome = Outcome(Entry(f"{MILLIS}-1", b"{}", 2), Kind.DUPLICATE, "req", "img")
        else:
            outcome = failed("req", "img", seq=1, error="segment is gone")
        [dup] = live.commit([outcome])
        assert dup.kind is Kind.DUPLICATE and dup.file_path == final
        assert final.read_bytes() == jpeg(7), "answered before the file was in place"
        dead = [p for p in (outdir / TEMPS).iterdir() if p.name != live.out.writer]
        assert len(dead) == 1, "a sweep ran: this test means the duplicate path"
    assert len(completed_records(outdir, "req", "img")) == 1
    assert sorted(p.name for p in outdir.glob("*.jpg")) == [final.name]


@pytest.mark.usefixtures("no_sweeps")
def test_a_name_a_dead_writer_has_yet_to_create_is_not_given_to_another_task(
    outdir: Path,
) -> None:
    with opened(outdir) as live:
        final = die_after_commit(outdir, request_id="req_a", millis=MILLIS, data=jpeg(7))
        [other] = live.commit([completed(live, "req_b", "img", millis=MILLIS + 300,
                                         data=jpeg(8))])
        assert other.file_path == outdir / f"img_{STAMP}_1.jpg" != final
    with opened(outdir):  # the sweep puts the dead writer's file in place, beside the other
        assert final.read_bytes() == jpeg(7)
        assert other.file_path.read_bytes() == jpeg(8)
    assert moves(outdir) == [] and temp_files(outdir) == []


def test_close_forgets_its_moves_and_removes_its_temp_directory(outdir: Path) -> None:
    with opened(outdir) as results:
        results.commit([completed(results, "req", f"img_{i}", seq=i) for i in range(3)])
        assert [m[0] for m in moves(outdir)] == [results.out.writer] * 3  # kept until next
    assert moves(outdir) == []
    assert list((outdir / TEMPS).iterdir()) == []


def block_day(directory: Path, day: str) -> None:
    """A file where the daily layout needs a directory: committing into it fails."""
    (directory / day).write_bytes(b"in the way")


def test_a_batch_that_fails_to_commit_leaves_no_jpeg_behind(outdir: Path) -> None:
    with opened(outdir, layout="daily") as results:
        block_day(results.out.path, "2024-11-20")
        next_day = MILLIS + 86_400_000
        batch = [completed(results, "req", "a", seq=0), completed(results, "req", "a", seq=1),
                 completed(results, "req", "b", millis=next_day)]
        with pytest.raises(DiskError):
            results.commit(batch)
        assert read_results(outdir) == []
        assert list(outdir.rglob("*.jpg")) == [], "a JPEG that no record references"
        (outdir / "2024-11-20").unlink()
        retry = [completed(results, "req", "a", seq=0), completed(results, "req", "a", seq=1),
                 completed(results, "req", "b", millis=next_day)]
        names = [d.file_path.name for d in results.commit(retry) if d.file_path]
        assert names == [f"a_{STAMP}.jpg", f"a_{STAMP}.jpg", "b_20241120_070640.jpg"]


def test_a_clean_close_after_a_failed_commit_leaves_no_temp_directory(outdir: Path) -> None:
    with opened(outdir, layout="daily") as results:
        block_day(results.out.path, "2024-11-19")
        with pytest.raises(DiskError):
            results.commit([completed(results, "req", "a")])
        assert read_results(outdir) == [] and temp_files(outdir) == []
    assert list((outdir / TEMPS).iterdir()) == []


def at(seconds: float) -> str:
    return (BASE + timedelta(seconds=seconds)).isoformat(timespec="microseconds")


def insert(store: Store, records: list[Record]) -> None:
    with store.transaction("test records") as tx:
        for record in records:
            tx.insert(record)


def sample(count: int, start: float = 0.0) -> list[Record]:
    """`count` records a second apart from `start`: three requests, every fifth failed."""
    made = []
    for i in range(count):
        failing = i % 5 == 0
        made.append(Record(at(start + i), f"req_{i % 3}", f"img_{i}",
                           None if failing else f"/out/img_{i}.jpg",
                           None if failing else f"file:///out/img_{i}.jpg",
                           "failed" if failing else "completed",
                           "bad shape" if failing else None, f"{i + 1}-0"))
    return made


def as_doc(record: Record) -> dict[str, Any]:
    doc = dict(zip(("timestamp", "request_id", "image_id", "file_path", "image_url", "status",
                    "error", "entry_id"), record.row(), strict=True))
    if doc["status"] == "completed":
        del doc["error"]
    return doc


@pytest.fixture
def store(outdir: Path) -> Iterator[Store]:
    outdir.mkdir(parents=True)
    made = Store(outdir)
    yield made
    made.close()


def test_export_gives_every_record_oldest_first_across_steps(store: Store) -> None:
    records = sample(2 * EXPORT_STEP + 345)
    insert(store, records)
    assert list(store.export()) == [as_doc(r) for r in records]


@pytest.mark.parametrize("filters", [
    {"since": at(1000)},
    {"until": at(1000)},
    {"since": at(999.5), "until": at(2001)},
    {"since": at(10_000)},
    {"until": at(-1)},
    {"request_id": "req_1"},
    {"status": "failed"},
    {"status": "completed", "request_id": "req_2", "since": at(500), "until": at(1700)},
    {"request_id": "nobody"},
], ids=lambda f: ",".join(f))
def test_export_filters(store: Store, filters: dict[str, str]) -> None:
    records = sample(2 * EXPORT_STEP + 345)
    insert(store, records)

    def wanted(r: Record) -> bool:
        return (("since" not in filters or r.timestamp >= filters["since"])
                and ("until" not in filters or r.timestamp < filters["until"])
                and filters.get("request_id", r.request_id) == r.request_id
                and filters.get("status", r.status) == r.status)

    assert list(store.export(**filters)) == [as_doc(r) for r in records if wanted(r)]


def test_export_since_is_inclusive_and_until_exclusive(store: Store) -> None:
    insert(store, sample(10))
    assert [r["image_id"] for r in store.export(since=at(3), until=at(6))] == [
        "img_3", "img_4", "img_5"]


def test_export_of_an_empty_store_is_empty(store: Store) -> None:
    assert list(store.export()) == [] and list(store.export(since=at(0))) == []


def test_get_gives_a_requests_records_or_one_images_oldest_first(store: Store) -> None:
    records = sample(30)
    again = Record(at(99), "req_1", "img_1", None, None, "failed", "again", "99-0")
    insert(store, [*records, again])
    got = store.get("req_1")
    assert [r["image_id"] for r in got] == [f"img_{i}" for i in range(1, 30, 3)] + ["img_1"]
    assert store.get("req_1", "img_1") == [as_doc(records[1]), {
        "timestamp": at(99), "request_id": "req_1", "image_id": "img_1", "file_path": None,
        "image_url": None, "status": "failed", "error": "again", "entry_id": "99-0"}]
    assert store.get("req_1", "img_2") == [] and store.get("nobody") == []


def test_prune_deletes_only_older_records_a_step_at_a_time(store: Store) -> None:
    old = 2 * PRUNE_STEP + 123
    insert(store, sample(old, start=0) + sample(50, start=100_000))
    before = at(100_000)  # the first newer record is exactly at the bound: kept
    assert store.counts() == {"total": old + 50}
    assert [store.prune(before) for _ in range(4)] == [PRUNE_STEP, PRUNE_STEP, 123, 0]
    assert store.counts() == {"total": 50}
    left = list(store.export())
    assert left[0]["timestamp"] == before and len(left) == 50


def test_prune_takes_the_oldest_first(store: Store) -> None:
    insert(store, sample(PRUNE_STEP + 10))
    assert store.prune(at(10_000)) == PRUNE_STEP
    assert [r["image_id"] for r in store.export()] == [
        f"img_{i}" for i in range(PRUNE_STEP, PRUNE_STEP + 10)]


def prune_cost(directory: Path, total: int, old: int) -> int:
    """SQLite's virtual-machine steps for one retention step over `total` records whose
    `old` oldest are past retention: a measure of the rows it reads."""
    directory.mkdir(parents=True)
    store = Store(directory)
    conn = sqlite3.connect(directory / STORE, isolation_level=None)
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    try:
        with store.transaction("test records") as tx:
            tx.db.executemany(
                "INSERT INTO records (timestamp, request_id, image_id, status, error)"
                " VALUES (?, 'r', ?, 'failed', 'x')",
                ((at(i if i < old else 1_000_000 + i), f"i{i}") for i in range(total)))
        conn.set_progress_handler(step, 100)
        assert store.prune(at(500_000), conn) == old
    finally:
        conn.close()
        store.close()
    return steps


def test_a_retention_step_reads_the_head_of_the_history_not_all_of_it(tmp_path: Path) -> None:
    small = prune_cost(tmp_path / "small", 10_000, old=100)
    large = prune_cost(tmp_path / "large", 100_000, old=100)
    assert large < 2 * small, f"{small} steps for 10,000 records, {large} for 100,000"


def test_counts_follow_commits(results: Committer) -> None:
    assert results.store.counts() == {"total": 0}
    results.commit([completed(results, "r", f"i{i}", seq=i) for i in range(3)])
    results.commit([failed("r", "bad")])
    assert results.store.counts() == {"total": 4}


def test_retention_while_open_removes_old_records_in_steps(outdir: Path) -> None:
    outdir.mkdir(parents=True)
    old = datetime.now(UTC) - timedelta(days=40)
    seeded = Store(outdir)
    insert(seeded, [Record(old.isoformat(timespec="microseconds"), "old", f"i{i}", None, None,
                           "failed", "x", None) for i in range(3 * PRUNE_STEP)])
    seeded.close()
    with opened(outdir, retention_days=30) as results:
        results.commit([completed(results, "new", "img")])
        wait_for(lambda: results.store.counts()["total"] == 1, timeout=20,
                 what="retention to delete the old records")
        assert [r["request_id"] for r in read_results(outdir)] == ["new"]


def test_results_json_holds_the_latest_records_oldest_first(outdir: Path) -> None:
    with opened(outdir, view_entries=5) as results:
        assert read_view(outdir) == []
        for i in range(8):
            outcome = (failed("req", f"img_{i}", seq=i) if i % 3 == 0
                       else completed(results, "req", f"img_{i}", seq=i))
            results.commit([outcome])
        latest = read_results(outdir)[-5:]
        assert [r["image_id"] for r in latest] == [f"img_{i}" for i in range(3, 8)]
        wait_for(lambda: read_view(outdir) == latest, timeout=VIEW_DEADLINE_S,
                 what="results.json to show the last commit")
    view = read_view(outdir)
    assert view == latest
    assert {frozenset(r) for r in view} == {
        frozenset({"timestamp", "request_id", "image_id", "file_path", "image_url", "status",
                   "entry_id"}),
        frozenset({"timestamp", "request_id", "image_id", "file_path", "image_url", "status",
                   "error", "entry_id"})}


def test_results_json_follows_each_commit_within_about_a_second(results: Committer,
                                                                outdir: Path) -> None:
    for i in range(3):
        results.commit([completed(results, "req", f"img_{i}", seq=i)])
        wait_for(lambda i=i: [r["image_id"] for r in read_view(outdir)][-1:] == [f"img_{i}"],
                 timeout=VIEW_DEADLINE_S, what=f"results.json to show img_{i}")


def test_results_json_is_a_complete_document_at_every_read(outdir: Path) -> None:
    seen: list[int] = []
    broken: list[BaseException] = []
    done = threading.Event()

    def read_all_the_time() -> None:
        while not done.is_set():
            try:
                seen.append(len(json.loads((outdir / RESULTS).read_bytes())))
            except FileNotFoundError:
                continue
            except ValueError as exc:
                broken.append(exc)

    with opened(outdir, view_entries=20) as results:
        reader = threading.Thread(target=read_all_the_time)
        reader.start()
        try:
            for i in range(40):
                results.commit([completed(results, "req", f"img_{i}", seq=i)])
            # until the reader itself has read a full view (not only this thread)
            wait_for(lambda: seen and seen[-1] == 20, timeout=VIEW_DEADLINE_S,
                     what="the reader to see a full view")
        finally:
            done.set()
            reader.join()
    assert not broken, broken[0]


def test_results_json_is_rebuilt_from_the_store_at_open(outdir: Path) -> None:
    with opened(outdir, view_entries=3) as results:
        results.commit([completed(results, "req", f"img_{i}", seq=i) for i in range(5)])
    (outdir / RESULTS).write_text('[{"truncated":')
    with opened(outdir, view_entries=3):
        assert read_view(outdir) == read_results(outdir)[-3:]
    (outdir / RESULTS).unlink()
    with opened(outdir, view_entries=10):
        assert read_view(outdir) == read_results(outdir)


def test_no_results_json_when_its_entries_are_zero(outdir: Path) -> None:
    with opened(outdir, view_entries=0) as results:
        results.commit([completed(results, "req", "img"), failed("req", "bad")])
        assert results.store.counts() == {"total": 2}
    assert not (outdir / RESULTS).exists()
    assert len(read_results(outdir)) == 2


@pytest.mark.usefixtures("seoul_time")
def test_daily_layout_puts_files_under_the_utc_day_of_the_entry(outdir: Path) -> None:
    last_ms_of_day = 1_732_060_799_999  # 2024-11-19 23:59:59.999 UTC (the 20th in Seoul)
    with opened(outdir, layout="daily") as results:
        decided = results.commit([
            completed(results, "req", "late", millis=last_ms_of_day),
            completed(results, "req", "early", millis=last_ms_of_day + 1),
            completed(results, "req", "again", millis=last_ms_of_day + 2),
        ])
    assert [d.file_path for d in decided] == [
        outdir / "2024-11-19" / "late_20241119_235959.jpg",
        outdir / "2024-11-20" / "early_20241120_000000.jpg",
        outdir / "2024-11-20" / "again_20241120_000000.jpg",
    ]
    assert all(d.file_path and d.file_path.is_file() for d in decided)
    assert [r["file_path"] for r in read_results(outdir)] == [str(d.file_path) for d in decided]
    assert list(outdir.glob("*.jpg")) == []


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that takes nothing away: the modes seen are the ones the code chose."""
    old = os.umask(0)
    yield
    os.umask(old)


@pytest.mark.usefixtures("open_umask")
def test_the_store_and_the_lock_are_private(outdir: Path) -> None:
    with opened(outdir) as results:
        results.commit([completed(results, "req", "img")])
        for name in (STORE, f"{STORE}-wal", f"{STORE}-shm", LOCK):
            assert stat.S_IMODE(os.stat(outdir / name).st_mode) == 0o600, name
        assert stat.S_IMODE(os.stat(outdir / TEMPS).st_mode) == 0o700


def test_a_clean_close_leaves_the_store_the_lock_the_view_and_the_jpegs(outdir: Path) -> None:
    with opened(outdir) as results:
        results.commit([completed(results, "req", f"img_{i}", seq=i) for i in range(3)]
                       + [failed("req", "bad")])
        with opened(outdir) as other:  # a second writer, closed first
            other.commit([completed(other, "req2", "img", seq=9)])
        wait_for(lambda: len(read_view(outdir)) == 5, timeout=VIEW_DEADLINE_S,
                 what="the view")
        left_open = {p.name for p in outdir.iterdir()}
        assert {f"{STORE}-wal", f"{STORE}-shm"} <= left_open  # while a connection is open
    assert dot_files(outdir) == CLEAN_DOT_FILES == sorted([STORE, LOCK, TEMPS])
    names = {p.name for p in outdir.iterdir() if not p.name.startswith(".")}
    assert names == {RESULTS} | {str(Path(r["file_path"]).name) for r in read_results(outdir)
                                 if r["status"] == "completed"}
    assert len(names) == 5 and len(read_view(outdir)) == 5


def test_start_up_leaves_unrelated_jpegs_alone(outdir: Path) -> None:
    outdir.mkdir(parents=True)
    for i in range(5000):
        (outdir / f"other_{i}_20260101_000000.jpg").write_bytes(b"%d" % i)
    before = {e.name: (e.inode(), e.stat().st_mtime_ns) for e in os.scandir(outdir)}
    for attempt in range(2):  # the first open (an upgrade) and a later one
        with opened(outdir) as results:
            [d] = results.commit([completed(results, "req", "img", seq=attempt)])
            assert d.kind is (Kind.COMPLETED if attempt == 0 else Kind.DUPLICATE)
    after = {e.name: (e.inode(), e.stat().st_mtime_ns) for e in os.scandir(outdir)}
    assert {n: after[n] for n in before} == before
    assert all((outdir / f"other_{i}_20260101_000000.jpg").read_bytes() == b"%d" % i
               for i in range(0, 5000, 499))
    assert read_results(outdir)[0]["image_id"] == "img"
