"""returner.producer against a real Redis Cluster: the tasks land on the master that owns
the queue's slot, whichever node REDIS_URL names."""

from __future__ import annotations

import pytest

from returner.producer import Producer
from tests.cluster.conftest import Cluster
from tests.cluster.support import fresh_queue, not_owner
from tests.conftest import Frames, random_frame


@pytest.mark.parametrize("cluster", [True, None], ids=["cluster-true", "cluster-auto"])
def test_publish_reaches_the_owner_of_the_queue(redis_cluster: Cluster, frames: Frames,
                                                cluster: bool | None) -> None:
    queue = fresh_queue(redis_cluster, "producer")
    owner = redis_cluster.node_for_key(queue)
    producer = Producer(not_owner(redis_cluster, queue).url, queue, cluster=cluster)
    tasks = producer.publish_many(
        [(random_frame((16, 16, 3), seed=i), "req", f"img_{i}") for i in range(5)])
    frames.names += [t.shm_name for t in tasks]
    assert owner.r.llen(queue) == 5
    assert [t.image_id for t in tasks] == [f"img_{i}" for i in range(5)]
