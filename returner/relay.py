"""The result lists in a Redis Cluster: SUCCESS_QUEUE and ERROR_QUEUE live in other slots
than `{L}`, so settle.lua cannot push onto them in the atomic step that settles an
entry. Each worker relays them instead, from `{L}:events` through a consumer group of
its own: a message is pushed, then its event acknowledged, so a kill between the two
pushes it again (at least once) and loses nothing. A relay that falls behind by half of
EVENTS_MAXLEN holds the worker back, so that no event is trimmed before it is relayed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from typing import Any

import redis
from redis.crc import key_slot

from returner.errors import RedisUnavailable
from returner.retry import REDIS_BACKOFF_MAX_S, Backoff
from returner.stream import Consumer, Event, Stream

log = logging.getLogger("returner.worker")

RELAY_GROUP = "returner-lists"
BATCH, BLOCK_MS = 200, 1000
CLAIM_IDLE_MS = 30_000  # events a relay that died was holding are taken over after this


def message(event: Event) -> tuple[bool, bytes]:
    """The result-list message of an event, as settle.lua writes it: (completed, JSON)."""
    ids = {"request_id": event["request_id"] or None, "image_id": event["image_id"] or None}
    if event["status"] == "completed":
        return True, json.dumps({**ids, "image_url": event["image_url"]}).encode()
    body = {**ids, "error_message": event["error"], "timestamp": event["timestamp"]}
    return False, json.dumps(body).encode()


def route(
    consumer: Consumer, success: str | None, error: str | None, maxlen: int
) -> ListRelay | None:
    """Have settle.lua push onto the result lists it can reach (on one Redis, or in L's
    cluster slot); the relay for the others, if any (not started)."""
    inline = {q for q in (success, error) if q and in_slot_of(consumer.stream, q)}
    consumer.settling = dataclasses.replace(
        consumer.settling,
        success_queue=success if success in inline else None,
        error_queue=error if error in inline else None,
    )
    relayed = {done: q for done, q in ((True, success), (False, error)) if q and q not in inline}
    return ListRelay(consumer.stream, consumer.name, relayed, maxlen) if relayed else None


def in_slot_of(stream: Stream, name: str) -> bool:
    """Whether settle.lua may push onto list `name`: on one Redis, or in L's cluster slot."""
    if not stream.server.cluster:
        return True
    return bool(key_slot(name.encode()) == key_slot(stream.keys.queue.encode()))


class ListRelay:
    """Pushes the messages of `{L}:events` onto the lists settle.lua could not reach."""

    def __init__(self, stream: Stream, consumer: str, lists: dict[bool, str], maxlen: int) -> None:
        self.stream, self.consumer, self.lists, self.maxlen = stream, consumer, lists, maxlen
        self.lag = 0  # events not yet relayed, as Redis last said (7.0+)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="relay", daemon=True)

    def start(self) -> None:
        """Join the relay group (new events from now on) and start relaying. Raises
        RedisUnavailable."""
        with self.stream.server.talking("creating the result lists' relay group"):
            try:
                self.stream.client.xgroup_create(
                    self.stream.keys.events, RELAY_GROUP, id="$", mkstream=True
                )
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def behind(self) -> bool:
        """Far enough behind that the event stream's cap could trim unrelayed events."""
        return self.lag > self.maxlen // 2

    def _serve(self) -> None:
        backoff, after = Backoff(REDIS_BACKOFF_MAX_S), "0"  # own pending first
        while not self._stop.is_set():
            try:
                after = self._step(after)
                backoff = Backoff(REDIS_BACKOFF_MAX_S)
            except RedisUnavailable as exc:
                delay = backoff.next_delay()
                log.warning("result lists: %s; retrying in %.1fs", exc, delay)
                self._stop.wait(delay)

    def _step(self, after: str) -> str:
        """Relay one batch: taken over from a dead relay, own pending, or new."""
        events = self._claimed() or self._read(after)
        if events:
            self._push(events)
        elif after != ">":
            after = ">"  # own pending done: new events from now on
        self._observe()
        return after

    def _read(self, after: str) -> list[Event]:
        keys = self.stream.keys
        block = None if after != ">" else BLOCK_MS
        with self.stream.server.talking("reading events to relay"):
            reply: Any = self.stream.client.xreadgroup(
                RELAY_GROUP, self.consumer, {keys.events: after}, count=BATCH, block=block
            )
        rows = reply[0][1] if reply and isinstance(reply, list) else _rows(reply)
        return [Event.of(i, f) for i, f in rows if f]

    def _claimed(self) -> list[Event]:
        with self.stream.server.talking("taking over events to relay"):
            reply: Any = self.stream.client.xautoclaim(
                self.stream.keys.events, RELAY_GROUP, self.consumer, CLAIM_IDLE_MS, count=BATCH
            )
        return [Event.of(i, f) for i, f in reply[1] if f]

    def _push(self, events: list[Event]) -> None:
        """Push every message, then ack the events: a kill in between pushes again."""
        pushed: dict[str, list[bytes]] = {}
        for event in events:
            completed, body = message(event)
            target = self.lists.get(completed)
            if target:
                pushed.setdefault(target, []).append(body)
        with self.stream.server.talking("pushing onto the result lists"):
            general = self.stream.server.general()
            for target, bodies in pushed.items():
                general.rpush(target, *bodies)
            self.stream.client.xack(self.stream.keys.events, RELAY_GROUP, *[e.id for e in events])

    def _observe(self) -> None:
        with self.stream.server.talking("reading the relay's lag"):
            groups: Any = self.stream.client.xinfo_groups(self.stream.keys.events)
        for group in groups:
            name = group.get("name")
            if name in (RELAY_GROUP, RELAY_GROUP.encode()):
                self.lag = int(group.get("lag") or 0)


def _rows(reply: Any) -> list[Any]:
    """XREADGROUP's rows in RESP3 (a dict) or none."""
    if not reply:
        return []
    return list(next(iter(reply.values()))[0])
