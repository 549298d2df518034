"""Sanity checks of the Redis Cluster fixtures themselves."""

from __future__ import annotations

import time

import pytest
import redis
from redis.exceptions import RedisClusterException

from tests.cluster.conftest import Cluster
from tests.conftest import wait_for

STREAM, DEAD = "{q}:stream", "{q}:dead"

# Appends to the stream and to the dead list in one step, which only a single node can do.
MOVE = """
redis.call('XADD', KEYS[1], '*', 'payload', ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[1])
return {redis.call('XLEN', KEYS[1]), redis.call('LLEN', KEYS[2])}
"""


def test_three_masters_own_every_slot(redis_cluster: Cluster) -> None:
    assert len(redis_cluster.masters) == 3
    assert redis_cluster.replicas == []
    for node in redis_cluster.masters:
        info = node.cluster_info()
        assert info["cluster_state"] == "ok"
        assert info["cluster_slots_assigned"] == str(16384)
        assert info["cluster_known_nodes"] == "3"


def test_hash_tagged_keys_land_on_one_master(redis_cluster: Cluster) -> None:
    owner = redis_cluster.node_for_key(STREAM)
    assert redis_cluster.node_for_key(DEAD) is owner
    assert redis_cluster.node_for_key("q") is owner  # the tag alone hashes the same

    client = redis_cluster.client()
    client.delete(STREAM, DEAD)
    client.xadd(STREAM, {"payload": "x"})
    client.rpush(DEAD, "x")
    assert owner.r.exists(STREAM, DEAD) == 2  # really stored there, not just routed
    client.delete(STREAM, DEAD)


def test_lua_script_on_tagged_keys(redis_cluster: Cluster) -> None:
    client = redis_cluster.client(decode_responses=True)
    client.delete(STREAM, DEAD)

    assert client.eval(MOVE, 2, STREAM, DEAD, "a") == [1, 1]
    assert client.eval(MOVE, 2, STREAM, DEAD, "b") == [2, 2]
    assert client.lrange(DEAD, 0, -1) == ["a", "b"]

    # Without the shared tag the keys hash to different slots: the client refuses.
    with pytest.raises(RedisClusterException):
        client.eval(MOVE, 2, "stream", "dead", "c")
    client.delete(STREAM, DEAD)


def test_killed_master_is_replaced_by_its_replica(redis_cluster_replicated: Cluster) -> None:
    cluster = redis_cluster_replicated
    client = cluster.client(decode_responses=True)
    client.rpush(DEAD, "before")
    old = cluster.node_for_key(DEAD)
    assert old.command("WAIT", 1, 5000) == 1  # the replica has the write before the crash

    started = time.monotonic()
    cluster.kill(old)
    new = cluster.wait_failover(old, timeout=15)
    assert new is not old
    assert new in cluster.masters
    assert cluster.node_for_key(DEAD) is new

    def writable() -> bool:
        try:
            return client.rpush(DEAD, "after") == 2
        except redis.RedisError:
            return False

    wait_for(writable, timeout=10, what="the key to be writable on the new master")
    assert time.monotonic() - started < 10
    assert new.r.lrange(DEAD, 0, -1) == ["before", "after"]
    assert len(cluster.masters) == 3
    assert len(cluster.replicas) == 2
