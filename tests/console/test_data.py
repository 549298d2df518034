"""The console's reads and actions (returner.console.data) against a real Redis and a
real store, without a server: replay as `replay --dead-letter` does it (one, all, one
request's), bounded to the dead letters there when it began; pages of dead letters
newest first; what the overview says before there is a store; a search that no index
leads to is not run."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from returner.console.data import PAGE, Data, Query, Replayed
from returner.settings import Settings
from returner.stream import Consumer, Stream
from tests.conftest import dead_lettered

MakeSettings = Callable[..., Settings]


@pytest.fixture
def data(make_settings: MakeSettings) -> Iterator[Data]:
    made = Data(make_settings())
    yield made
    made.close()


def dead_letter(r: redis.Redis, stream: Consumer, request_id: str, image_id: str) -> None:
    """A task through the stream into the dead letters, as a worker leaves one."""
    r.rpush(stream.keys.queue, f"{request_id}/{image_id}".encode())
    [entry] = stream.fetch(1)
    stream.settle(dead_lettered(entry, "bad input", request_id, image_id))


@pytest.fixture
def worker(r: redis.Redis, make_settings: MakeSettings) -> Consumer:
    settings = make_settings()
    stream = Consumer(r, settings.hosting_tasks_queue, settings.consumer_group, "worker")
    stream.stream.ensure_group()
    return stream


def stream_tasks(r: redis.Redis, stream: Consumer) -> list[bytes]:
    return [fields[b"task"] for _, fields in r.xrange(stream.keys.stream)]  # type: ignore[union-attr]


def test_replay_all_moves_every_dead_letter_back_oldest_first(
    r: redis.Redis, worker: Consumer, data: Data
) -> None:
    for i in range(3):
        dead_letter(r, worker, "req", f"img_{i}")
    assert data.replay_all() == Replayed(3)
    assert stream_tasks(r, worker) == [b"req/img_0", b"req/img_1", b"req/img_2"]
    assert r.xlen(worker.keys.dead) == 0
    assert data.replay_all() == Replayed(0)


def test_replay_all_stops_at_the_dead_letters_there_when_it_began(
    r: redis.Redis, worker: Consumer, data: Data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task that fails again at once comes back as a new dead letter: not taken round."""
    for i in range(3):
        dead_letter(r, worker, "req", f"img_{i}")
    revive = Stream.revive

    def failing_again_at_once(self: Stream, dead_id: str) -> str | None:
        moved = revive(self, dead_id)
        [entry] = worker.fetch(1)
        worker.settle(dead_lettered(entry, "bad again", "req", "again"))
        return moved

    monkeypatch.setattr(Stream, "revive", failing_again_at_once)
    assert data.replay_all() == Replayed(3)
    assert r.xlen(worker.keys.dead) == 3  # the three new ones, left for next time


def test_replay_all_of_one_request_and_replay_one(r: redis.Redis, worker: Consumer,
                                                  data: Data) -> None:
    for request_id in ("a", "b", "a"):
        dead_letter(r, worker, request_id, "img")
    assert data.replay_all("a") == Replayed(2)
    [letter] = worker.stream.dead_letters(10)
    b_id = letter.id
    assert letter.request_id == "b"
    assert data.replay(b_id) == Replayed(1)
    assert data.replay(b_id) == Replayed(0, 1)  # gone: replayed already


def test_dead_letters_come_newest_first_a_page_at_a_time(r: redis.Redis, worker: Consumer,
                                                         data: Data) -> None:
    for i in range(PAGE + 3):
        dead_letter(r, worker, "req", f"img_{i}")
    first = data.dead_letters()
    assert first.total == PAGE + 3 and len(first.letters) == PAGE
    assert first.letters[0].image_id == f"img_{PAGE + 2}" and first.letters[0].error == "bad input"
    assert first.letters[0].deliveries == "1" and first.letters[0].age_s < 60
    rest = data.dead_letters(first.older)
    assert [d.image_id for d in rest.letters] == ["img_2", "img_1", "img_0"]
    assert rest.older is None


def test_the_overview_before_there_is_a_store(r: redis.Redis, data: Data) -> None:
    seen = data.overview()
    assert seen.records is None and seen.redis_error is None
    assert seen.store_error is not None and "No results store yet" in seen.store_error
    assert seen.status is not None and seen.status["list_length"] == 0
    assert seen.chart.completed == 0 and len(seen.chart.bars) == 60
    assert data.results(Query()).error == seen.store_error


def test_an_image_id_without_its_request_is_not_looked_up(data: Data) -> None:
    page = data.results(Query(image_id="img_1"))
    assert page.rows == [] and page.error is not None and "within its request" in page.error


def test_redis_that_does_not_answer_is_shown_not_raised(make_settings: MakeSettings) -> None:
    data = Data(make_settings(REDIS_URL="redis://127.0.0.1:1/0"))
    try:
        seen = data.overview()
        assert seen.status is None and seen.redis_error
        assert data.dead_letters().error
    finally:
        data.close()
