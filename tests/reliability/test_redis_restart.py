"""Redis is killed and restarted in the middle of a run (AOF, appendfsync always): the
worker backs off, reconnects, counts it, and loses nothing."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from returner.embedded import EmbeddedRedis
from tests.conftest import Frames, random_frame, read_results, server_binaries, wait_for
from tests.e2e.conftest import base_env
from tests.e2e.test_run import free_port, results_count


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", binary=server_binaries()[0])
    start_always_fsync(server)
    yield server
    server.stop()


def start_always_fsync(server: EmbeddedRedis) -> None:
    server.start()
    redis.Redis(port=server.port).config_set("appendfsync", "always")


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def test_redis_restart_mid_run(own_redis: EmbeddedRedis, service, tmp_path: Path,
                               frames: Frames) -> None:
    out, port, queue = tmp_path / "out", free_port(), "restart:q"
    client = redis.Redis(port=own_redis.port)
    env = base_env(REDIS_URL=own_redis.url, HOSTING_TASKS_QUEUE=queue, OUTPUT_DIR=out,
                   METRICS_PORT=port, CONSUMER_NAME="restart", ENCODER_THREADS=2)
    svc = service(env).start()
    svc.wait_ready()
    count = 120
    for i in range(count // 2):
        client.rpush(queue, frames.task(random_frame((256, 256, 3), seed=i), "req", f"img_{i}"))
    wait_for(lambda: results_count(out) >= 10, what="some progress")

    assert own_redis.proc is not None
    own_redis.proc.kill()  # a crash: with appendfsync always, every acknowledged write is on disk
    own_redis.proc.wait()
    wait_for(lambda: "redis unavailable" in svc.logs(None), what="the outage noticed")
    start_always_fsync(own_redis)
    client = redis.Redis(port=own_redis.port)
    for i in range(count // 2, count):
        client.rpush(queue, frames.task(random_frame((256, 256, 3), seed=i), "req", f"img_{i}"))

    wait_for(lambda: results_count(out) >= count, timeout=90, what="every task")
    assert metric(port, "returner_redis_reconnects_total") >= 1
    assert metric(port, 'returner_errors_total{kind="redis"}') >= 1
    assert svc.stop() == 0
    entries = read_results(out)
    completed = [e["image_id"] for e in entries if e["status"] == "completed"]
    assert sorted(completed) == sorted(f"img_{i}" for i in range(count)), "lost or doubled"
    assert client.xlen(f"{{{queue}}}:stream") == 0
    assert not any(frames.exists(n) for n in frames.names)
