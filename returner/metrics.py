"""Prometheus metrics, liveness and readiness, and the HTTP endpoints that serve them."""

from __future__ import annotations

import functools
import logging
import platform
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from returner import __version__
from returner.task import OUTCOMES, Kind

if TYPE_CHECKING:
    from returner.stream import Observation
    from returner.task import Decision

log = logging.getLogger(__name__)

__all__ = ["OUTCOMES", "Health", "Metrics", "MetricsServer"]
STAGES = ("load", "encode", "write", "commit", "ack")
# missing_segment: a task failed because its segment did not exist, usually a renderer
# whose resource tracker unlinked it (docs/getting-started.md, writing a renderer).
ERROR_KINDS = ("redis", "disk", "object_store", "task", "missing_segment")
UPLOAD_ERROR_KINDS = ("unreachable", "timeout", "throttled", "refused")
_UPLOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_STAGE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)
_DELIVERY_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 20)
LIVE_WITHIN_S = 30.0  # /healthz fails when the loop has not ticked for this long
# A client may hold the metrics server this long without sending its request, and this
# many connections at once; more are closed at once. Scrapes and probes take
# milliseconds: a flood of idle connections can neither pin threads nor use up the
# worker's descriptors.
CONNECTION_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 32


# Queue-wide gauges: every worker observes the same queue, so with several worker
# processes the latest observation is the value (prometheus-client multiprocess mode).
_QUEUE_WIDE: Final = "mostrecent"


class Metrics:
    """The worker's metrics, in a registry of their own (nothing global at import).

    Under `run --workers N` each worker process writes them to PROMETHEUS_MULTIPROC_DIR
    and the supervisor serves their sum (see supervisor.py).
    """

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        counter = functools.partial(Counter, registry=r)
        histogram = functools.partial(Histogram, registry=r)
        gauge = functools.partial(Gauge, registry=r, multiprocess_mode=_QUEUE_WIDE)
        self.tasks = counter("returner_tasks", "Settled deliveries by outcome.", ["outcome"])
        self.duration = histogram(
            "returner_task_duration_seconds",
            "From the task entering the stream to its outcome being durable and acknowledged.",
            buckets=_LATENCY_BUCKETS,
        )
        self.stage = histogram(
            "returner_stage_duration_seconds",
            "Time in each stage: load, encode, write per task; commit, ack per batch.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
        )
        self.bytes_written = counter("returner_bytes_written", "JPEG bytes written.")
        self.deliveries = histogram(
            "returner_deliveries",
            "Redis delivery count of each settled delivery.",
            buckets=_DELIVERY_BUCKETS,
        )
        self.events = counter(
            "returner_events", "Events emitted on {L}:events, one per delivery this worker settled."
        )
        self.errors = counter(
            "returner_errors",
            "Errors by kind: redis, disk, object_store, task, missing_segment.",
            ["kind"],
        )
        self.reconnects = counter(
            "returner_redis_reconnects", "Times Redis answered again after failing."
        )
        self.short_waits = counter(
            "returner_redis_short_waits",
            "WAITs (REDIS_WAIT_REPLICAS) that timed out before enough replicas confirmed.",
        )
        self.queue_length = gauge("returner_queue_length", "Elements waiting in the list.")
        self.pending = gauge("returner_pending", "Entries delivered but not yet acknowledged.")
        self.oldest_pending = gauge(
            "returner_oldest_pending_seconds",
            "Age of the oldest pending entry (since it entered the stream).",
        )
        self.dead_letters = gauge("returner_dead_letters", "Entries in the dead-letter stream.")
        self.uploads = histogram(
            "returner_upload_duration_seconds",
            "Conditional creates of JPEGs in the object store that succeeded (OBJECT_STORE_URL).",
            buckets=_UPLOAD_BUCKETS,
        )
        self.upload_errors = counter(
            "returner_upload_errors",
            "Object-store requests that failed: unreachable, timeout, throttled, refused.",
            ["kind"],
        )
        for outcome in OUTCOMES:
            self.tasks.labels(outcome=outcome.value)
        for stage in STAGES:
            self.stage.labels(stage=stage)
        for kind in ERROR_KINDS:
            self.errors.labels(kind=kind)
        for kind in UPLOAD_ERROR_KINDS:
            self.upload_errors.labels(kind=kind)

    def settled(self, decision: Decision, latency_s: float) -> None:
        """Count one settled delivery, `latency_s` after its task entered the stream."""
        kind, outcome = decision.kind, decision.outcome
        self.tasks.labels(outcome=kind.value).inc()
        if kind is Kind.FAILED and outcome.segment_missing:
            self.errors.labels(kind="missing_segment").inc()
        self.duration.observe(latency_s)
        self.deliveries.observe(outcome.entry.deliveries)
        if kind is Kind.COMPLETED and outcome.staged is not None:
            self.bytes_written.inc(outcome.staged.size)
            if outcome.staged.url is not None:  # an object: its write was the upload
                self.uploads.observe(outcome.timings.get("write", 0.0))
        for stage, seconds in outcome.timings.items():
            self.stage.labels(stage=stage).observe(seconds)

    def observed(self, seen: Observation) -> None:
        """The queue as one look at Redis found it."""
        self.queue_length.set(seen.queue_length)
        self.pending.set(seen.pending)
        self.oldest_pending.set(seen.oldest_pending_s or 0.0)
        self.dead_letters.set(seen.dead_letters)


class Health:
    """Liveness (the loop ticks, Redis answers) and readiness (also: not paused, not stuck).

    Stuck means alive but not progressing: entries have been in hand for longer than
    `stuck_after_s` and nothing has been acknowledged meanwhile.
    """

    def __init__(self, stuck_after_s: float = 120.0) -> None:
        self.stuck_after_s = stuck_after_s
        self.redis_ok = False
        self.paused: str | None = None  # what is failing: "output disk", "object store"
        self._tick = time.monotonic()
        self._progress = time.monotonic()
        self._holding_since: float | None = None

    def tick(self, redis_ok: bool | None = None) -> None:
        self._tick = time.monotonic()
        if redis_ok is not None:
            self.redis_ok = redis_ok

    def holding(self, busy: bool) -> None:
        """Entries are in hand (True) or the worker is idle (False)."""
        if not busy:
            self._holding_since = None
        elif self._holding_since is None:
            self._holding_since = time.monotonic()

    def progressed(self) -> None:
        self._progress = time.monotonic()

    def live(self) -> tuple[bool, str]:
        age = time.monotonic() - self._tick
        if age > LIVE_WITHIN_S:
            return False, f"worker loop has not ticked for {age:.0f}s"
        if not self.redis_ok:
            return False, "redis is not answering"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        ok, why = self.live()
        if not ok:
            return ok, why
        if self.paused:
            return False, f"paused: the {self.paused} is failing"
        now = time.monotonic()
        held = now - self._holding_since if self._holding_since is not None else 0.0
        idle = now - self._progress
        if min(held, idle) > self.stuck_after_s:
            return False, f"stuck: entries in hand for {held:.0f}s, nothing acked for {idle:.0f}s"
        return True, "ok"


class Checks(Protocol):
    """Liveness and readiness, each with a reason."""

    def live(self) -> tuple[bool, str]: ...

    def ready(self) -> tuple[bool, str]: ...


class MetricsServer:
    """A small HTTP server in a daemon thread: /metrics, /healthz and /readyz.

    `registry` gets `returner_ready` and `returner_build` added: they describe the
    process that serves them.
    """

    def __init__(self, registry: CollectorRegistry, health: Checks, host: str, port: int) -> None:
        ready = Gauge("returner_ready", "1 while /readyz would answer 200.", registry=registry)
        Info("returner_build", "Version information.", registry=registry).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self.httpd = _BoundedServer((host, port), _handler(registry, ready, health))
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


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS at once."""

    daemon_threads = True
    request_queue_size = 64  # connections waiting to be accepted (or refused)

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _handler(
    registry: CollectorRegistry, ready: Gauge, health: Checks
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = CONNECTION_TIMEOUT_S

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                ready.set(1 if health.ready()[0] else 0)
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, why = health.live() if path == "/healthz" else health.ready()
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
