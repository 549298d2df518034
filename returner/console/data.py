"""Every read and action of the console, as plain calls: what the pages show and what
their buttons do, through the service's own API (`Stream`, a read-only `Store`,
`returner.browse`). Nothing here knows about HTTP.

Reads use Redis's read commands and read-only store connections with a short busy
timeout, so the console never holds a lock the service waits for; the only writes are
a replay's, the same `Stream.revive` as `returner replay --dead-letter`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from returner import browse
from returner.console.chart import NARROW, Chart, hour_chart
from returner.console.thumbs import LocalFiles, shrink, source_jpeg
from returner.errors import DiskError, RedisUnavailable, ReturnerError, SettingsError
from returner.objectstore import ObjectStore
from returner.settings import Settings, object_store_config
from returner.store import Store
from returner.stream import DeadLetter as Letter
from returner.stream import Stream

PAGE = 50  # records or dead letters per page
REPLAY_STEP = 100  # dead letters read per step of "replay all", as replay --dead-letter
POOL = 4  # idle read-only store connections kept
THUMBS_CACHED = 512  # recent thumbnails kept in memory (about 15 kB each)
THUMBS_AT_ONCE = 1  # decoding runs on one core at most: the service's cores are its own


@dataclass(frozen=True)
class Overview:
    """The overview at one instant; `redis_error` / `store_error` when one was not read."""

    at: datetime
    status: dict[str, Any] | None
    records: int | None  # None: no store yet (or not readable)
    chart: Chart
    narrow_chart: Chart  # the same, for a phone
    redis_error: str | None = None
    store_error: str | None = None


@dataclass(frozen=True)
class Query:
    """A search of the results: a request (and one image of it), failed only, and the
    page (ids below `before`)."""

    request_id: str | None = None
    image_id: str | None = None
    failed: bool = False
    before: int | None = None

    @property
    def refused(self) -> str | None:
        """Why this query is not run, if it is not."""
        if self.image_id is not None and self.request_id is None:
            return "An image id is looked up within its request: give the request id too."
        return None


@dataclass(frozen=True)
class Row:
    id: int
    record: dict[str, Any]

    @property
    def has_image(self) -> bool:
        record = self.record
        return record["status"] == "completed" and bool(record["file_path"] or record["image_url"])


@dataclass(frozen=True)
class ResultsPage:
    query: Query
    rows: list[Row] = field(default_factory=list)
    older: int | None = None  # `before` of the next page, if there is one
    error: str | None = None


@dataclass(frozen=True)
class DeadLetter:
    id: str
    request_id: str
    image_id: str
    error: str
    deliveries: str
    entry_id: str
    consumer: str
    task: str  # the message, as text, cut
    age_s: float


@dataclass(frozen=True)
class DeadPage:
    letters: list[DeadLetter]
    total: int | None
    older: str | None  # `before` of the next page
    error: str | None = None


@dataclass(frozen=True)
class Replayed:
    """What a replay did: dead letters moved back into the stream, and those already
    gone (replayed from elsewhere meanwhile)."""

    moved: int
    gone: int = 0


def _cut(value: str | None, cut: int = 2000) -> str:
    return "" if value is None else value[:cut]


def _age_s(stream_id: str, now_ms: float) -> float:
    try:
        return max(0.0, (now_ms - int(stream_id.split("-")[0])) / 1000)
    except ValueError:
        return 0.0


def dead_letter(letter: Letter, now_ms: float) -> DeadLetter:
    return DeadLetter(
        id=letter.id,
        request_id=_cut(letter.request_id),
        image_id=_cut(letter.image_id),
        error=_cut(letter.error),
        deliveries="" if letter.deliveries is None else str(letter.deliveries),
        entry_id=_cut(letter.entry_id),
        consumer=_cut(letter.consumer),
        task=letter.payload[:600].decode("utf-8", "replace"),
        age_s=_age_s(letter.id, now_ms),
    )


class Data:
    """The console's view of one queue's Redis keys and one OUTPUT_DIR."""

    def __init__(self, settings: Settings) -> None:
        """Raises SettingsError when REDIS_URL is not set."""
        if not settings.redis_url:
            raise SettingsError("REDIS_URL: not set; the console reads the service's Redis")
        self.queue = settings.hosting_tasks_queue
        # Never joins the group: it only reads, and revives.
        self.stream = Stream.from_settings(settings, settings.redis_url)
        self.gone_after_ms = settings.consumer_timeout_ms
        self.output_dir = settings.output_dir
        self.files = LocalFiles(settings.output_dir)
        config = object_store_config(settings)
        self.objects = None if config is None else ObjectStore(config)
        self._idle: list[Store] = []
        self._pool_lock = threading.Lock()
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self._decoding = threading.BoundedSemaphore(THUMBS_AT_ONCE)

    def close(self) -> None:
        with self._pool_lock:
            for store in self._idle:
                store.close()
            self._idle.clear()
        self.files.close()

    @contextlib.contextmanager
    def store(self) -> Iterator[Store]:
        """A read-only connection to the store, from a small pool. Raises DiskError
        when there is no store (yet)."""
        with self._pool_lock:
            store = self._idle.pop() if self._idle else None
        if store is None:
            store = Store(self.output_dir, create=False, read_only=True)
        try:
            yield store
        except BaseException:
            store.close()  # it may be in the middle of something: not reused
            raise
        with self._pool_lock:
            if len(self._idle) < POOL:
                self._idle.append(store)
                return
        store.close()

    def overview(self) -> Overview:
        """The queue, pending work per consumer, dead letters, records and the last
        hour's chart; a part that cannot be read says why instead."""
        now = datetime.now(UTC)
        status, redis_error = None, None
        try:
            status = dataclasses.asdict(self.stream.status(self.gone_after_ms))
        except RedisUnavailable as exc:
            redis_error = str(exc)
        records, minutes, store_error = None, [], None
        try:
            with self.store() as store:
                records = browse.span(store)
                minutes = store.minutes((now - timedelta(hours=1)).isoformat())
        except DiskError as exc:
            store_error = _store_problem(exc)
        wide, narrow = hour_chart(minutes, now), hour_chart(minutes, now, NARROW)
        return Overview(now, status, records, wide, narrow, redis_error, store_error)

    def results(self, query: Query) -> ResultsPage:
        """A page of records, newest first."""
        if query.refused:
            return ResultsPage(query, error=query.refused)
        try:
            with self.store() as store:
                found = browse.page(
                    store,
                    query.before,
                    PAGE + 1,
                    query.request_id,
                    query.image_id,
                    query.failed,
                )
        except DiskError as exc:
            return ResultsPage(query, error=_store_problem(exc))
        rows = [Row(i, record) for i, record in found[:PAGE]]
        older = rows[-1].id if len(found) > PAGE else None
        return ResultsPage(query, rows, older)

    def dead_letters(self, before: str | None = None) -> DeadPage:
        """A page of dead letters, newest first."""
        now_ms = time.time() * 1000
        try:
            found = self.stream.latest_dead_letters(PAGE + 1, before or "+")
            total = self.stream.observe().dead_letters
        except RedisUnavailable as exc:
            return DeadPage([], None, None, str(exc))
        letters = [dead_letter(letter, now_ms) for letter in found[:PAGE]]
        older = letters[-1].id if len(found) > PAGE else None
        return DeadPage(letters, total, older)

    def replay(self, dead_id: str) -> Replayed:
        """Move one dead letter back into the stream. Raises RedisUnavailable."""
        return Replayed(1) if self.stream.revive(dead_id) else Replayed(0, 1)

    def replay_all(self, request_id: str | None = None) -> Replayed:
        """Move every dead letter (of a request) back into the stream, oldest first, as
        `returner replay --dead-letter` does: only those there when it began. Raises
        RedisUnavailable."""
        moved = gone = 0
        for letter in self.stream.each_dead_letter(request_id):
            if self.stream.revive(letter.id):
                moved += 1
            else:
                gone += 1
        return Replayed(moved, gone)

    def thumbnail(self, record_id: int) -> bytes | None:
        """A small JPEG of the record's image; None if it has none to show."""
        with self._thumbs_lock:
            if record_id in self._thumbs:
                self._thumbs.move_to_end(record_id)
                return self._thumbs[record_id]
        try:
            with self.store() as store:
                record = browse.record(store, record_id)
        except DiskError:
            return None
        jpeg = source_jpeg(record, self.files, self.objects) if record is not None else None
        if jpeg is None:
            return None
        with self._decoding:
            small = shrink(jpeg)
        if small is not None:
            with self._thumbs_lock:
                self._thumbs[record_id] = small
                while len(self._thumbs) > THUMBS_CACHED:
                    self._thumbs.popitem(last=False)
        return small


def _stream_id(value: str) -> tuple[int, int]:
    millis, _, seq = value.partition("-")
    return int(millis), int(seq or 0)


def _store_problem(exc: ReturnerError) -> str:
    if "unable to open" in str(exc) or "No such file" in str(exc):
        return "No results store yet: the service has not started on this OUTPUT_DIR."
    return str(exc)
