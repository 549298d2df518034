"""Reading `{L}:events` as the API in front of the pipeline does: the latest events,
a request's history, following new ones, and waiting until images are done."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from returner.stream import Event, Stream

FOLLOW_BLOCK_MS = 1000  # a follower wakes this often to notice a stop or a deadline


def read_history(stream: Stream, take: Callable[[list[Event]], None]) -> str:
    """Hand every event in the stream to `take`, oldest first, a batch at a time; the
    ID of the last one ("0-0" when there is none). Raises RedisUnavailable."""
    last = "0-0"
    while batch := stream.read_events(last):
        last = batch[-1].id
        take(batch)
    return last


def latest(stream: Stream, request_id: str | None, count: int) -> tuple[list[Event], str]:
    """The latest `count` events (of `request_id` only, if given), oldest first, and
    the ID to follow from. Raises RedisUnavailable."""
    if request_id is None:
        events = stream.last_events(count)
        return events, events[-1].id if events else "$"
    kept: deque[Event] = deque(maxlen=count)
    last = read_history(
        stream, lambda batch: kept.extend(e for e in batch if e["request_id"] == request_id)
    )
    return list(kept), last if last != "0-0" else "$"


def follow(
    stream: Stream, after: str, stop: threading.Event, request_id: str | None = None
) -> Iterator[Event]:
    """New events after `after` (of `request_id` only, if given), as they come, until
    `stop` is set. Raises RedisUnavailable."""
    while not stop.is_set():
        for event in stream.read_events(after, block_ms=FOLLOW_BLOCK_MS):
            after = event.id
            if request_id is None or event["request_id"] == request_id:
                yield event


@dataclass
class Waiting:
    """The images of one request still to complete, from the events seen so far.

    The latest event of an image decides: a replay that completes what had failed
    clears the failure.
    """

    request_id: str
    wanted: frozenset[str]
    left: set[str] = field(init=False)
    done: dict[str, str] = field(default_factory=dict)  # image_id -> file_path
    failed: Event | None = None

    def __post_init__(self) -> None:
        self.left = set(self.wanted)

    @property
    def over(self) -> bool:
        return self.failed is not None or not self.left

    def take(self, batch: list[Event]) -> list[Event]:
        """Take in events; those that completed a wanted image for the first time."""
        news = []
        for event in batch:
            image_id = event["image_id"]
            if event["request_id"] != self.request_id or image_id not in self.wanted:
                continue
            if event["status"] == "completed":
                self.left.discard(image_id)
                if image_id not in self.done:
                    news.append(event)
                self.done[image_id] = event["file_path"]
                if self.failed is not None and self.failed["image_id"] == image_id:
                    self.failed = None
            else:
                self.failed = event
        return news


def wait(
    stream: Stream,
    waiting: Waiting,
    timeout_s: float | None,
    on_completed: Callable[[Event], None],
) -> bool:
    """Read the history, then new events, until every wanted image completed or one
    failed (`waiting` says which); False on timeout. Raises RedisUnavailable."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def take(batch: list[Event]) -> None:
        for event in waiting.take(batch):
            on_completed(event)

    last = read_history(stream, take)  # what came before: the latest decides
    while not waiting.over:
        block = FOLLOW_BLOCK_MS
        if deadline is not None:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                return False
            block = min(block, max(1, int(left_s * 1000)))
        for event in stream.read_events(last, block_ms=block):
            last = event.id
            take([event])
            if waiting.failed is not None:
                break
    return True
