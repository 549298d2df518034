"""Helpers shared by the tests that run the returner against a real Redis Cluster.

They build on the suite's own helpers (`tests/conftest.py` for frames and waiting,
`tests/e2e/conftest.py` for the CLI as a subprocess) and add what a cluster needs:
queue names whose slot lives on a chosen master, the state of a queue read from the
master that owns it, and a check of everything the returner leaves in OUTPUT_DIR.
"""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from returner.stream import Keys
from tests.cluster.conftest import Cluster, Node
from tests.conftest import Frames, dot_files, read_results
from tests.e2e.conftest import Service, base_env

GROUP = "returner"


def fresh_queue(cluster: Cluster, prefix: str = "cl") -> str:
    """A new queue name whose keys live on one master while REDIS_URL can name another.

    The names the returner must NOT use (`L:stream`, `L:dead`, without the `{L}` tag)
    hash to other masters than `L`, so a key built without the tag could not pass for
    one of the queue's own keys: a script or command using it would fail or show up
    on the wrong node.
    """
    for _ in range(200):
        queue = f"{prefix}:{uuid.uuid4().hex[:10]}"
        owner = cluster.node_for_key(queue)
        untagged = {cluster.node_for_key(f"{queue}:{suffix}") for suffix in ("stream", "dead")}
        if owner not in untagged:
            return queue
    raise AssertionError("no queue name whose untagged variants live on other masters")


def not_owner(cluster: Cluster, queue: str) -> Node:
    """A running master that does not own the slot of `queue`."""
    owner = cluster.node_for_key(queue)
    return next(node for node in cluster.masters if node is not owner)


def cluster_env(url: str, queue: str, output_dir: Path, **settings: Any) -> dict[str, str]:
    """The environment of a `returner` subprocess; settings given as None are left out."""
    values: dict[str, Any] = {
        "REDIS_URL": url,
        "HOSTING_TASKS_QUEUE": queue,
        "OUTPUT_DIR": output_dir,
        "CONSUMER_NAME": "cluster-e2e",
        "METRICS_PORT": 0,
        "ENCODER_THREADS": 2,
    }
    values.update(settings)
    return base_env(**{k: v for k, v in values.items() if v is not None})


def push(client: redis.Redis | redis.RedisCluster, queue: str, messages: Iterable[bytes]) -> None:
    """RPUSH each message, one command per task, as the renderer does."""
    for message in messages:
        client.rpush(queue, message)


@dataclass(frozen=True)
class QueueState:
    """What the master that owns the queue holds for it."""

    list_length: int
    stream_length: int
    pending: int
    dead_letters: int
    consumers: dict[str, int]  # name -> pending entries

    @property
    def drained(self) -> bool:
        """Nothing waiting in the list, nothing in the stream, nothing pending."""
        return self.list_length == 0 and self.stream_length == 0 and self.pending == 0


def queue_state(cluster: Cluster, queue: str, group: str = GROUP) -> QueueState:
    """Read straight from the owner (a plain client), so a misrouted key would show."""
    keys = Keys.for_queue(queue)
    r = cluster.node_for_key(queue).r
    pending, consumers = 0, {}
    if r.exists(keys.stream):
        pending = int(r.xpending(keys.stream, group)["pending"])
        consumers = {c["name"]: int(c["pending"]) for c in r.xinfo_consumers(keys.stream, group)}
    return QueueState(
        int(r.llen(keys.queue)),
        int(r.xlen(keys.stream)),
        pending,
        int(r.xlen(keys.dead)),
        consumers,
    )


@dataclass
class Outputs:
    """Everything the returner left in OUTPUT_DIR, and how it relates to results.json."""

    results: list[dict[str, Any]]
    completed: Counter[str] = field(default_factory=Counter)  # image_id -> entries
    orphans: set[str] = field(default_factory=set)  # JPEGs no entry references
    missing: set[str] = field(default_factory=set)  # referenced JPEGs that do not exist
    shared_names: int = 0  # JPEG names referenced by more than one entry
    dot_files: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        """Completed entries beyond the first for the same task."""
        return sum(n - 1 for n in self.completed.values())


def outputs(output_dir: Path) -> Outputs:
    results: list[dict[str, Any]] = read_results(output_dir)
    found = Outputs(results)
    found.completed.update(e["image_id"] for e in results if e["status"] == "completed")
    referenced = Counter(Path(e["file_path"]).name for e in results if e["file_path"])
    on_disk = {p.name for p in output_dir.glob("*.jpg")}
    found.orphans = on_disk - set(referenced)
    found.missing = set(referenced) - on_disk
    found.shared_names = sum(1 for n in referenced.values() if n > 1)
    found.dot_files = dot_files(output_dir)
    return found


def segments_left(frames: Frames) -> list[str]:
    return [name for name in frames.names if frames.exists(name)]


def json_records(service: Service) -> list[dict[str, Any]]:
    """The JSON log lines (LOG_FORMAT=json) of one service run."""
    records = []
    for line in service.logs(None).splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metric(port: int, name: str, labels: str = "") -> float:
    """One sample of the service's /metrics, 0 when it has not been written yet."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(f"{name}{labels} "):
                return float(line.split()[1])
    return 0.0
