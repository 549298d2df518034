"""The only module that talks to Redis: keys, the mirror from list to stream, reads,
claims, acks and dead letters. Redis errors become RedisUnavailable here."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import RedisClusterException

from returner.errors import RedisUnavailable
from returner.task import Entry, encodable

SOCKET_TIMEOUT_S = 10.0


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


_CLIENT_OPTIONS: dict[str, Any] = {
    "socket_timeout": SOCKET_TIMEOUT_S,
    "socket_connect_timeout": 5.0,
    "socket_keepalive": True,
    "health_check_interval": 30,
}


def connect(url: str) -> redis.Redis:
    """A client for `url`; bytes in and out, so task payloads stay byte-exact."""
    return redis.Redis.from_url(url, **_CLIENT_OPTIONS)


@contextlib.contextmanager
def translated(action: str) -> Iterator[None]:
    """Turn redis-py's exceptions into RedisUnavailable at the boundary."""
    try:
        yield
    except (redis.RedisError, RedisClusterException, OSError) as exc:
        # RedisClusterException: no reachable node, or a slot no node serves.
        raise RedisUnavailable(f"{action}: {exc}") from None


class Server:
    """The Redis that holds a queue's keys: one server, or in a Redis Cluster the master
    that owns the slot of `{L}`.

    Every key of a queue hashes to one slot, so in a cluster all commands, scripts,
    pipelines and WAITs go to that master over a plain client, on one connection. After
    an error (a failover, a moved slot, a master turned replica) the owner is looked up
    again on the next command. `cluster` None asks the server (`INFO cluster`) on first use.
    """

    def __init__(self, url: str, cluster: bool | None = None) -> None:
        self.url = url
        self.cluster = cluster
        self._plain: redis.Redis | None = None
        self._cluster: RedisCluster | None = None
        self._owner: redis.Redis | None = None
        self._stale = False

    @classmethod
    def of(cls, client: redis.Redis) -> Server:
        """A single server reached through an existing client."""
        server = cls("", cluster=False)
        server._plain = client
        return server

    def client_for(self, key: str) -> redis.Redis:
        """A plain client of the server that holds `key`. Raises redis errors."""
        if self._owner is None:
            client = self.general()
            if isinstance(client, RedisCluster):
                if self._stale:
                    client.nodes_manager.initialize()
                    self._stale = False
                node = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
                self._owner = client.get_redis_connection(node)
            else:
                self._owner = client
        return self._owner

    def general(self) -> redis.Redis | RedisCluster:
        """A client for any key (a cluster client in a cluster), e.g. to push tasks."""
        if self._plain is None:
            self._plain = connect(self.url)
        if self.cluster is None:
            self.cluster = _cluster_enabled(self._plain)
        if not self.cluster:
            return self._plain
        if self._cluster is None:
            self._cluster = RedisCluster.from_url(self.url, **_CLIENT_OPTIONS)
        return self._cluster

    def lost(self) -> None:
        """A command failed: in a cluster, look the slot's owner up again before the next."""
        if self.cluster:
            self._owner, self._stale = None, True


def _cluster_enabled(client: redis.Redis) -> bool:
    """Whether `client`'s server is a cluster node: `INFO cluster`, or when an ACL
    refuses INFO, `CLUSTER SLOTS`, which a single server answers with an error. A user
    refused both is taken to be on a single server: no cluster client works without
    CLUSTER SLOTS."""
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except redis.ResponseError:
        pass
    try:
        client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
    except redis.ResponseError:
        return False
    return True


@dataclass(frozen=True)
class Replication:
    """WAIT for `replicas` replicas (up to `timeout_ms`) after each fetch, ack and dead
    letter; 0 replicas: do not wait."""

    replicas: int = 0
    timeout_ms: int = 1000


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


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _entry(raw: Sequence[Any], deliveries: int | None = None) -> Entry:
    entry_id, flat = raw[0], raw[1] or []
    fields = dict(zip(flat[::2], flat[1::2], strict=False))
    task = fields.get(b"task", b"")
    count = int(raw[2]) if deliveries is None else deliveries
    return Entry(id=_text(entry_id), task=task, deliveries=count)


@dataclass(frozen=True)
class Settlement:
    """How one delivery settles: acked, or dead-lettered when it failed, with its event.

    The event's status (the record's) follows from the outcome: `completed` for
    completed and duplicate, `failed` for failed and dead_lettered.
    """

    entry: Entry
    outcome: str  # completed, duplicate, failed or dead_lettered
    request_id: str | None = None
    image_id: str | None = None
    file_path: str | None = None
    error: str | None = None

    @property
    def dead(self) -> bool:
        return self.outcome in ("failed", "dead_lettered")

    def args(self) -> list[str]:
        """The 6 values settle.lua takes for this entry's ack and event."""
        return [
            self.entry.id,
            encodable(self.request_id or ""),
            encodable(self.image_id or ""),
            self.outcome,
            encodable(self.file_path or ""),
            encodable(self.error or ""),
        ]


@dataclass(frozen=True)
class Event:
    """One entry of `{L}:events`: its ID and its fields, as text."""

    id: str
    fields: dict[str, str]

    @classmethod
    def of(cls, event_id: str, raw: dict[Any, Any]) -> Event:
        return cls(event_id, {_text(k): _text(v) for k, v in raw.items()})

    def __getitem__(self, name: str) -> str:
        return self.fields.get(name, "")


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

    def dead_task(self, task: bytes) -> bytes:
        return task if len(task) <= self.max_task_bytes else task[:DEAD_TASK_BYTES]


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

    def __init__(
        self,
        server: Server | redis.Redis,
        queue: str,
        group: str,
        consumer: str,
        replication: Replication = Replication(),
        settling: Settling = Settling(),
    ) -> None:
        self.server = server if isinstance(server, Server) else Server.of(server)
        self.keys = Keys.for_queue(queue)
        self.group = group
        self.consumer = consumer
        self.replication = replication
        self.settling = settling
        # Called with (replicas asked for, replicas that confirmed) when a WAIT falls short.
        self.on_short_wait: Callable[[int, int], None] = lambda _want, _got: None

    @property
    def client(self) -> redis.Redis:
        """A plain client of the server holding this queue's keys."""
        return self.server.client_for(self.keys.queue)

    @contextlib.contextmanager
    def _talking(self, action: str) -> Iterator[None]:
        """Translate errors, and have the cluster route looked up again after one."""
        try:
            with translated(action):
                yield
        except RedisUnavailable:
            self.server.lost()
            raise

    def ensure_group(self) -> None:
        """Create the stream and the consumer group if missing. Raises RedisUnavailable."""
        with self._talking("creating consumer group"):
            try:
                self.client.xgroup_create(self.keys.stream, self.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _run(
        self, action: str, script: Script, keys: list[str], args: list[Any], wait: bool = False
    ) -> Any:
        """Run a script, then WAIT for replicas if asked to; None if the stream or group
        was deleted (it is recreated)."""
        with self._talking(action):
            try:
                if not (wait and self.replication.replicas):
                    return script(keys=keys, args=args, client=self.client)
                return self._replicated(script, keys, args)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
        self.ensure_group()
        return None

    def _replicated(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        # WAIT counts the writes of its own connection, so the script and the WAIT go
        # down one pipeline.
        want, timeout = self.replication.replicas, self.replication.timeout_ms
        pipe = self.client.pipeline(transaction=False)
        script(keys=keys, args=args, client=pipe)
        pipe.execute_command("WAIT", want, timeout)  # type: ignore[no-untyped-call]
        reply, got = pipe.execute()
        if int(got) < want:
            self.on_short_wait(want, int(got))
        return reply

    def ping(self) -> None:
        with self._talking("ping"):
            self.client.ping()

    def fetch(self, count: int) -> list[Entry]:
        """Mirror up to `count` list elements and read up to `count` new entries."""
        raw = self._run(
            "reading new entries",
            _FETCH,
            [self.keys.queue, self.keys.stream],
            [self.group, self.consumer, count],
            wait=True,
        )
        return [_entry(e, deliveries=1) for e in raw or []]

    def wait_for_tasks(self, timeout_s: float) -> None:
        """Block until the list has an element or the timeout passes, without taking it.

        BLMOVE from the list's tail back onto its tail leaves the list unchanged.
        """
        with self._talking("waiting for tasks"):
            self.client.execute_command(  # type: ignore[no-untyped-call]
                "BLMOVE", self.keys.queue, self.keys.queue, "RIGHT", "RIGHT", timeout_s
            )

    def own_pending(self, after: str, count: int) -> tuple[list[Entry], str, int]:
        """This consumer's pending entries after `after`: (entries, last ID, deleted)."""
        got = self._run(
            "reading own pending entries",
            _PENDING,
            [self.keys.stream],
            [self.group, self.consumer, after, count],
        )
        entries, last, gone = got or ([], after, 0)
        return [_entry(e) for e in entries], _text(last), int(gone)

    def claim(self, min_idle_ms: int, start: str, count: int) -> tuple[list[Entry], str, int]:
        """XAUTOCLAIM entries idle for `min_idle_ms`: (entries, next start, deleted)."""
        got = self._run(
            "claiming idle entries",
            _CLAIM,
            [self.keys.stream],
            [self.group, self.consumer, min_idle_ms, start, count],
        )
        nxt, entries, gone = got or ("0-0", [], 0)
        return [_entry(e) for e in entries], _text(nxt), int(gone)

    def observe(self) -> Observation:
        """Queue, pending and dead-letter figures plus every consumer, in one round trip."""
        with self._talking("observing the queue"):
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
            oldest = max(0.0, (now_ms - int(_text(summary["min"]).split("-")[0])) / 1000)
        consumers = [Consumer(_text(i["name"]), int(i["pending"]), int(i["idle"])) for i in infos]
        return Observation(int(queued), int(dead), int(summary["pending"]), oldest, consumers)

    def rescue(self, silent: str, min_idle_ms: int, count: int) -> tuple[list[Entry], int]:
        """Claim a silent consumer's entries idle for `min_idle_ms`: (entries, deleted)."""
        got = self._run(
            "claiming a silent consumer's entries",
            _RESCUE,
            [self.keys.stream],
            [self.group, self.consumer, silent, min_idle_ms, count],
        )
        entries, gone = got or ([], 0)
        return [_entry(e) for e in entries], int(gone)

    def pending_idle(self, min_idle_ms: int, count: int) -> list[dict[str, Any]]:
        """Pending entries idle for `min_idle_ms`, without claiming them."""
        with self._talking("listing pending entries"):
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
            self._run("removing a consumer", _FORGET, [self.keys.stream], [self.group, consumer])
        )

    def settle(self, settlements: Sequence[Settlement]) -> int:
        """Ack or dead-letter entries whose outcome is durable, each with its event, at
        once; the number this call settled (entries settled by someone else first are
        only deleted). Raises RedisUnavailable."""
        if not settlements:
            return 0
        limits = self.settling
        args: list[Any] = [
            self.group,
            self.consumer,
            limits.events_maxlen,
            "1" if limits.publish_events else "0",
            limits.dead_letters_maxlen,
            datetime.now(UTC).isoformat(timespec="microseconds"),
            len(settlements),
        ]
        for settlement in settlements:
            args += settlement.args()
        for settlement in settlements:
            if settlement.dead:
                args += [settlement.entry.deliveries, limits.dead_task(settlement.entry.task)]
        keys = [self.keys.stream, self.keys.dead, self.keys.events]
        return int(self._run("settling", _SETTLE, keys, args, wait=True) or 0)

    def touch(self, ids: Sequence[str]) -> None:
        """Reset the idle time of entries still in hand, so no one claims them."""
        if ids:
            self._run(
                "refreshing held entries",
                _TOUCH,
                [self.keys.stream],
                [self.group, self.consumer, *ids],
            )

    def dead_letters(self, count: int, after: str = "-") -> list[tuple[str, dict[bytes, bytes]]]:
        """Up to `count` dead letters after `after` (exclusive unless "-")."""
        start = after if after == "-" else "(" + after
        with self._talking("reading dead letters"):
            rows: list[Any] = self.client.xrange(self.keys.dead, start, "+", count=count) or []
        return [(_text(i), dict(f or {})) for i, f in rows]

    def latest_dead_letters(
        self, count: int, before: str = "+"
    ) -> list[tuple[str, dict[bytes, bytes]]]:
        """Up to `count` dead letters before `before` (exclusive unless "+"), newest
        first. Raises RedisUnavailable."""
        end = before if before == "+" else "(" + before
        with self._talking("reading dead letters"):
            rows: list[Any] = self.client.xrevrange(self.keys.dead, end, "-", count=count) or []
        return [(_text(i), dict(f or {})) for i, f in rows]

    def read_events(
        self, after: str = "0-0", count: int = 1000, block_ms: int | None = None
    ) -> list[Event]:
        """Up to `count` events after `after`, oldest first; with `block_ms`, wait that
        long for one when there is none. Raises RedisUnavailable."""
        with self._talking("reading events"):
            reply: Any = self.client.xread({self.keys.events: after}, count=count, block=block_ms)
        if not reply:
            return []
        rows = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
        return [Event.of(_text(i), f or {}) for i, f in rows]

    def last_events(self, count: int) -> list[Event]:
        """The latest `count` events, oldest first. Raises RedisUnavailable."""
        with self._talking("reading events"):
            rows: Any = self.client.xrevrange(self.keys.events, "+", "-", count=count)
        return [Event.of(_text(i), f or {}) for i, f in reversed(rows or [])]

    def revive(self, dead_id: str) -> str | None:
        """Move one dead letter back into the stream; its new entry ID, or None if gone."""
        with self._talking("replaying a dead letter"):
            new = _REVIVE(
                keys=[self.keys.stream, self.keys.dead], args=[dead_id], client=self.client
            )
        return _text(new) if new else None

    def status(self, gone_after_ms: int, errors: int = 5) -> dict[str, Any]:
        """Lengths, pending per consumer with its oldest entry's idle time, last errors.

        Consumers silent for `gone_after_ms` are marked gone.
        """
        seen = self.observe()
        with self._talking("reading status"):
            streamed = self.client.xlen(self.keys.stream)
            last: list[Any] = self.client.xrevrange(self.keys.dead, "+", "-", count=errors) or []
            consumers = [self._consumer_report(c, gone_after_ms) for c in seen.consumers]
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

    def _consumer_report(self, consumer: Consumer, gone_after_ms: int) -> dict[str, Any]:
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
            "gone": consumer.idle_ms >= gone_after_ms,
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
