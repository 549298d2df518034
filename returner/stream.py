"""The only module that sends stream commands: the keys, the mirror from list to
stream, reads, claims, acks, dead letters and events, each Lua script behind one typed
method. Replies come back as typed values; Redis errors as RedisUnavailable.

`Stream` is the queue as anyone sees it (status, events, dead letters); `Consumer` is
one member of the group, which takes entries and settles them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script

from returner.connection import Replication, Server, text
from returner.settings import Settings
from returner.task import Decision, Entry, encodable


@dataclass(frozen=True)
class Keys:
    """Every key, derived from the list name; `{L}` keeps them in L's cluster slot."""

    queue: str
    stream: str
    dead: str
    events: str

    @classmethod
    def for_queue(cls, queue: str) -> Keys:
        tag = f"{{{queue}}}"
        return cls(queue, stream=f"{tag}:stream", dead=f"{tag}:dead", events=f"{tag}:events")


DEAD_LETTERS_AT_ONCE = 100  # read per step of each_dead_letter


def _script(name: str) -> Script:
    source = resources.files("returner").joinpath("lua", f"{name}.lua").read_bytes()
    return Script(None, source)  # type: ignore[arg-type]  # always run with a client


_FETCH = _script("fetch")
_PENDING = _script("pending")
_CLAIM = _script("claim")
_SETTLE = _script("settle")
_REVIVE = _script("revive")
_RESCUE = _script("rescue")
_TOUCH = _script("touch")
_FORGET = _script("forget")


def _entry(raw: Sequence[Any], deliveries: int | None = None) -> Entry:
    entry_id, flat = raw[0], raw[1] or []
    fields = dict(zip(flat[::2], flat[1::2], strict=False))
    count = int(raw[2]) if deliveries is None else deliveries
    return Entry(id=text(entry_id), payload=fields.get(b"task", b""), deliveries=count)


def _id_order(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Event:
    """One entry of `{L}:events`: its ID and its fields, as text."""

    id: str
    fields: dict[str, str]

    @classmethod
    def of(cls, event_id: Any, raw: dict[Any, Any]) -> Event:
        return cls(text(event_id), {text(k): text(v) for k, v in raw.items()})

    def __getitem__(self, name: str) -> str:
        return self.fields.get(name, "")


@dataclass(frozen=True)
class DeadLetter:
    """One entry of `{L}:dead`: its ids, why it failed, and after how many deliveries."""

    id: str
    request_id: str | None
    image_id: str | None
    error: str | None
    deliveries: int | None
    entry_id: str | None = None  # the stream entry it was
    consumer: str | None = None  # that settled it
    payload: bytes = b""  # the task as it came (or its first KiB)

    @classmethod
    def of(cls, dead_id: Any, fields: dict[bytes, bytes]) -> DeadLetter:
        def get(key: bytes) -> str | None:
            value = fields.get(key)
            return None if value is None else text(value)

        return cls(
            text(dead_id),
            get(b"request_id"),
            get(b"image_id"),
            get(b"error"),
            _int(fields.get(b"deliveries")),
            get(b"entry_id"),
            get(b"consumer"),
            fields.get(b"task", b""),
        )


@dataclass(frozen=True)
class ConsumerInfo:
    name: str
    pending: int
    idle_ms: int  # since it last talked to Redis
    oldest_pending_ms: int | None = None  # (status only) idle time of its oldest entry
    gone: bool = False  # (status only) silent for longer than CONSUMER_TIMEOUT_MS


@dataclass(frozen=True)
class Observation:
    """What Redis says about the queue at one instant."""

    queue_length: int
    dead_letters: int
    pending: int
    oldest_pending_s: float | None  # age of the oldest pending entry, from its ID
    consumers: list[ConsumerInfo]


@dataclass(frozen=True)
class Status:
    """The queue for an operator: lengths, pending per consumer, the last dead letters."""

    queue: str
    list_length: int
    stream_length: int
    pending: int
    oldest_pending_s: float | None
    consumers: list[ConsumerInfo]
    dead_letters: int
    last_errors: list[DeadLetter]


@dataclass(frozen=True)
class PendingEntry:
    id: str
    consumer: str
    idle_ms: int
    deliveries: int


class Stream:
    """The queue, its stream and the group's state, as anyone sees them."""

    def __init__(self, server: Server | redis.Redis, queue: str, group: str) -> None:
        self.server = server if isinstance(server, Server) else Server.of(server)
        self.keys = Keys.for_queue(queue)
        self.group = group
        # Called with (replicas asked for, replicas that confirmed) when a WAIT falls short.
        self.on_short_wait: Callable[[int, int], None] = lambda _want, _got: None

    @classmethod
    def from_settings(cls, settings: Settings, url: str) -> Stream:
        server = Server(url, settings.redis_cluster)
        return cls(server, settings.hosting_tasks_queue, settings.consumer_group)

    @property
    def client(self) -> redis.Redis:
        """A plain client of the server holding this queue's keys."""
        return self.server.client_for(self.keys.queue)

    def ensure_group(self) -> None:
        """Create the stream and the consumer group if missing. Raises RedisUnavailable."""
        with self.server.talking("creating consumer group"):
            try:
                self.client.xgroup_create(self.keys.stream, self.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def run(
        self,
        action: str,
        script: Script,
        keys: list[str],
        args: list[Any],
        replication: Replication | None = None,
    ) -> Any:
        """Run a script (then WAIT, with `replication`); None if the stream or group was
        deleted (it is recreated). Raises RedisUnavailable."""
        with self.server.talking(action):
            try:
                if replication is None or not replication.replicas:
                    return script(keys=keys, args=args, client=self.client)
                reply, got = replication.write(
                    self.client, lambda pipe: script(keys=keys, args=args, client=pipe)
                )
                if got < replication.replicas:
                    self.on_short_wait(replication.replicas, got)
                return reply
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
        self.ensure_group()
        return None

    def ping(self) -> None:
        with self.server.talking("ping"):
            self.client.ping()

    def observe(self) -> Observation:
        """Queue, pending and dead-letter figures plus every consumer, in one round trip."""
        with self.server.talking("observing the queue"):
            pipe = self.client.pipeline(transaction=False)
            pipe.llen(self.keys.queue)
            pipe.xlen(self.keys.dead)
            pipe.time()
            pipe.xpending(self.keys.stream, self.group)
            pipe.xinfo_consumers(self.keys.stream, self.group)
            queued, dead, now, summary, infos = pipe.execute(raise_on_error=False)
            for reply in (queued, dead, now):
                if isinstance(reply, Exception):
                    raise reply
        if isinstance(summary, Exception) or isinstance(infos, Exception):
            summary, infos = {"pending": 0, "min": None}, []  # no stream or group yet
        oldest = None
        if summary["pending"] and summary["min"]:
            now_ms = now[0] * 1000 + now[1] // 1000
            oldest = max(0.0, (now_ms - int(text(summary["min"]).split("-")[0])) / 1000)
        consumers = [
            ConsumerInfo(text(i["name"]), int(i["pending"]), int(i["idle"])) for i in infos
        ]
        return Observation(int(queued), int(dead), int(summary["pending"]), oldest, consumers)

    def status(self, gone_after_ms: int, errors: int = 5) -> Status:
        """Lengths, pending per consumer with its oldest entry's idle time, last errors.
        Consumers silent for `gone_after_ms` are marked gone. Raises RedisUnavailable."""
        seen = self.observe()
        with self.server.talking("reading status"):
            streamed = self.client.xlen(self.keys.stream)
            last: list[Any] = self.client.xrevrange(self.keys.dead, "+", "-", count=errors) or []
            consumers = [self._consumer_status(c, gone_after_ms) for c in seen.consumers]
        return Status(
            self.keys.queue,
            seen.queue_length,
            int(streamed),
            seen.pending,
            seen.oldest_pending_s,
            consumers,
            seen.dead_letters,
            [DeadLetter.of(i, f or {}) for i, f in last],
        )

    def _consumer_status(self, consumer: ConsumerInfo, gone_after_ms: int) -> ConsumerInfo:
        oldest = None
        if consumer.pending:
            held = self.client.xpending_range(
                self.keys.stream, self.group, "-", "+", 1000, consumername=consumer.name
            )
            oldest = max((int(p["time_since_delivered"]) for p in held), default=None)
        gone = consumer.idle_ms >= gone_after_ms
        return dataclasses.replace(consumer, oldest_pending_ms=oldest, gone=gone)

    def pending_idle(self, min_idle_ms: int, count: int) -> list[PendingEntry]:
        """Pending entries idle for `min_idle_ms`, without claiming them."""
        with self.server.talking("listing pending entries"):
            try:
                rows = self.client.xpending_range(
                    self.keys.stream, self.group, "-", "+", count, idle=min_idle_ms
                )
            except redis.ResponseError:
                return []
        return [
            PendingEntry(
                text(p["message_id"]),
                text(p["consumer"]),
                int(p["time_since_delivered"]),
                int(p["times_delivered"]),
            )
            for p in rows
        ]

    def forget(self, consumer: str) -> bool:
        """Remove `consumer` from the group if it holds no pending entries."""
        return bool(
            self.run("removing a consumer", _FORGET, [self.keys.stream], [self.group, consumer])
        )

    def dead_letters(self, count: int, after: str = "-") -> list[DeadLetter]:
        """Up to `count` dead letters after `after` (exclusive unless "-")."""
        start = after if after == "-" else "(" + after
        with self.server.talking("reading dead letters"):
            rows: list[Any] = self.client.xrange(self.keys.dead, start, "+", count=count) or []
        return [DeadLetter.of(i, f or {}) for i, f in rows]

    def latest_dead_letters(self, count: int, before: str = "+") -> list[DeadLetter]:
        """Up to `count` dead letters before `before` (exclusive unless "+"), newest
        first. Raises RedisUnavailable."""
        end = before if before == "+" else "(" + before
        with self.server.talking("reading dead letters"):
            rows: list[Any] = self.client.xrevrange(self.keys.dead, end, "-", count=count) or []
        return [DeadLetter.of(i, f or {}) for i, f in rows]

    def each_dead_letter(
        self, request_id: str | None = None, limit: int | None = None
    ) -> Iterator[DeadLetter]:
        """Dead letters, oldest first (of `request_id` only, if given), read in steps;
        only those there when it began, so a task that fails again at once (dead-lettered
        anew behind the cursor) is not taken round again. Raises RedisUnavailable."""
        newest = self.latest_dead_letters(1)
        last = _id_order(newest[0].id) if newest else (0, 0)
        found, after = 0, "-"
        while letters := self.dead_letters(DEAD_LETTERS_AT_ONCE, after):
            for letter in letters:
                if _id_order(letter.id) > last:
                    return
                after = letter.id
                if request_id is not None and letter.request_id != request_id:
                    continue
                if limit is not None and found >= limit:
                    return
                found += 1
                yield letter

    def revive(self, dead_id: str) -> str | None:
        """Move one dead letter back into the stream; its new entry ID, or None if gone."""
        with self.server.talking("replaying a dead letter"):
            new = _REVIVE(
                keys=[self.keys.stream, self.keys.dead], args=[dead_id], client=self.client
            )
        return text(new) if new else None

    def read_events(
        self, after: str = "0-0", count: int = 1000, block_ms: int | None = None
    ) -> list[Event]:
        """Up to `count` events after `after`, oldest first; with `block_ms`, wait that
        long for one when there is none. Raises RedisUnavailable."""
        with self.server.talking("reading events"):
            reply: Any = self.client.xread({self.keys.events: after}, count=count, block=block_ms)
        if not reply:
            return []
        rows = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
        return [Event.of(i, f or {}) for i, f in rows]

    def last_events(self, count: int) -> list[Event]:
        """The latest `count` events, oldest first. Raises RedisUnavailable."""
        with self.server.talking("reading events"):
            rows: Any = self.client.xrevrange(self.keys.events, "+", "-", count=count)
        return [Event.of(i, f or {}) for i, f in reversed(rows or [])]


def _settle_args(decision: Decision) -> list[str]:
    """The 9 values settle.lua takes for one entry's ack, event and message."""
    outcome, kind = decision.outcome, decision.kind
    error = (outcome.error or "failed") if kind.status == "failed" else ""
    path = str(decision.file_path) if decision.file_path else None
    texts = (outcome.request_id, outcome.image_id, kind.value, kind.status, path)
    return [
        outcome.entry.id,
        *(encodable(t or "") for t in texts),
        encodable(decision.image_url or ""),
        encodable(error),
        decision.timestamp,
    ]


DEAD_TASK_BYTES = 1024  # what a dead letter keeps of a message over max_task_bytes


@dataclass(frozen=True)
class Settling:
    """What settling writes besides the ack: events on `{L}:events`, capped at about
    `events_maxlen` and with `publish_events` also published on `events:{request_id}`;
    dead letters on `{L}:dead`, capped at about `dead_letters_maxlen`, each with the
    original message, or its first DEAD_TASK_BYTES when it is over `max_task_bytes`."""

    events_maxlen: int = 100_000
    publish_events: bool = False
    dead_letters_maxlen: int = 100_000
    max_task_bytes: int = 65_536
    # The result lists settle.lua pushes to itself (on one Redis, or in L's slot).
    success_queue: str | None = None
    error_queue: str | None = None

    def dead_task(self, payload: bytes) -> bytes:
        return payload if len(payload) <= self.max_task_bytes else payload[:DEAD_TASK_BYTES]


class Consumer:
    """One consumer of the group: takes new, own and claimed entries, and settles them."""

    def __init__(
        self,
        server: Server | redis.Redis,
        queue: str,
        group: str,
        name: str,
        replication: Replication | None = None,
        settling: Settling = Settling(),
    ) -> None:
        self.stream = Stream(server, queue, group)
        self.keys, self.group, self.name = self.stream.keys, group, name
        self.replication = replication or Replication()
        self.settling = settling

    @classmethod
    def from_settings(cls, settings: Settings, url: str, name: str | None = None) -> Consumer:
        """The consumer `name` (default CONSUMER_NAME) as the settings describe it."""
        s = settings
        server = Server(url, s.redis_cluster)
        replication = Replication(s.redis_wait_replicas, s.redis_wait_timeout_ms)
        limits = Settling(
            s.events_maxlen, s.publish_events, s.dead_letters_maxlen, s.max_task_bytes
        )
        name = name or s.consumer_name
        return cls(server, s.hosting_tasks_queue, s.consumer_group, name, replication, limits)

    def _run(
        self,
        action: str,
        script: Script,
        *args: Any,
        keys: list[str] | None = None,
        wait: bool = False,
    ) -> Any:
        """Run a script on the stream (or `keys`) with ARGV group, consumer, *args."""
        replication = self.replication if wait else None
        keys = keys or [self.keys.stream]
        return self.stream.run(action, script, keys, [self.group, self.name, *args], replication)

    def fetch(self, count: int) -> list[Entry]:
        """Mirror up to `count` list elements and read up to `count` new entries."""
        keys = [self.keys.queue, self.keys.stream]
        raw = self._run("reading new entries", _FETCH, count, keys=keys, wait=True)
        return [_entry(e, deliveries=1) for e in raw or []]

    def wait_for_tasks(self, timeout_s: float) -> None:
        """Block until the list has an element or the timeout passes, without taking it.

        BLMOVE from the list's tail back onto its tail leaves the list unchanged.
        """
        with self.stream.server.talking("waiting for tasks"):
            self.stream.client.execute_command(  # type: ignore[no-untyped-call]
                "BLMOVE", self.keys.queue, self.keys.queue, "RIGHT", "RIGHT", timeout_s
            )

    def own_pending(self, after: str, count: int) -> tuple[list[Entry], str, int]:
        """This consumer's pending entries after `after`: (entries, last ID, deleted)."""
        got = self._run("reading own pending entries", _PENDING, after, count)
        entries, last, gone = got or ([], after, 0)
        return [_entry(e) for e in entries], text(last), int(gone)

    def claim(self, min_idle_ms: int, start: str, count: int) -> tuple[list[Entry], str, int]:
        """XAUTOCLAIM entries idle for `min_idle_ms`: (entries, next start, deleted)."""
        got = self._run("claiming idle entries", _CLAIM, min_idle_ms, start, count)
        nxt, entries, gone = got or ("0-0", [], 0)
        return [_entry(e) for e in entries], text(nxt), int(gone)

    def rescue(self, silent: str, min_idle_ms: int, count: int) -> tuple[list[Entry], int]:
        """Claim a silent consumer's entries idle for `min_idle_ms`: (entries, deleted)."""
        got = self._run("claiming a silent consumer's entries", _RESCUE, silent, min_idle_ms, count)
        entries, gone = got or ([], 0)
        return [_entry(e) for e in entries], int(gone)

    def settle(self, committed: Sequence[Decision]) -> int:
        """Ack the decided entries that settle, dead-lettering those whose record failed,
        each with its event (at its record's timestamp), at once; the number this call
        settled (entries settled by someone else first are only deleted). Raises
        RedisUnavailable."""
        decisions = [d for d in committed if d.kind.settles]
        if not decisions:
            return 0
        limits, flag = self.settling, {True: "1", False: "0"}
        args = [limits.events_maxlen, flag[limits.publish_events], limits.dead_letters_maxlen]
        args += [flag[bool(limits.success_queue)], flag[bool(limits.error_queue)]]
        args += [len(decisions), *(a for d in decisions for a in _settle_args(d))]
        for decision in decisions:
            if decision.kind.status == "failed":
                entry = decision.outcome.entry
                args += [entry.deliveries, limits.dead_task(entry.payload)]
        keys = [self.keys.stream, self.keys.dead, self.keys.events]
        keys += [limits.success_queue or self.keys.events, limits.error_queue or self.keys.events]
        return int(self._run("settling", _SETTLE, *args, keys=keys, wait=True) or 0)

    def touch(self, ids: Sequence[str]) -> None:
        """Reset the idle time of entries still in hand, so no one claims them."""
        if ids:
            self._run("refreshing held entries", _TOUCH, *ids)
