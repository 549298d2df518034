"""Connections to Redis: clients, Redis Cluster routing, error translation, and WAIT.

Used by the stream (the service's side) and the producer (the renderers' side) alike.
Every redis-py exception becomes RedisUnavailable where it leaves this module's callers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from returner.errors import RedisUnavailable

SOCKET_TIMEOUT_S = 10.0

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


def text(value: Any) -> str:
    """A reply value (bytes from this module's clients) as text."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


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

    @contextlib.contextmanager
    def talking(self, action: str) -> Iterator[None]:
        """Translate errors, and have the cluster route looked up again after one."""
        try:
            with translated(action):
                yield
        except RedisUnavailable:
            self.lost()
            raise


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
    """WAIT for `replicas` replicas (up to `timeout_ms`) after a write; 0: do not wait."""

    replicas: int = 0
    timeout_ms: int = 1000

    def write(self, client: redis.Redis, commands: Callable[[Pipeline], object]) -> Any:
        """Send `commands` (queued on a pipeline) and, if asked, WAIT on the same
        connection, since WAIT counts the writes of its own connection. Returns
        (reply of the first command, replicas that confirmed or None). Raises redis errors.
        """
        pipe = client.pipeline(transaction=False)
        commands(pipe)
        if self.replicas:
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)  # type: ignore[no-untyped-call]
        replies = pipe.execute()
        return replies[0], (int(replies[-1]) if self.replicas else None)
