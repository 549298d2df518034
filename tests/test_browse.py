"""Browsing the results store (returner.browse) against a real SQLite file: keyset pages
newest first, by request, by image, failed only; one record by id; the number of
records; and that every page is led by an index, so its cost does not grow with the
history."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from returner import browse
from returner.store import STORE, Record, Store
from tests.test_results import as_doc, at, insert, sample


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    made = Store(tmp_path)
    yield made
    made.close()


def every_page(store: Store, size: int, **query: Any) -> list[list[dict[str, Any]]]:
    """Walk the pages as the console does: each from below the last id shown."""
    pages, before = [], None
    while rows := browse.page(store, before, size, **query):
        pages.append([record for _, record in rows])
        before = rows[-1][0]
    return pages


def test_pages_go_newest_first_and_cover_every_record_once(store: Store) -> None:
    records = sample(23)
    insert(store, records)
    pages = every_page(store, 5)
    assert [len(p) for p in pages] == [5, 5, 5, 5, 3]
    assert [r for p in pages for r in p] == [as_doc(r) for r in reversed(records)]


def test_a_request_an_image_and_failed_only(store: Store) -> None:
    records = sample(30)  # requests req_0..2 in turn, every fifth failed
    again = Record(at(99), "req_1", "img_1", None, None, "failed", "again", "99-0")
    insert(store, [*records, again])
    newest_first = [as_doc(r) for r in reversed(records)]
    req_1 = [r for r in every_page(store, 4, request_id="req_1") for r in r]
    assert [r["image_id"] for r in req_1] == ["img_1"] + [d["image_id"] for d in newest_first
                                                          if d["request_id"] == "req_1"]
    one = [r for p in every_page(store, 1, request_id="req_1", image_id="img_1") for r in p]
    assert [(r["status"], r.get("error")) for r in one] == [("failed", "again"),
                                                            ("completed", None)]
    failures = [r for p in every_page(store, 3, failed=True) for r in p]
    assert [r["image_id"] for r in failures] == ["img_1"] + [
        d["image_id"] for d in newest_first if d["status"] == "failed"]
    both = [r for p in every_page(store, 3, request_id="req_0", failed=True) for r in p]
    assert both and all(r["request_id"] == "req_0" and r["status"] == "failed" for r in both)
    assert browse.page(store, request_id="nobody") == []


def test_an_image_id_alone_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="within its request"):
        browse.page(store, image_id="img_1")


def test_a_record_by_id_and_the_number_of_records(store: Store) -> None:
    records = sample(700)
    insert(store, records)
    assert browse.span(store) == 700
    [(newest_id, newest)] = browse.page(store, count=1)
    assert browse.record(store, newest_id) == newest == as_doc(records[-1])
    assert browse.record(store, newest_id + 1) is None
    store.prune(at(600))  # retention takes the oldest 500 (one step)
    assert browse.span(store) == 200 == store.counts()["total"]
    (store.path.parent / "empty").mkdir()
    empty = Store(store.path.parent / "empty")
    try:
        assert browse.span(empty) == 0
    finally:
        empty.close()


def steps(store: Store, **query: Any) -> int:
    """SQLite's virtual-machine steps (in units of 100) for the first page: a measure of
    the rows it reads."""
    counted = [0]

    def step() -> int:
        counted[0] += 1
        return 0

    store.db.set_progress_handler(step, 100)
    try:
        assert browse.page(store, None, 50, **query) is not None
    finally:
        store.db.set_progress_handler(None, 0)
    return counted[0]


@pytest.mark.parametrize("query", [
    {}, {"failed": True}, {"request_id": "req_7"}, {"request_id": "req_7", "image_id": "img_60"},
    {"request_id": "req_7", "failed": True},
], ids=["newest", "failed", "request", "image", "request-failed"])
def test_a_page_costs_the_same_in_a_long_history(tmp_path: Path, query: dict[str, Any]
                                                  ) -> None:
    """Eight images a request, and no failure but one: failed only must not scan."""
    costs = []
    for total in (2_000, 60_000):
        (tmp_path / str(total)).mkdir()
        store = Store(tmp_path / str(total))
        try:
            with store.transaction("test records") as tx:
                tx.db.executemany(
                    "INSERT INTO records (timestamp, request_id, image_id, status, error)"
                    " VALUES (?, ?, ?, ?, ?)",
                    ((at(i), f"req_{i // 8}", f"img_{i}", "failed" if i == 7 else "completed",
                      "x" if i == 7 else None) for i in range(total)))
                tx.db.execute("CREATE INDEX IF NOT EXISTS records_key"
                              " ON records (request_id, image_id)")  # as an import leaves it
            costs.append(steps(store, **query))
        finally:
            store.close()
    small, large = costs
    assert large <= small * 2 + 5, f"{query}: {small} -> {large} steps for 30x the records"


def test_the_failed_index_holds_only_failed_records(store: Store) -> None:
    insert(store, sample(50))
    conn = sqlite3.connect(store.path.parent / STORE)
    try:
        [(sql,)] = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'records_failed'").fetchall()
        assert "WHERE status = 'failed'" in sql
        # A partial index's entries: count them through it.
        (indexed,) = conn.execute("SELECT count(*) FROM records INDEXED BY records_failed"
                                  " WHERE status = 'failed'").fetchone()
        assert indexed == 10
    finally:
        conn.close()
