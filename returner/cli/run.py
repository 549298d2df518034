"""`returner run`: the service's process life. Signals, the GIL's switch interval, the
root warning, the embedded Redis, the metrics server, and one worker in this process or
WORKERS of them under a supervisor."""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from prometheus_client import CollectorRegistry

from returner import logs
from returner.cli import common
from returner.cli.common import install_stop_handlers, redis_url_for, settings_of
from returner.cli.push import push_samples
from returner.errors import SettingsError, TransientError
from returner.metrics import Checks, Health, Metrics, MetricsServer
from returner.objectstore import ObjectStore
from returner.settings import Settings, object_store_config
from returner.stream import Consumer
from returner.supervisor import Supervisor, report_health
from returner.worker import Worker

log = logging.getLogger("returner")
# The main thread settles batches while encoder and I/O threads hand frames on; a
# thread waiting for the GIL waits up to the switch interval (5 ms by default), which
# showed in the latency tail (p99 lower at 1 ms in 8 of 10 paired runs) with no change
# in throughput; see benchmarks/README.md.
GIL_SWITCH_INTERVAL_S = 0.001

Opt = typer.Option


def run(
    ctx: typer.Context,
    redis_url: common.RedisUrl = None,
    hosting_tasks_queue: common.Queue = None,
    output_dir: common.OutputDirOpt = None,
    consumer_group: common.Group = None,
    consumer_name: common.ConsumerOpt = None,
    shm_name_pattern: Annotated[str | None, Opt(help="SHM_NAME_PATTERN.")] = None,
    jpeg_quality: Annotated[int | None, Opt(help="JPEG_QUALITY (1-100).")] = None,
    jpeg_subsampling: Annotated[str | None, Opt(help="JPEG_SUBSAMPLING.")] = None,
    channel_order: Annotated[str | None, Opt(help="CHANNEL_ORDER.")] = None,
    claim_min_idle_ms: Annotated[int | None, Opt(help="CLAIM_MIN_IDLE_MS.")] = None,
    consumer_timeout_ms: Annotated[int | None, Opt(help="CONSUMER_TIMEOUT_MS.")] = None,
    stuck_after_ms: Annotated[int | None, Opt(help="STUCK_AFTER_MS.")] = None,
    max_deliveries: Annotated[int | None, Opt(help="MAX_DELIVERIES.")] = None,
    max_pixels: Annotated[int | None, Opt(help="MAX_PIXELS.")] = None,
    output_layout: Annotated[str | None, Opt(help="OUTPUT_LAYOUT: flat or daily.")] = None,
    results_json_entries: Annotated[
        int | None, Opt(help="RESULTS_JSON_ENTRIES (0: no results.json).")
    ] = None,
    results_retention_days: Annotated[
        int | None, Opt(help="RESULTS_RETENTION_DAYS (0 keeps every record).")
    ] = None,
    metrics_host: Annotated[str | None, Opt(help="METRICS_HOST.")] = None,
    metrics_port: Annotated[int | None, Opt(help="METRICS_PORT (0 disables).")] = None,
    encoder_threads: Annotated[int | None, Opt(help="ENCODER_THREADS.")] = None,
    batch_size: Annotated[int | None, Opt(help="BATCH_SIZE.")] = None,
    workers: Annotated[
        int | None, Opt(help="WORKERS: worker processes, named CONSUMER_NAME-<i> when > 1.")
    ] = None,
    log_level: common.LogLevel = None,
    log_format: common.LogFormat = None,
    demo_count: Annotated[
        int, Opt("--demo", help="Also act as a renderer: push this many sample frames at start.")
    ] = 0,
    health_file: Annotated[Path | None, Opt(hidden=True)] = None,
    supervisor: Annotated[int | None, Opt(hidden=True)] = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then finish what is in hand and exit 0.

    Example: REDIS_URL=redis://localhost:6379/0 returner run --output-dir /srv/frames
    """
    settings = settings_of(ctx)
    if supervisor is None:
        check_object_store(settings)
    if supervisor is not None and health_file is not None:
        serve(settings, demo_count, (health_file, supervisor))
    elif settings.workers > 1:
        supervise(settings, demo_count)
    else:
        serve(settings, demo_count)


def check_object_store(settings: Settings) -> None:
    """Refuse at once (one line, exit 2) an object store that can never work: a missing
    bucket, refused credentials. One that cannot be reached now is waited for."""
    config = object_store_config(settings)
    if config is None:
        return
    store = ObjectStore(config)
    try:
        store.check()
    except TransientError as exc:
        log.warning("%s; starting anyway: uploads pause until it answers", exc)
    finally:
        store.close()


def serve(settings: Settings, demo_count: int, supervised: tuple[Path, int] | None = None) -> None:
    """One worker in this process; `supervised`: (health file, supervisor pid) of a
    worker under `run --workers`."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    stop = threading.Event()
    install_stop_handlers(stop)
    health = Health(stuck_after_s=settings.stuck_after_ms / 1000)
    metrics = Metrics()
    if supervised is not None:
        logs.setup(settings.log_level, settings.log_format, worker=settings.consumer_name)
        report_health(health, *supervised, stop)
    server = start_metrics(settings, metrics.registry, health)
    try:
        with redis_url_for(settings, embedded_ok=True) as url:
            worker = Worker(settings, Consumer.from_settings(settings, url), metrics, stop, health)
            if os.geteuid() == 0:
                log.warning(
                    "running as root: a bug or a hostile message would have the whole "
                    "host; run as the renderer's user"
                )
            if demo_count:
                start_demo(url, settings, demo_count)
            worker.run()
            log.info("stopped: %s", worker.tally)
    finally:
        if server:
            server.stop()


def supervise(settings: Settings, demo_count: int) -> None:
    """WORKERS worker processes, restarted when they die; SIGTERM drains them all."""
    stop = threading.Event()
    with redis_url_for(settings, embedded_ok=True) as url:
        supervisor = Supervisor(settings, url, stop)
        install_stop_handlers(stop, on_second=supervisor.hurry)
        server = None
        try:
            server = start_metrics(settings, supervisor.registry, supervisor.health)
            if demo_count:
                start_demo(url, settings, demo_count)
            supervisor.run()
            restarts = sum(c.restarts for c in supervisor.children)
            log.info("stopped: %d workers, %d restarts", settings.workers, restarts)
        finally:
            if server:
                server.stop()
            supervisor.close()


def start_metrics(
    settings: Settings, registry: CollectorRegistry, health: Checks
) -> MetricsServer | None:
    """The metrics server, serving; None when METRICS_PORT is 0. Raises SettingsError."""
    if not settings.metrics_port:
        return None
    try:
        server = MetricsServer(registry, health, settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        raise SettingsError(
            f"METRICS_PORT: cannot listen on {settings.metrics_host}:"
            f"{settings.metrics_port} ({exc.strerror})"
        ) from None
    server.start()
    host, port = server.address
    log.info("metrics on http://%s:%d/metrics; /healthz, /readyz", host, port)
    return server


def start_demo(url: str, settings: Settings, count: int) -> None:
    """Push `count` sample frames from a thread, as a renderer would."""

    def push() -> None:
        log.info("demo: pushed %d sample frames", push_samples(settings, url, count))

    threading.Thread(target=push, name="demo", daemon=True).start()
