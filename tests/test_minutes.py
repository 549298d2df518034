"""The per-minute counts of the results store, against a real store and real commits:
each commit adds its completed and failed records to its minute in the same
transaction (a rolled-back outcome adds nothing, a duplicate adds nothing), a reader
gets an hour of them in one indexed read, and retention prunes them with the records."""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from returner.commit import Committer
from returner.errors import DiskError
from returner.output import LocalFiles
from returner.store import MINUTE, STORE, Store
from returner.task import Kind
from tests.conftest import opened, read_results
from tests.test_results import at, completed, failed


@pytest.fixture
def results(tmp_path: Path) -> Iterator[Committer]:
    with opened(tmp_path / "out") as made:
        yield made


def minutes(directory: Path, since: str = "0000") -> list[tuple[str, int, int]]:
    store = Store(directory, create=False, read_only=True)
    try:
        return store.minutes(since)
    finally:
        store.close()


def counted_from_records(directory: Path) -> dict[str, tuple[int, int]]:
    """What the minutes should say: the records counted by minute and status."""
    tally: Counter[tuple[str, str]] = Counter()
    for record in read_results(directory):
        tally[record["timestamp"][:MINUTE], record["status"]] += 1
    found = {minute for minute, _ in tally}
    return {m: (tally[m, "completed"], tally[m, "failed"]) for m in sorted(found)}


def test_a_commit_counts_its_completed_and_failed_records_in_its_minute(
    results: Committer,
) -> None:
    out = results.out.path
    decisions = results.commit([completed(results, "r", "a"), completed(results, "r", "b"),
                                failed("r", "c", error="bad shape")])
    assert [d.kind for d in decisions] == [Kind.COMPLETED, Kind.COMPLETED, Kind.FAILED]
    [(minute, done, bad)] = minutes(out)
    assert (done, bad) == (2, 1)
    assert minute == read_results(out)[0]["timestamp"][:MINUTE]
    assert len(minute) == len("2026-01-01T00:00") and minute[10] == "T"

    # A duplicate records nothing, so it counts nothing; a second commit adds up.
    again = results.commit([completed(results, "r", "a"), failed("r", "d", seq=1)])
    assert [d.kind for d in again] == [Kind.DUPLICATE, Kind.FAILED]
    assert {m: (c, f) for m, c, f in minutes(out)} == counted_from_records(out)
    assert sum(c + f for _, c, f in minutes(out)) == len(read_results(out)) == 4


def test_an_outcome_rolled_back_is_not_counted(
    results: Committer, monkeypatch: pytest.MonkeyPatch
) -> None:
    free_name = LocalFiles._free_name

    def buggy(self: LocalFiles, tx: Any, image_id: str, millis: int) -> Path:
        if image_id == "bug":
            raise RuntimeError("a bug in naming")
        return free_name(self, tx, image_id, millis)

    monkeypatch.setattr(LocalFiles, "_free_name", buggy)
    kinds = [d.kind for d in results.commit(
        [completed(results, "r", "ok"), completed(results, "r", "bug"), failed("r", "x")])]
    assert kinds == [Kind.COMPLETED, Kind.RETRY, Kind.FAILED]
    assert [(c, f) for _, c, f in minutes(results.out.path)] == [(1, 1)]


def test_a_failed_commit_counts_nothing(results: Committer, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    results.commit([completed(results, "r", "first")])

    def full_disk(*_args: Any, **_kwargs: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr("returner.store.Tx.count_minute", full_disk)
    with pytest.raises(DiskError):
        results.commit([completed(results, "r", "second")])
    monkeypatch.undo()
    # The records of the failed commit were rolled back with their count.
    assert [r["image_id"] for r in read_results(results.out.path)] == ["first"]
    assert [(c, f) for _, c, f in minutes(results.out.path)] == [(1, 0)]


def test_minutes_are_read_from_a_given_minute_on_oldest_first(tmp_path: Path) -> None:
    store = Store(tmp_path)
    try:
        with store.transaction("test counts") as tx:
            for second in (0, 30, 60, 3600, 3660):
                tx.count_minute(at(second), 1, second % 2)
        assert store.minutes(at(60)) == [
            ("2026-01-01T00:01", 1, 0), ("2026-01-01T01:00", 1, 0), ("2026-01-01T01:01", 1, 0)]
        assert store.minutes(at(0))[0] == ("2026-01-01T00:00", 2, 0)
        # The range read follows the primary key: no scan of the table.
        plan = store.db.execute("EXPLAIN QUERY PLAN SELECT minute, completed, failed"
                                " FROM minutes WHERE minute >= ? ORDER BY minute", ("x",))
        assert "SEARCH minutes USING PRIMARY KEY" in " ".join(row[3] for row in plan)
    finally:
        store.close()


def test_retention_prunes_the_minutes_before_its_bound(tmp_path: Path) -> None:
    store = Store(tmp_path)
    try:
        with store.transaction("test counts") as tx:
            for second in (0, 59, 60, 120):
                tx.count_minute(at(second), 1, 0)
        assert store.prune(at(65)) == 0  # no records, but the older minute goes
        assert store.minutes(at(0)) == [("2026-01-01T00:01", 1, 0), ("2026-01-01T00:02", 1, 0)]
    finally:
        store.close()


def test_a_store_from_before_the_minutes_has_none(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / STORE)
    conn.execute("CREATE TABLE records (id INTEGER PRIMARY KEY, timestamp TEXT NOT NULL,"
                 " request_id TEXT, image_id TEXT, file_path TEXT, status TEXT NOT NULL,"
                 " error TEXT, entry_id TEXT)")
    conn.close()
    assert minutes(tmp_path) == []
    Store(tmp_path).close()  # the service opening it adds the table
    assert minutes(tmp_path) == []
    assert "minutes" in {name for (name,) in sqlite3.connect(tmp_path / STORE).execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_a_read_only_store_cannot_write(results: Committer) -> None:
    results.commit([completed(results, "r", "a")])
    store = Store(results.out.path, create=False, read_only=True)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.db.execute("DELETE FROM records")
        with pytest.raises(DiskError), store.transaction("writing through a reader") as tx:
            tx.count_minute(at(0), 1, 0)
    finally:
        store.close()
    assert len(read_results(results.out.path)) == 1
