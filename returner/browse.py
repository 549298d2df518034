"""Reading the results store as a person browses it: pages of records newest first, one
record by its id, and how many there are. Every query is led by an index, so a page
costs the same with ten records or ten million (the console's reads).

Pages are keyset pages on the records' `id` (commit order): the next page is the ids
below the last one shown, never an OFFSET, which would read every row it skips.
"""

from __future__ import annotations

from typing import Any

from returner.store import FIELDS, Store, as_dict
from returner.store import as_disk_error as translated

_COLUMNS = ", ".join(("id", *FIELDS))
_ABOVE_ALL = 2**63 - 1  # above every id: the newest page


def page(
    store: Store,
    before: int | None = None,
    count: int = 50,
    request_id: str | None = None,
    image_id: str | None = None,
    failed: bool = False,
) -> list[tuple[int, dict[str, Any]]]:
    """(id, record) of up to `count` records with ids below `before`, newest first.

    Only a request's (index records_key; with `image_id`, one image of it), only failed
    ones (records_failed), or both. Raises ValueError for `image_id` without
    `request_id` (no index leads to it), DiskError.
    """
    if image_id is not None and request_id is None:
        raise ValueError("an image id is looked up within its request")
    conditions = ["id < ?"]
    params: list[int | str] = [_ABOVE_ALL if before is None else before]
    for column, value in (("request_id", request_id), ("image_id", image_id)):
        if value is not None:
            conditions.append(f"{column} = ?")
            params.append(value)
    if failed:
        conditions.append("status = 'failed'")
    query = (
        f"SELECT {_COLUMNS} FROM records WHERE {' AND '.join(conditions)} ORDER BY id DESC LIMIT ?"
    )
    with translated("reading the results store"):
        rows = store.db.execute(query, (*params, count)).fetchall()
    return [(int(row[0]), as_dict(row[1:])) for row in rows]


def record(store: Store, record_id: int) -> dict[str, Any] | None:
    """The record with this id, if it is still there. Raises DiskError."""
    with translated("reading the results store"):
        row = store.db.execute(
            f"SELECT {_COLUMNS} FROM records WHERE id = ?", (record_id,)
        ).fetchone()
    return None if row is None else as_dict(row[1:])


def span(store: Store) -> int:
    """Ids from the oldest record to the newest: the number of records, from two index
    lookups (count(*) reads a whole index: 1.7 s at 10 million). Records are deleted
    from the oldest end only, so it is exact but for a record that a clock step let
    retention take out of order. Raises DiskError."""
    with translated("counting records"):
        (ids,) = store.db.execute(
            "SELECT (SELECT max(id) FROM records) - (SELECT min(id) FROM records) + 1"
        ).fetchone()
    return int(ids or 0)
