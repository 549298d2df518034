"""The master that owns the queue dies (SIGKILL) while a renderer pushes and `returner
run` consumes; its replica takes over. What was lost, doubled, left pending or leaked?

Two renderers: (a) a plain RPUSH, acknowledged by the master alone, which Redis
replicates asynchronously, so a push acknowledged just before the kill may be gone;
(b) RPUSH then `WAIT 1 1000` on the same connection (asking again until a replica
confirms, pushing again if the connection died), with the returner run under
REDIS_WAIT_REPLICAS=1. Once the replica has taken over, a fresh node joins as its
replica (what an operator would do), so WAIT can be satisfied again.

Asserted in both: no task completed twice, no orphan, every task pushed after the
failover completed, nothing left pending, no segment of a completed task left, and the
returner kept running. In (b) also: no acknowledged task lost. The figures (lost,
pending, leaked, duplicates skipped, seconds from the kill to the first task completed
through the new master) are printed (-s) and appended as one JSON line to the file
named by RETURNER_FAILOVER_REPORT, if set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.connection import Connection

from tests.cluster.conftest import Cluster, Node, Services
from tests.cluster.support import (
    cluster_env,
    free_port,
    fresh_queue,
    json_records,
    metric,
    not_owner,
    outputs,
    queue_state,
)
from tests.conftest import Frames, random_frame, server_version, wait_for

SHAPE = (64, 64, 3)
KILL_AFTER = 300  # acknowledged pushes before the owner of the queue is killed
AFTER_FAILOVER = 150  # acknowledged pushes once the new master serves, then the renderer stops
PUSH_EVERY_S = 0.0  # as fast as the renderer can: a backlog at the kill
WAIT_TIMEOUT_MS = 1000
CONFIRM_TRIES = 30  # WAITs of WAIT_TIMEOUT_MS before a push is given up as unconfirmed


class Producer(threading.Thread):
    """A renderer: one segment and one RPUSH per task, on a plain connection to the
    master that owns the queue, found through the fixture again after any error."""

    def __init__(self, cluster: Cluster, queue: str, frames: Frames, replicas: int) -> None:
        super().__init__(daemon=True, name="producer")
        self.cluster, self.queue, self.frames, self.replicas = cluster, queue, frames, replicas
        self.palette = [random_frame(SHAPE, seed=s) for s in range(8)]
        self.acked: dict[int, float] = {}  # task -> wall time of its acknowledgement
        self.unconfirmed: set[int] = set()  # (b) pushed, but no replica ever confirmed
        self.uncertain = 0  # pushes whose connection failed after sending: pushed again
        self.error: BaseException | None = None
        self.halt = threading.Event()  # stop now (test over or failed)
        self.enough = threading.Event()  # stop after the task in hand
        self._conn: Connection | None = None
        self._lock = threading.Lock()  # acked is read by the test while this thread writes

    def run(self) -> None:
        try:
            task = 0
            while not self.enough.is_set():
                message = self.frames.task(self.palette[task % 8], f"req_{task % 5}", f"img_{task}")
                if not self._push(task, message) or self.halt.wait(PUSH_EVERY_S):
                    return
                task += 1
        except BaseException as exc:  # reported by the test
            self.error = exc

    def acked_after(self, moment: float) -> set[int]:
        with self._lock:
            return {task for task, at in self.acked.items() if at > moment}

    def _push(self, task: int, message: bytes) -> bool:
        """Push until acknowledged (confirmed by a replica in (b)); False if halted."""
        while not self.halt.is_set():
            sent = False
            try:
                conn = self._connection()
                conn.send_command("RPUSH", self.queue, message)
                sent = True
                conn.read_response()
                if self.replicas and not self._confirmed(conn):
                    self.unconfirmed.add(task)
                    return True
            except (redis.RedisError, OSError, LookupError):
                self._drop()
                self.uncertain += sent  # it may have landed: pushing it again may double it
                self.halt.wait(0.05)  # back off while the cluster fails over
                continue
            with self._lock:
                self.acked[task] = time.time()
            return True
        return False

    def _confirmed(self, conn: Connection) -> bool:
        for _ in range(CONFIRM_TRIES):
            conn.send_command("WAIT", self.replicas, WAIT_TIMEOUT_MS)
            if int(conn.read_response()) >= self.replicas:
                return True
        return False

    def _connection(self) -> Connection:
        if self._conn is None:
            owner = self.cluster.node_for_key(self.queue)
            self._conn = Connection(
                host="127.0.0.1", port=owner.port, socket_timeout=3, socket_connect_timeout=1
            )
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.disconnect()
            self._conn = None

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=60)
        self._drop()


def add_replica(cluster: Cluster, master: Node) -> Node:
    """Start a new node and make it a replica of `master`, as an operator replaces a
    lost node. Uses the fixture's own spawning, so the node is stopped with the cluster."""
    node = cluster._spawn()
    cluster._wait_up(node, 10)
    node.node_id = node.command("CLUSTER", "MYID")
    node.command("CLUSTER", "MEET", "127.0.0.1", master.port)

    def knows_master() -> bool:
        views = {v.node_id: v for v in node.cluster_nodes()}
        view = views.get(master.node_id)
        return view is not None and not view.flags & {"handshake", "noaddr"}

    wait_for(knows_master, timeout=15, what="the new node to know the new master")
    node.command("CLUSTER", "REPLICATE", master.node_id)
    wait_for(
        lambda: node.r.info("replication").get("master_link_status") == "up",
        timeout=15,
        what="the new replica to sync",
    )
    return node


@dataclass
class Figures:
    """What one failover run measured (one JSON line of the report)."""

    variant: str
    redis: str
    tasks: int
    acknowledged: int  # pushes acknowledged (in (b): and confirmed by a replica)
    unconfirmed: int  # (b) pushed, never confirmed by a replica
    uncertain: int  # pushes whose connection failed after sending, so pushed again
    lost: int  # acknowledged, without any entry in results.json
    lost_unacknowledged: int  # not acknowledged, without any entry
    duplicate_results: int  # completed entries beyond the first per task
    failed_entries: int  # results entries that are not `completed`
    orphans: int  # JPEGs without an entry, entries without their JPEG, shared JPEGs
    duplicates_skipped: int  # deliveries settled as duplicates by the returner
    pending: int  # entries still pending after the returner finished
    leaked: int  # segments never released (those of lost tasks included)
    leaked_of_completed: int  # segments of completed tasks not released
    short_waits: float  # returner_redis_short_waits_total
    redis_errors: float  # returner_errors_total{kind="redis"}
    failover_s: float  # kill -> a replica serves the slot (cluster_state ok)
    recovery_s: float | None  # kill -> first task completed whose entry the new master made
    drained: bool  # list, stream and pending all empty once the returner was done
    waiting_at_kill: int  # tasks in the list just before the kill
    pending_at_kill: int  # entries the returner held just before the kill


@pytest.mark.timeout(150)
@pytest.mark.parametrize("variant", ["plain-rpush", "rpush-wait"])
def test_master_failover_mid_stream(
    redis_cluster_replicated: Cluster,
    services: Services,
    output_dir: Path,
    frames: Frames,
    variant: str,
) -> None:
    """Kill the queue's master mid-stream: the returner carries on through the new
    master with no duplicate results, nothing left pending and no leaked segment of a
    completed task; with WAIT on both sides no acknowledged push is lost."""
    cluster, waiting = redis_cluster_replicated, variant == "rpush-wait"
    queue = fresh_queue(cluster, "failover")
    owner = cluster.node_for_key(queue)
    port = free_port()
    env = cluster_env(
        not_owner(cluster, queue).url,
        queue,
        output_dir,
        CONSUMER_NAME="failover",
        LOG_FORMAT="json",
        METRICS_PORT=port,
        REDIS_WAIT_REPLICAS=1 if waiting else None,
        REDIS_WAIT_TIMEOUT_MS=WAIT_TIMEOUT_MS,
    )
    svc = services(env).start()
    svc.wait_ready()
    producer = Producer(cluster, queue, frames, replicas=1 if waiting else 0)
    producer.start()
    try:
        wait_for(lambda: len(producer.acked) >= KILL_AFTER, timeout=60, what="pushes")
        at_kill = queue_state(cluster, queue)
        killed_at, started = time.time(), time.monotonic()
        cluster.kill(owner)
        new_master = cluster.wait_failover(owner, timeout=30)
        failover_s, failed_over_at = time.monotonic() - started, time.time()
        add_replica(cluster, new_master)
        wait_for(
            lambda: len(producer.acked_after(failed_over_at)) >= AFTER_FAILOVER,
            timeout=60,
            what="pushes through the new master",
        )
        producer.enough.set()
        producer.join(timeout=60)
        assert not producer.is_alive(), "the renderer did not stop"
    finally:
        producer.stop()
    assert producer.error is None, repr(producer.error)

    try:
        wait_for(lambda: queue_state(cluster, queue).drained, timeout=30, what="a drained queue")
        drained = True
    except AssertionError:
        drained = False
    assert svc.alive(), svc.logs()
    short_waits = metric(port, "returner_redis_short_waits_total")
    redis_errors = metric(port, "returner_errors_total", '{kind="redis"}')
    assert svc.stop() == 0, svc.logs()

    figures, found_completed = measure(
        variant,
        cluster,
        queue,
        output_dir,
        frames,
        producer,
        svc.logs(None),
        short_waits=short_waits,
        redis_errors=redis_errors,
        failover_s=round(failover_s, 2),
        recovery_s=recovery(json_records(svc), killed_at),
        drained=drained,
        waiting_at_kill=at_kill.list_length,
        pending_at_kill=at_kill.pending,
    )
    report(figures)

    after_failover = producer.acked_after(failed_over_at)
    assert len(after_failover) >= AFTER_FAILOVER and after_failover <= found_completed
    assert figures.recovery_s is not None, "nothing completed through the new master"
    assert figures.duplicate_results == 0
    assert figures.failed_entries == 0 and figures.orphans == 0
    assert figures.drained and figures.pending == 0
    assert figures.leaked_of_completed == 0
    warnings = sum(1 for r in json_records(svc) if r["msg"].startswith("WAIT: "))
    assert short_waits == warnings, "short WAITs logged and counted differently"
    if waiting:
        assert figures.lost == 0, f"acknowledged and confirmed, yet lost: {figures}"


def measure(
    variant: str,
    cluster: Cluster,
    queue: str,
    output_dir: Path,
    frames: Frames,
    producer: Producer,
    logs: str,
    **timings: Any,
) -> tuple[Figures, set[int]]:
    """The figures of one run, and the tasks that were completed."""
    found = outputs(output_dir)
    recorded = {int(e["image_id"].removeprefix("img_")) for e in found.results}
    completed = {int(image.removeprefix("img_")) for image in found.completed}
    pushed = range(len(frames.names))  # one segment per task, in task order
    left = {i for i in pushed if frames.exists(frames.names[i])}
    acked = set(producer.acked)
    state = queue_state(cluster, queue)
    figures = Figures(
        variant=variant,
        redis=server_version(cluster.binary),
        tasks=len(pushed),
        acknowledged=len(acked),
        unconfirmed=len(producer.unconfirmed),
        uncertain=producer.uncertain,
        lost=len(acked - recorded),
        lost_unacknowledged=len(set(pushed) - acked - recorded),
        duplicate_results=found.duplicates,
        failed_entries=sum(1 for e in found.results if e["status"] != "completed"),
        orphans=len(found.orphans) + len(found.missing) + found.shared_names,
        duplicates_skipped=logs.count('"outcome": "duplicate"'),
        pending=state.pending,
        leaked=len(left),
        leaked_of_completed=len(left & completed),
        **timings,
    )
    return figures, completed


def recovery(records: list[dict[str, Any]], killed_at: float) -> float | None:
    """Seconds from the kill to the first completed task whose stream entry was made
    after the kill, i.e. by the new master, and acked there."""
    for record in records:
        if record.get("outcome") != "completed":
            continue
        if int(record["entry_id"].split("-")[0]) / 1000 > killed_at:
            return round(datetime.fromisoformat(record["ts"]).timestamp() - killed_at, 2)
    return None


def report(figures: Figures) -> None:
    line = json.dumps(dataclasses.asdict(figures))
    print(f"\nfailover: {line}")
    path = os.environ.get("RETURNER_FAILOVER_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")
