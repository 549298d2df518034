"""A least-privilege ACL user on a cluster (README, "Redis access").

Such a user may not be allowed INFO; `CLUSTER SLOTS`, which any cluster client needs,
then tells a cluster from a single server. Taking a cluster for a single server would
work until a failover, after which the worker would retry the dead master for ever.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from returner.connection import Server
from returner.stream import Stream
from tests.cluster.conftest import Cluster
from tests.cluster.support import GROUP, fresh_queue

# The README's grants, plus what any cluster client needs to find the slot owners.
GRANTS = [
    "+blmove",
    "+evalsha",
    "+llen",
    "+lpop",
    "+ping",
    "+script|load",
    "+time",
    "+xack",
    "+xadd",
    "+xautoclaim",
    "+xclaim",
    "+xdel",
    "+xgroup|create",
    "+xgroup|delconsumer",
    "+xinfo|consumers",
    "+xlen",
    "+xpending",
    "+xrange",
    "+xreadgroup",
    "+xrevrange",
    "+cluster|slots",
    "+command",
]


@pytest.fixture
def acl_user(redis_cluster: Cluster) -> Iterator[tuple[str, str]]:
    """(user name, queue): a user allowed the queue's keys only, on every master."""
    user, queue = f"returner-{uuid.uuid4().hex[:8]}", fresh_queue(redis_cluster, "acl")
    keys = [f"~{queue}", f"~{{{queue}}}:*"]
    for node in redis_cluster.masters:
        node.command("ACL", "SETUSER", user, "on", ">s3cret", "resetkeys", *keys, *GRANTS)
    yield user, queue
    for node in redis_cluster.masters:
        node.command("ACL", "DELUSER", user)


def test_a_user_without_info_is_not_taken_for_a_single_server(
    redis_cluster: Cluster, acl_user: tuple[str, str]
) -> None:
    """REDIS_CLUSTER=auto with a user that may not run INFO, REDIS_URL at the queue's
    owner: CLUSTER SLOTS still tells the returner it is a cluster."""
    user, queue = acl_user
    owner = redis_cluster.node_for_key(queue)
    server = Server(f"redis://{user}:s3cret@127.0.0.1:{owner.port}")
    Stream(server, queue, GROUP).ensure_group()
    assert server.cluster is True, "a Redis Cluster was taken for a single server"


def test_a_user_without_info_or_cluster_slots_is_taken_for_a_single_server_user(
    redis_cluster: Cluster, acl_user: tuple[str, str]
) -> None:
    """With neither INFO nor CLUSTER SLOTS allowed no cluster client could work, so the
    returner talks to REDIS_URL's node alone (the README lists the cluster grants)."""
    user, queue = acl_user
    for node in redis_cluster.masters:
        node.command("ACL", "SETUSER", user, "-cluster|slots")
    owner = redis_cluster.node_for_key(queue)
    server = Server(f"redis://{user}:s3cret@127.0.0.1:{owner.port}")
    Stream(server, queue, GROUP).ensure_group()
    assert server.cluster is False
