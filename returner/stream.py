"""The only module that talks to Redis: keys, the mirror from list to stream, reads,
claims, acks and dead letters. Redis errors become RedisUnavailable here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script

from returner.errors import RedisUnavailable
from returner.task import Entry

SOCKET_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Keys:
    """Every key, derived from the list name; `{L}` keeps them in L's cluster slot."""

    queue: str
    stream: str
    dead: str

    @classmethod
    def for_queue(cls, queue: str) -> Keys:
        return cls(queue=queue, stream=f"{{{queue}}}:stream", dead=f"{{{queue}}}:dead")


def connect(url: str) -> redis.Redis:
    """A client for `url`; bytes in and out, so task payloads stay byte-exact."""
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=30,
    )


@contextlib.contextmanager
def translated(action: str) -> Iterator[None]:
    """Turn redis-py's exceptions into RedisUnavailable at the boundary."""
    try:
        yield
    except redis.RedisError as exc:
        raise RedisUnavailable(f"{action}: {exc}") from None
    except OSError as exc:
        raise RedisUnavailable(f"{action}: {exc}") from None


def _script(client: redis.Redis, name: str) -> Script:
    source = resources.files("returner").joinpath("lua", f"{name}.lua").read_text()
    return client.register_script(source)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(raw: Sequence[Any], deliveries: int | None = None) -> Entry:
    entry_id, flat = raw[0], raw[1] or []
    fields = dict(zip(flat[::2], flat[1::2], strict=False))
    task = fields.get(b"task", b"")
    count = int(raw[2]) if deliveries is None else deliveries
    return Entry(id=_text(entry_id), task=task, deliveries=count)


@dataclass(frozen=True)
class Consumer:
    name: str
    pending: int
    idle_ms: int  # since it last talked to Redis


@dataclass(frozen=True)
class Observation:
    """What Redis says about the queue at one instant."""

    queue_length: int
    dead_letters: int
    pending: int
    oldest_pending_s: float | None  # age of the oldest pending entry, from its ID
    consumers: list[Consumer]


class Stream:
    """The group's view of `{L}:stream` for one consumer."""

    def __init__(self, client: redis.Redis, queue: str, group: str, consumer: str) -> None:
        self.client = client
        self.keys = Keys.for_queue(queue)
        self.group = group
        self.consumer = consumer
        self._fetch = _script(client, "fetch")
        self._pending = _script(client, "pending")
        self._claim = _script(client, "claim")
        self._ack = _script(client, "ack")
        self._dead = _script(client, "dead_letter")
        self._revive = _script(client, "revive")
        self._rescue = _script(client, "rescue")
        self._touch = _script(client, "touch")
        self._forget = _script(client, "forget")

    def ensure_group(self) -> None:
        """Create the stream and the consumer group if missing. Raises RedisUnavailable."""
        with translated("creating consumer group"):
            try:
                self.client.xgroup_create(self.keys.stream, self.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _run(self, action: str, script: Script, keys: list[str], args: list[Any]) -> Any:
        """Run a script; None if the stream or group was deleted (it is recreated)."""
        with translated(action):
            try:
                return script(keys=keys, args=args)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
        self.ensure_group()
        return None

    def ping(self) -> None:
        with translated("ping"):
            self.client.ping()

    def fetch(self, count: int) -> list[Entry]:
        """Mirror up to `count` list elements and read up to `count` new entries."""
        raw = self._run(
            "reading new entries",
            self._fetch,
            [self.keys.queue, self.keys.stream],
            [self.group, self.consumer, count],
        )
        return [_entry(e, deliveries=1) for e in raw or []]

    def wait_for_tasks(self, timeout_s: float) -> None:
        """Block until the list has an element or the timeout passes, without taking it.

        BLMOVE from the list's tail back onto its tail leaves the list unchanged.
        """
        with translated("waiting for tasks"):
            self.client.execute_command(  # type: ignore[no-untyped-call]
                "BLMOVE", self.keys.queue, self.keys.queue, "RIGHT", "RIGHT", timeout_s
            )

    def own_pending(self, after: str, count: int) -> tuple[list[Entry], str, int]:
        """This consumer's pending entries after `after`: (entries, last ID, deleted)."""
        got = self._run(
            "reading own pending entries",
            self._pending,
            [self.keys.stream],
            [self.group, self.consumer, after, count],
        )
        entries, last, gone = got or ([], after, 0)
        return [_entry(e) for e in entries], _text(last), int(gone)

    def claim(self, min_idle_ms: int, start: str, count: int) -> tuple[list[Entry], str, int]:
        """XAUTOCLAIM entries idle for `min_idle_ms`: (entries, next start, deleted)."""
        got = self._run(
            "claiming idle entries",
            self._claim,
            [self.keys.stream],
            [self.group, self.consumer, min_idle_ms, start, count],
        )
        nxt, entries, gone = got or ("0-0", [], 0)
        return [_entry(e) for e in entries], _text(nxt), int(gone)

    def observe(self) -> Observation:
        """Queue, pending and dead-letter figures plus every consumer, in one round trip."""
        with translated("observing the queue"):
            pipe = self.client.pipeline(transaction=False)
            pipe.llen(self.keys.queue)
            pipe.xlen(self.keys.dead)
            pipe.time()
            pipe.xpending(self.keys.stream, self.group)
            pipe.xinfo_consumers(self.keys.stream, self.group)
            queued, dead, now, summary, infos = pipe.execute(raise_on_error=False)
        for reply in (queued, dead, now):
            if isinstance(reply, Exception):
                raise RedisUnavailable(f"observing the queue: {reply}")
        if isinstance(summary, Exception) or isinstance(infos, Exception):
            summary, infos = {"pending": 0, "min": None}, []  # no stream or group yet
        oldest = None
        if summary["pending"] and summary["min"]:
            now_ms = now[0] * 1000 + now[1] // 1000
            oldest = max(0.0, (now_ms - int(_text(summary["min"]).split("-")[0])) / 1000)
        consumers = [Consumer(_text(i["name"]), int(i["pending"]), int(i["idle"])) for i in infos]
        return Observation(int(queued), int(dead), int(summary["pending"]), oldest, consumers)

    def rescue(self, silent: str, min_idle_ms: int, count: int) -> tuple[list[Entry], int]:
        """Claim a silent consumer's entries idle for `min_idle_ms`: (entries, deleted)."""
        got = self._run(
            "claiming a silent consumer's entries",
            self._rescue,
            [self.keys.stream],
            [self.group, self.consumer, silent, min_idle_ms, count],
        )
        entries, gone = got or ([], 0)
        return [_entry(e) for e in entries], int(gone)

    def pending_idle(self, min_idle_ms: int, count: int) -> list[dict[str, Any]]:
        """Pending entries idle for `min_idle_ms`, without claiming them."""
        with translated("listing pending entries"):
            try:
                rows = self.client.xpending_range(
                    self.keys.stream, self.group, "-", "+", count, idle=min_idle_ms
                )
            except redis.ResponseError:
                return []
        return [
            {
                "id": _text(p["message_id"]),
                "consumer": _text(p["consumer"]),
                "idle_ms": int(p["time_since_delivered"]),
                "deliveries": int(p["times_delivered"]),
            }
            for p in rows
        ]

    def forget(self, consumer: str) -> bool:
        """Remove `consumer` from the group if it holds no pending entries."""
        return bool(
            self._run(
                "removing a consumer", self._forget, [self.keys.stream], [self.group, consumer]
            )
        )

    def ack(self, ids: Sequence[str]) -> None:
        """Acknowledge and delete entries whose outcome is durable."""
        if not ids:
            return
        with translated("acknowledging"):
            self._ack(keys=[self.keys.stream], args=[self.group, *ids])

    def dead_letter(self, entry: Entry, error: str, extra: dict[str, str]) -> None:
        """Move one delivery to `{L}:dead` with its original bytes and the reason."""
        fields: list[Any] = [
            "task",
            entry.task,
            "error",
            error,
            "deliveries",
            entry.deliveries,
            "entry_id",
            entry.id,
            "consumer",
            self.consumer,
        ]
        for key, value in extra.items():
            fields += [key, value]
        with translated("dead-lettering"):
            self._dead(
                keys=[self.keys.stream, self.keys.dead], args=[self.group, entry.id, *fields]
            )

    def touch(self, ids: Sequence[str]) -> None:
        """Reset the idle time of entries still in hand, so no one claims them."""
        if ids:
            self._run(
                "refreshing held entries",
                self._touch,
                [self.keys.stream],
                [self.group, self.consumer, *ids],
            )

    def dead_letters(self, count: int, after: str = "-") -> list[tuple[str, dict[bytes, bytes]]]:
        """Up to `count` dead letters after `after` (exclusive unless "-")."""
        start = after if after == "-" else "(" + after
        with translated("reading dead letters"):
            rows: list[Any] = self.client.xrange(self.keys.dead, start, "+", count=count) or []
        return [(_text(i), dict(f or {})) for i, f in rows]

    def revive(self, dead_id: str) -> str | None:
        """Move one dead letter back into the stream; its new entry ID, or None if gone."""
        with translated("replaying a dead letter"):
            new = self._revive(keys=[self.keys.stream, self.keys.dead], args=[dead_id])
        return _text(new) if new else None

    def status(self, errors: int = 5) -> dict[str, Any]:
        """Lengths, pending per consumer with its oldest entry's idle time, last errors."""
        seen = self.observe()
        with translated("reading status"):
            streamed = self.client.xlen(self.keys.stream)
            last: list[Any] = self.client.xrevrange(self.keys.dead, "+", "-", count=errors) or []
            consumers = [self._consumer_report(c) for c in seen.consumers]
        return {
            "queue": self.keys.queue,
            "list_length": seen.queue_length,
            "stream_length": streamed,
            "pending": seen.pending,
            "oldest_pending_s": seen.oldest_pending_s,
            "consumers": consumers,
            "dead_letters": seen.dead_letters,
            "last_errors": [_dead_report(i, f) for i, f in last],
        }

    def _consumer_report(self, consumer: Consumer) -> dict[str, Any]:
        oldest = None
        if consumer.pending:
            held = self.client.xpending_range(
                self.keys.stream, self.group, "-", "+", 1000, consumername=consumer.name
            )
            oldest = max((p["time_since_delivered"] for p in held), default=None)
        return {
            "name": consumer.name,
            "pending": consumer.pending,
            "idle_ms": consumer.idle_ms,
            "oldest_pending_ms": oldest,
        }


def _dead_report(dead_id: Any, fields: dict[bytes, bytes]) -> dict[str, Any]:
    def get(key: bytes) -> str | None:
        value = fields.get(key)
        return value.decode("utf-8", "replace") if value is not None else None

    return {
        "id": _text(dead_id),
        "request_id": get(b"request_id"),
        "image_id": get(b"image_id"),
        "error": get(b"error"),
        "deliveries": _int(fields.get(b"deliveries")),
    }


def _int(value: bytes | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
