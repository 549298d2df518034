"""Every Stream operation against a real cluster, watched with MONITOR on every master.

A cluster only rejects a script's undeclared key when it lives on another node (and
Redis 7 runs scripts without a shebang in a compatibility mode that lets undeclared
keys of other slots of the same node through), so errors alone would not prove the
rule. MONITOR shows every command a script runs (`[0 lua]` lines): each one's keys,
found with COMMAND GETKEYS, must be among the keys its EVALSHA declared, and every
key anything touches must hash to the slot of `{L}`, on the master that owns it.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources

import pytest
import redis
from redis.connection import Connection
from redis.crc import key_slot

from returner.connection import Replication, Server
from returner.stream import Consumer, Keys
from tests.cluster.conftest import Cluster, Node
from tests.cluster.support import GROUP, fresh_queue, not_owner, push
from tests.conftest import acked, dead_lettered, wait_for

SOURCES = {
    path.name.removesuffix(".lua"): path.read_bytes()
    for path in resources.files("returner").joinpath("lua").iterdir()
    if path.name.endswith(".lua")
}
SCRIPTS = {hashlib.sha1(source).hexdigest(): name for name, source in SOURCES.items()}
_LINE = re.compile(rb"^\d+\.\d+ \[\d+ ([^\]]+)\] (.*)$", re.DOTALL)
_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}


def unescape(raw: bytes) -> bytes:
    """Undo MONITOR's quoting (sdscatrepr: \\n, \\", \\\\, \\xHH ...)."""
    out, i = bytearray(), 0
    while i < len(raw):
        if raw[i] != ord("\\"):
            out.append(raw[i])
            i += 1
        elif raw[i + 1 : i + 2] == b"x":
            out.append(int(raw[i + 2 : i + 4], 16))
            i += 4
        else:
            nxt = raw[i + 1 : i + 2]
            out += _ESCAPES.get(nxt, nxt)
            i += 2
    return bytes(out)


@dataclass(frozen=True)
class Command:
    client: str  # "ip:port" of the connection, or "lua" inside a script
    args: tuple[bytes, ...]

    @property
    def name(self) -> str:
        return self.args[0].decode().upper()


def parse(line: bytes) -> Command | None:
    match = _LINE.match(line)
    if match is None:
        return None
    args = tuple(unescape(m.group(1)) for m in _ARG.finditer(match.group(2)))
    return Command(match.group(1).decode(), args) if args else None


class Watch(threading.Thread):
    """MONITOR on one node, collecting parsed commands."""

    def __init__(self, node: Node) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.commands: list[Command] = []
        self.halt = threading.Event()
        self.conn = Connection(host="127.0.0.1", port=node.port, socket_timeout=5)
        self.conn.send_command("MONITOR")
        assert self.conn.read_response() == b"OK"

    def run(self) -> None:
        while not self.halt.is_set():
            if self.conn.can_read(timeout=0.05):
                command = parse(self.conn.read_response())
                if command is not None:
                    self.commands.append(command)

    def stop(self) -> None:
        self.halt.set()
        self.join()
        self.conn.disconnect()


@dataclass
class Segment:
    """What the masters saw during one operation."""

    label: str
    owner: list[Command]
    elsewhere: list[Command]
    scripts: list[str] = field(default_factory=list)  # names of the scripts that ran


class ClusterMonitor:
    """Watches every master; `mark(label)` closes the segment of one operation."""

    def __init__(self, cluster: Cluster, queue: str) -> None:
        self.owner = cluster.node_for_key(queue)
        self.slot = key_slot(queue.encode())
        self.watches = [Watch(node) for node in cluster.masters]
        self.seen = [0 for _ in self.watches]
        self.segments: list[Segment] = []
        self.getkeys = redis.Redis(port=self.owner.port)
        for watch in self.watches:
            watch.start()

    def mark(self, label: str) -> Segment:
        marker = f"--marker-{len(self.segments)}-{label}".encode()
        owner_part: list[Command] = []
        elsewhere: list[Command] = []
        for index, watch in enumerate(self.watches):
            watch.node.r.echo(marker)

            def echoed(w: Watch = watch) -> bool:
                return any(c.args == (b"ECHO", marker) for c in w.commands)

            wait_for(echoed, timeout=10, what=f"MONITOR of {watch.node.port} to see {label}")
            at = next(i for i, c in enumerate(watch.commands) if c.args == (b"ECHO", marker))
            part = [c for c in watch.commands[self.seen[index] : at] if c.name != "ECHO"]
            self.seen[index] = at + 1
            (owner_part if watch.node is self.owner else elsewhere).extend(part)
        segment = Segment(label, owner_part, elsewhere)
        self.segments.append(segment)
        return segment

    def keys_of(self, command: Command) -> list[bytes]:
        try:
            keys = self.getkeys.command_getkeys(*command.args)
        except redis.ResponseError:  # a command without keys (PING, WAIT, CLUSTER ...)
            return []
        return [k.encode() if isinstance(k, str) else k for k in keys]

    def violations(self, segment: Segment) -> list[str]:
        """Undeclared keys, keys of another slot, keyed commands on another master,
        and WAITs not on the connection of the script they follow."""
        found: list[str] = []
        for command in segment.elsewhere:
            if self.keys_of(command):
                found.append(f"{command.args[:3]!r} went to a master that does not own {{L}}")
        declared: set[bytes] = set()
        last_script_client = None
        for command in segment.owner:
            keys = self.keys_of(command)
            found += [f"{command.args[:4]!r}: {k!r} is not in {{L}}'s slot" for k in keys
                      if key_slot(k) != self.slot]  # fmt: skip
            if command.name in ("EVALSHA", "EVAL") and command.client != "lua":
                declared, last_script_client = set(keys), command.client
                segment.scripts.append(SCRIPTS.get(command.args[1].decode(), "unknown"))
            elif command.client == "lua":
                found += [f"{command.args[:4]!r}: {k!r} touched but not declared" for k in keys
                          if k not in declared]  # fmt: skip
            elif command.name == "WAIT" and command.client != last_script_client:
                found.append(f"WAIT on {command.client}, script on {last_script_client}")
        return found

    def close(self) -> None:
        for watch in self.watches:
            watch.stop()
        self.getkeys.close()


@pytest.fixture
def queue_on_cluster(redis_cluster: Cluster) -> str:
    return fresh_queue(redis_cluster, "keys")


@pytest.fixture
def monitor(redis_cluster: Cluster, queue_on_cluster: str) -> Iterator[ClusterMonitor]:
    """MONITOR on every master. The scripts are loaded on the owner first, so that no
    EVALSHA is refused (NOSCRIPT) and sent again, which would show twice."""
    owner = redis_cluster.node_for_key(queue_on_cluster)
    for source in SOURCES.values():
        owner.r.script_load(source)
    watching = ClusterMonitor(redis_cluster, queue_on_cluster)
    yield watching
    watching.close()


def test_every_operation_keeps_to_the_slot_of_the_queue(
    redis_cluster: Cluster, queue_on_cluster: str, monitor: ClusterMonitor
) -> None:
    """Each Stream operation, reached through a master that does not own {L}, runs
    on the owner only; its scripts touch only keys they declare, all in {L}'s slot;
    and each operation does its job (including the paths for entries deleted while
    pending). Any CROSSSLOT, MOVED or undeclared-key error would raise here."""
    cluster, queue = redis_cluster, queue_on_cluster
    keys = Keys.for_queue(queue)
    url = not_owner(cluster, queue).url
    alpha = Consumer(Server(url), queue, GROUP, "alpha")
    beta = Consumer(Server(url, cluster=True), queue, GROUP, "beta")
    ghost = Consumer(Server(url), queue, GROUP, "ghost")
    owner = monitor.owner.r
    tasks = [f'{{"task": {i}, "note": "quote \\" and\\nnewline"}}'.encode() for i in range(8)]
    push(cluster.client(), queue, tasks)
    monitor.mark("setup")
    expected: dict[str, set[str]] = {}

    def step(label: str, *scripts: str) -> None:
        expected[label] = set(scripts)
        monitor.mark(label)

    alpha.stream.ensure_group()
    step("ensure_group")
    got = alpha.fetch(3)
    assert [e.payload for e in got] == tasks[:3]
    step("fetch", "fetch")
    alpha.touch([e.id for e in got])
    step("touch", "touch")
    owner.xdel(keys.stream, got[2].id)  # deleted while pending: acked on the next read
    entries, last, gone = alpha.own_pending("0", 10)
    assert [(e.id, e.deliveries) for e in entries] == [(got[0].id, 2), (got[1].id, 2)]
    assert (last, gone) == (got[2].id, 1)
    step("own_pending", "pending")
    assert alpha.settle(acked(entries[0])) == 1
    step("ack", "settle")
    assert alpha.settle(dead_lettered(entries[1], "broken frame", "req", "img")) == 1
    step("dead_letter", "settle")
    events = owner.xrange(keys.events)
    assert [(f["outcome"], f["entry_id"]) for _, f in events] == [
        ("completed", got[0].id), ("failed", got[1].id)]

    held = ghost.fetch(3)  # a consumer that then goes silent
    owner.xdel(keys.stream, held[0].id)
    monitor.mark("ghost")
    rescued, gone = alpha.rescue("ghost", 0, 10)
    assert [(e.payload, e.deliveries) for e in rescued] == [(tasks[4], 2), (tasks[5], 2)]
    assert gone == 1
    step("rescue", "rescue")
    owner.xdel(keys.stream, rescued[0].id)
    claimed, cursor, gone = beta.claim(0, "0-0", 10)
    assert [(e.payload, e.deliveries) for e in claimed] == [(tasks[5], 3)]
    assert (cursor, gone) == ("0-0", 1)
    step("claim", "claim")

    dead = alpha.stream.dead_letters(10)
    assert len(dead) == 1 and dead[0].error == "broken frame"
    assert owner.xrange(keys.dead, dead[0].id, dead[0].id)[0][1]["task"] == tasks[1].decode()
    step("dead_letters")
    revived = alpha.stream.revive(dead[0].id)
    assert revived is not None and owner.xrange(keys.stream, revived, revived)
    step("revive", "revive")
    assert alpha.stream.forget("ghost") is True
    assert beta.stream.forget("beta") is False  # still holds an entry
    step("forget", "forget")

    seen = alpha.stream.observe()
    assert (seen.queue_length, seen.dead_letters, seen.pending) == (2, 0, 1)
    assert {(c.name, c.pending) for c in seen.consumers} == {("alpha", 0), ("beta", 1)}
    step("observe")
    report = alpha.stream.status(60_000)
    assert (report.stream_length, report.pending, report.dead_letters) == (2, 1, 0)
    assert [c.oldest_pending_ms is not None for c in report.consumers] == [False, True]
    step("status")
    rows = alpha.stream.pending_idle(0, 10)
    assert [(r.consumer, r.deliveries) for r in rows] == [("beta", 3)]
    step("pending_idle")
    alpha.wait_for_tasks(0.05)  # the list has elements: returns at once, list unchanged
    assert owner.lrange(queue, 0, -1) == [t.decode() for t in tasks[6:]]
    alpha.stream.ping()
    step("wait_for_tasks")

    ran: set[str] = set()
    for segment in monitor.segments:
        assert monitor.violations(segment) == [], segment.label
        ran |= set(segment.scripts)
        if segment.label in expected:
            assert set(segment.scripts) == expected[segment.label], segment.label
            assert any(c.client != "lua" for c in segment.owner), segment.label
    assert ran == set(SCRIPTS.values())  # every script ran
    lua_keys = {k for s in monitor.segments for c in s.owner if c.client == "lua"
                for k in monitor.keys_of(c)}  # fmt: skip
    assert lua_keys == {queue.encode(), keys.stream.encode(), keys.dead.encode(),
                        keys.events.encode()}


def test_wait_follows_each_write_on_the_same_connection(
    redis_cluster: Cluster, queue_on_cluster: str, monitor: ClusterMonitor
) -> None:
    """With REDIS_WAIT_REPLICAS (Replication) the fetch, ack and dead-letter scripts are
    each followed by WAIT on the owner, on the very connection that ran the script;
    with no replica in this cluster every WAIT falls short and is reported as such."""
    cluster, queue = redis_cluster, queue_on_cluster
    url = not_owner(cluster, queue).url
    stream = Consumer(Server(url), queue, GROUP, "waiter", Replication(replicas=1, timeout_ms=20))
    short: list[tuple[int, int]] = []
    stream.stream.on_short_wait = lambda want, got: short.append((want, got))
    push(cluster.client(), queue, [b"one", b"two"])
    stream.stream.ensure_group()
    monitor.mark("setup")

    got = stream.fetch(5)
    assert [e.payload for e in got] == [b"one", b"two"]
    stream.touch([got[0].id])  # not a write that must survive a failover: no WAIT
    stream.settle(acked(got[0]))
    stream.settle(dead_lettered(got[1], "bad"))
    segment = monitor.mark("replicated")

    assert monitor.violations(segment) == []
    assert segment.scripts == ["fetch", "touch", "settle", "settle"]
    sent = [c for c in segment.owner if c.client != "lua" and c.name in ("EVALSHA", "WAIT")]
    names = [c.name if c.name == "WAIT" else SCRIPTS[c.args[1].decode()] for c in sent]
    assert names == ["fetch", "WAIT", "touch", "settle", "WAIT", "settle", "WAIT"]
    assert all(c.args[1:] == (b"1", b"20") for c in sent if c.name == "WAIT")
    assert short == [(1, 0)] * 3
