"""Prometheus metrics and the /metrics, /healthz endpoints."""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from returner.task import Kind

log = logging.getLogger(__name__)

OUTCOMES = (Kind.COMPLETED, Kind.DUPLICATE, Kind.FAILED, Kind.DEAD_LETTERED)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
STAGES = ("encode", "commit", "settle")
ERROR_KINDS = ("redis", "disk", "task")
STALE_AFTER_S = 30.0


class Metrics:
    """The service's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tasks = Counter(
            "returner_tasks", "Settled deliveries by outcome.", ["outcome"], registry=self.registry
        )
        self.duration = Histogram(
            "returner_task_duration_seconds",
            "From the task entering the stream to its outcome being durable and settled.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage = Histogram(
            "returner_stage_duration_seconds",
            "Time per batch spent in each stage.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "returner_errors",
            "Errors by kind (redis, disk, task).",
            ["kind"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.tasks.labels(outcome=outcome.value)
        for stage in STAGES:
            self.stage.labels(stage=stage)
        for kind in ERROR_KINDS:
            self.errors.labels(kind=kind)


class Health:
    """What /healthz reports: the loop keeps ticking and Redis answered last time."""

    def __init__(self) -> None:
        self.redis_ok = False
        self._tick = time.monotonic()

    def tick(self, redis_ok: bool = True) -> None:
        self._tick = time.monotonic()
        self.redis_ok = redis_ok

    def live(self) -> tuple[bool, str]:
        age = time.monotonic() - self._tick
        if age > STALE_AFTER_S:
            return False, f"worker loop has not ticked for {age:.0f}s"
        if not self.redis_ok:
            return False, "redis is not answering"
        return True, "ok"


class MetricsServer:
    """A small HTTP server in a daemon thread: /metrics and /healthz."""

    def __init__(self, metrics: Metrics, health: Health, host: str, port: int) -> None:
        handler = _handler(metrics, health)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="metrics", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(metrics: Metrics, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok, why = health.live()
                self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("http: " + format, *args)

    return Handler
