"""Metrics after known work, liveness and readiness (including alive-but-stuck), JSON logs."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from returner import metrics as metrics_module
from returner import pipeline as pipeline_module
from returner.logs import JsonFormatter
from returner.metrics import Health, Metrics, MetricsServer
from returner.settings import Settings
from returner.stream import Consumer
from returner.worker import Worker
from tests.conftest import Frames, random_frame, wait_for


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Served:
    def __init__(self, worker: Worker, metrics: Metrics, health: Health, port: int,
                 stop: threading.Event) -> None:
        self.worker, self.metrics, self.health, self.port, self.stop = (
            worker, metrics, health, port, stop)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0


@pytest.fixture
def serve(redis_url: str) -> Iterator[Callable[[Settings], Served]]:
    started: list[tuple[threading.Event, threading.Thread, MetricsServer]] = []

    def start(settings: Settings) -> Served:
        stream = Consumer(redis.Redis.from_url(redis_url), settings.hosting_tasks_queue,
                        settings.consumer_group, settings.consumer_name)
        metrics, stop = Metrics(), threading.Event()
        health = Health(stuck_after_s=settings.stuck_after_ms / 1000)
        worker = Worker(settings, stream, metrics, stop, health)
        server = MetricsServer(metrics.registry, health, "127.0.0.1", 0)
        server.start()
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        started.append((stop, thread, server))
        return Served(worker, metrics, health, server.address[1], stop)

    yield start
    for stop, thread, server in started:
        stop.set()
        thread.join(timeout=10)
        server.stop()
        assert not thread.is_alive()


def test_metrics_after_known_work(serve, make_settings, r: redis.Redis, queue: str,
                                  frames: Frames) -> None:
    served = serve(make_settings())
    for i in range(3):
        r.rpush(queue, frames.task(random_frame((64, 80, 3), seed=i), "req", f"img_{i}"))
    wait_for(lambda: served.worker.tally.settled == 3, what="three completed")
    r.rpush(queue, frames.task(random_frame((64, 80, 3)), "req", "img_0"))  # a duplicate
    r.rpush(queue, b"{}")  # failed
    wait_for(lambda: served.worker.tally.settled == 5, what="five settled deliveries")

    status, body = get(served.port, "/metrics")
    assert status == 200
    assert 'returner_tasks_total{outcome="completed"} 3.0' in body
    assert 'returner_tasks_total{outcome="duplicate"} 1.0' in body
    assert 'returner_tasks_total{outcome="failed"} 1.0' in body
    assert 'returner_tasks_total{outcome="dead_lettered"} 0.0' in body
    assert "returner_task_duration_seconds_count 5.0" in body
    assert 'returner_build_info{python="' in body
    for stage in ("load", "encode", "write"):
        assert served.value("returner_stage_duration_seconds_count", {"stage": stage}) == 3
    assert served.value("returner_stage_duration_seconds_count", {"stage": "commit"}) >= 1
    written = sum(p.stat().st_size for p in served.worker.results.out.path.glob("*.jpg"))
    assert served.value("returner_bytes_written_total") == written
    assert served.value("returner_deliveries_bucket", {"le": "1.0"}) == 5
    # gauges come from the periodic observation of the queue
    wait_for(lambda: served.value("returner_dead_letters") == 1, what="dead-letter gauge")
    assert served.value("returner_queue_length") == 0
    assert served.value("returner_errors_total", {"kind": "redis"}) == 0


def test_queue_gauges(serve, make_settings, r: redis.Redis, queue: str) -> None:
    ghost = Consumer(r, queue, "returner", "ghost")
    ghost.stream.ensure_group()
    r.rpush(queue, b"a", b"b")
    ghost.fetch(2)
    served = serve(make_settings(CONSUMER_TIMEOUT_MS=600_000, CLAIM_MIN_IDLE_MS=600_000))
    wait_for(lambda: served.value("returner_pending") == 2, what="pending gauge")
    assert served.value("returner_oldest_pending_seconds") >= 0


def test_health_and_readiness(serve, make_settings) -> None:
    served = serve(make_settings())
    wait_for(lambda: get(served.port, "/readyz")[0] == 200, what="ready")
    assert get(served.port, "/healthz") == (200, "ok\n")
    assert get(served.port, "/nothing")[0] == 404


def test_not_ready_until_redis_answers(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, REDIS_URL="redis://127.0.0.1:1/0",  # type: ignore[call-arg]
                        OUTPUT_DIR=tmp_path, METRICS_PORT=0)
    health, metrics, stop = Health(), Metrics(), threading.Event()
    worker = Worker(settings, Consumer(redis.Redis.from_url(settings.redis_url or ""),
                                     "q", "returner", "c"), metrics, stop, health)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    wait_for(lambda: metrics.registry.get_sample_value("returner_errors_total",
                                                       {"kind": "redis"}), what="a redis error")
    assert health.live() == (False, "redis is not answering")
    assert health.ready()[0] is False
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_alive_but_stuck(serve, make_settings, r: redis.Redis, queue: str, frames: Frames,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung encode keeps /healthz green (the loop ticks) but turns /readyz red."""
    release = threading.Event()
    real_encode = pipeline_module.encode

    def hanging_encode(*args, **kwargs):  # type: ignore[no-untyped-def]
        release.wait(30)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "encode", hanging_encode)
    served = serve(make_settings(STUCK_AFTER_MS=1000))
    try:
        wait_for(lambda: get(served.port, "/readyz")[0] == 200, what="ready before the task")
        r.rpush(queue, frames.task(random_frame((32, 32, 3)), "req", "hang"))
        wait_for(lambda: get(served.port, "/readyz")[1].startswith("stuck:"), what="stuck")
        assert get(served.port, "/readyz")[0] == 503
        assert get(served.port, "/healthz")[0] == 200
        assert "returner_ready 0.0" in get(served.port, "/metrics")[1]
    finally:
        release.set()
    wait_for(lambda: served.worker.tally.completed == 1, what="the task after release")
    wait_for(lambda: get(served.port, "/readyz")[0] == 200, what="ready again")


def test_health_unit() -> None:
    health = Health(stuck_after_s=0.05)
    health.tick(redis_ok=True)
    assert health.ready() == (True, "ok")
    health.paused = True
    assert health.ready()[0] is False and health.live()[0] is True
    health.paused = False
    health.holding(True)
    time.sleep(0.1)  # lets the stuck threshold pass; the condition is the elapsed time itself
    health.tick()
    assert health.ready()[1].startswith("stuck:")
    health.progressed()
    assert health.ready()[0] is True
    health.holding(False)
    assert health.ready()[0] is True


def test_json_log_lines_carry_task_fields() -> None:
    record = logging.LogRecord("returner.worker", logging.INFO, __file__, 1, "task %s done",
                               ("x",), None)
    for key, value in {"request_id": "r1", "image_id": "i1", "entry_id": "1-0",
                       "outcome": "completed", "duration_s": 0.01}.items():
        setattr(record, key, value)
    doc = json.loads(JsonFormatter().format(record))
    assert doc["msg"] == "task x done" and doc["level"] == "info"
    assert doc["request_id"] == "r1" and doc["outcome"] == "completed"
    assert doc["duration_s"] == 0.01 and doc["ts"].endswith("+00:00")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_flood_of_idle_connections_is_bounded_and_timed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding 4: idle connections starved /healthz and used up the worker's descriptors."""
    monkeypatch.setattr(metrics_module, "CONNECTION_TIMEOUT_S", 0.5)
    health = Health()
    health.tick(redis_ok=True)
    server = MetricsServer(Metrics().registry, health, "127.0.0.1", 0)
    server.start()
    port, before = server.address[1], open_fds()
    flood = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(200)]
    try:
        # accepted ones hold a thread and a descriptor each, at most MAX_CONNECTIONS
        wait_for(lambda: open_fds() - before - len(flood) <= metrics_module.MAX_CONNECTIONS,
                 what="the server to refuse the surplus")
        # and idle ones are dropped after the timeout: the server answers again
        def healthy() -> bool:
            health.tick(redis_ok=True)  # the worker loop would, meanwhile
            try:
                return get(port, "/healthz") == (200, "ok\n")
            except ConnectionError:  # hung up on: every slot still taken by the flood
                return False

        wait_for(healthy, timeout=10, what="/healthz while the flood idles")
        closed = sum(1 for s in flood if s.recv(1) == b"")  # EOF: the server hung up
        assert closed == len(flood)
    finally:
        for s in flood:
            s.close()
        server.stop()
