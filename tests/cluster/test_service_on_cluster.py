"""The CLI end to end on a real Redis Cluster, reached through a master that does NOT
own the queue's slot: `run` (one worker and `--workers 2`, and with REDIS_WAIT_REPLICAS),
`status --json` and `replay --pending` / `--dead-letter`, with cluster mode detected or
forced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import simplejpeg

from returner.connection import Server
from returner.stream import Consumer, Keys
from tests.cluster.conftest import Cluster, Services
from tests.cluster.support import (
    GROUP,
    cluster_env,
    free_port,
    fresh_queue,
    metric,
    not_owner,
    outputs,
    push,
    queue_state,
    segments_left,
)
from tests.conftest import CLEAN_DOT_FILES, Frames, psnr, random_frame, wait_for
from tests.e2e.conftest import run_cli
from tests.e2e.test_run import results_count

SHAPE = (96, 128, 3)
CLUSTER_MODE = {"auto": None, "forced": "true"}


@pytest.mark.parametrize(
    ("mode", "workers"),
    [("auto", 1), ("forced", 1), ("auto", 2)],
    ids=["auto-detected", "REDIS_CLUSTER=true", "auto-detected-2-workers"],
)
def test_run_through_a_master_that_does_not_own_the_queue(
    redis_cluster: Cluster,
    services: Services,
    output_dir: Path,
    frames: Frames,
    mode: str,
    workers: int,
) -> None:
    """Every frame pushed (before start and while running) becomes a true-colour JPEG
    with one completed entry; segments are released; the list, the stream and the
    pending list end empty; and the queue's keys live on the owning master, although
    REDIS_URL named another one."""
    cluster, count = redis_cluster, 24
    queue = fresh_queue(cluster)
    owner, entry_node = cluster.node_for_key(queue), not_owner(cluster, queue)
    env = cluster_env(entry_node.url, queue, output_dir, REDIS_CLUSTER=CLUSTER_MODE[mode])
    client = cluster.client()
    sent = {f"img_{i}": random_frame(SHAPE, seed=i) for i in range(count)}
    messages = [
        frames.task(frame, f"req_{i % 3}", image) for i, (image, frame) in enumerate(sent.items())
    ]

    names = {"cluster-e2e"} if workers == 1 else {f"cluster-e2e-{i}" for i in range(workers)}
    push(client, queue, messages[: count // 2])  # waiting before the service starts
    svc = services(env).start("--workers", str(workers))
    svc.wait_ready()
    # A worker joins the group with its first read, which may follow readiness.
    wait_for(lambda: set(queue_state(cluster, queue).consumers) == names, what="every worker")
    push(client, queue, messages[count // 2 :])  # arrive while it blocks on the list
    wait_for(lambda: results_count(output_dir) == count, timeout=60, what="every result")
    assert svc.stop() == 0, svc.logs()

    found = outputs(output_dir)
    assert {e["status"] for e in found.results} == {"completed"}
    assert set(found.completed) == set(sent) and found.duplicates == 0
    assert not found.orphans and not found.missing and found.dot_files == CLEAN_DOT_FILES
    for result in found.results:
        decoded = simplejpeg.decode_jpeg(Path(result["file_path"]).read_bytes(), colorspace="RGB")
        assert psnr(decoded, sent[result["image_id"]]) >= 30, result["image_id"]
    assert segments_left(frames) == []

    state = queue_state(cluster, queue)
    assert state.drained and state.dead_letters == 0
    assert set(state.consumers) == names
    keys = Keys.for_queue(queue)
    assert owner.r.exists(keys.stream) == 1  # a plain client: it would answer MOVED elsewhere
    events = [fields for _, fields in owner.r.xrange(keys.events)]
    assert sorted(e["image_id"] for e in events) == sorted(sent)  # one event per task
    assert {e["status"] for e in events} == {"completed"}


def test_wait_shortfalls_are_counted_and_work_goes_on(
    redis_cluster: Cluster, services: Services, output_dir: Path, frames: Frames
) -> None:
    """REDIS_WAIT_REPLICAS=1 on a cluster without replicas: the WAIT after every fetch
    and ack falls short; each shortfall is logged and counted in
    returner_redis_short_waits_total, and every task is still completed."""
    cluster, count, port = redis_cluster, 6, free_port()
    queue = fresh_queue(cluster)
    env = cluster_env(
        not_owner(cluster, queue).url,
        queue,
        output_dir,
        METRICS_PORT=port,
        REDIS_WAIT_REPLICAS=1,
        REDIS_WAIT_TIMEOUT_MS=10,
    )
    svc = services(env).start()
    svc.wait_ready()
    push(cluster.client(), queue, [frames.task(random_frame(SHAPE, seed=i), "req_w", f"w_{i}")
                                   for i in range(count)])  # fmt: skip
    wait_for(lambda: results_count(output_dir) == count, timeout=60, what="every result")
    shortfalls = metric(port, "returner_redis_short_waits_total")
    logged = svc.logs(None).count("WAIT: 0 of 1 replicas confirmed within 10 ms")
    assert svc.stop() == 0, svc.logs()

    assert shortfalls >= 2 and logged >= shortfalls  # at least one fetch and one ack
    assert set(outputs(output_dir).completed) == {f"w_{i}" for i in range(count)}
    assert segments_left(frames) == [] and queue_state(cluster, queue).drained


@pytest.mark.parametrize("mode", ["auto", "forced"])
def test_status_and_replay_on_the_cluster(
    redis_cluster: Cluster, output_dir: Path, tmp_path: Path, frames: Frames, mode: str
) -> None:
    """`status --json` reports the owner's figures (list, stream, pending per consumer,
    dead letters); `replay --pending --min-idle 0` takes over a dead consumer's entries
    and settles each one (good frames completed, a missing segment failed and
    dead-lettered); `replay --dead-letter` moves the dead letter back into the stream."""
    cluster = redis_cluster
    queue = fresh_queue(cluster)
    entry_node = not_owner(cluster, queue)
    env = cluster_env(entry_node.url, queue, output_dir, REDIS_CLUSTER=CLUSTER_MODE[mode])
    client = cluster.client()
    good = {f"img_{i}": random_frame(SHAPE, seed=i) for i in range(5)}
    push(client, queue, [frames.task(f, "req_r", image) for image, f in good.items()])
    push(client, queue, [b'{"request_id": "req_r", "image_id": "bad", "shm_info": '
                         b'{"shm_name": "img_shm_0bad", "shape": [2, 2, 3], "dtype": "uint8", '
                         b'"size": 12}}'])  # fmt: skip
    ghost = Consumer(Server(entry_node.url), queue, GROUP, "ghost")
    ghost.stream.ensure_group()
    held = ghost.fetch(10)  # a consumer that then died holding six entries
    assert len(held) == 6
    push(client, queue, [frames.task(random_frame(SHAPE, seed=9), "req_w", "waiting")])

    before = status(env, tmp_path)
    assert (before["list_length"], before["stream_length"], before["pending"]) == (1, 6, 6)
    assert [(c["name"], c["pending"]) for c in before["consumers"]] == [("ghost", 6)]
    assert before["dead_letters"] == 0 and before["queue"] == queue

    replayed = run_cli("replay", "--pending", "--min-idle", "0", env=env, cwd=tmp_path)
    assert replayed.returncode == 0, replayed.stderr
    assert "claimed 6: completed 5, duplicate 0, failed 1, dead-lettered 0, still pending 0" in (
        replayed.stdout
    )
    found = outputs(output_dir)
    assert set(found.completed) == set(good) and found.duplicates == 0 and not found.orphans
    assert [e["image_id"] for e in found.results if e["status"] == "failed"] == ["bad"]
    assert segments_left(frames) == [frames.names[-1]]  # only the task still in the list

    after = status(env, tmp_path)
    assert (after["list_length"], after["stream_length"], after["pending"]) == (1, 0, 0)
    assert [(c["name"], c["pending"]) for c in after["consumers"]] == [("ghost", 0)]
    assert after["dead_letters"] == 1 and after["last_errors"][0]["image_id"] == "bad"
    assert after["results"] == {"records": 6}

    revived = run_cli("replay", "--dead-letter", env=env, cwd=tmp_path)
    assert revived.returncode == 0, revived.stderr
    assert f"moved 1 dead letters back into {{{queue}}}:stream" in revived.stdout
    state = queue_state(cluster, queue)
    assert (state.stream_length, state.dead_letters, state.list_length) == (1, 0, 1)


def status(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    shown = run_cli("status", "--json", env=env, cwd=cwd)
    assert shown.returncode == 0, shown.stderr
    report: dict[str, Any] = json.loads(shown.stdout)
    return report
