"""Command line: run, replay, status, demo. Settings are built here, once, and passed down."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from returner import __version__, demo, logs
from returner.embedded import EmbeddedRedis
from returner.errors import ReturnerError, SettingsError
from returner.metrics import Health, Metrics, MetricsServer
from returner.output import RESULTS
from returner.settings import Settings, load_settings
from returner.stream import Stream, connect, translated
from returner.worker import Stopping, Worker

log = logging.getLogger("returner")
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Save rendered frames from shared memory as JPEG, driven by Redis.",
)

RedisUrl = Annotated[
    str | None,
    typer.Option("--redis-url", help="REDIS_URL; unset: an embedded local Redis (run only)."),
]
Queue = Annotated[str | None, typer.Option("--queue", help="HOSTING_TASKS_QUEUE.")]
OutputDirOpt = Annotated[Path | None, typer.Option("--output-dir", help="OUTPUT_DIR.")]
Group = Annotated[str | None, typer.Option("--group", help="CONSUMER_GROUP.")]
Consumer = Annotated[str | None, typer.Option("--consumer", help="CONSUMER_NAME.")]
LogLevel = Annotated[str | None, typer.Option("--log-level", help="LOG_LEVEL.")]
LogFormat = Annotated[str | None, typer.Option("--log-format", help="LOG_FORMAT: text or json.")]


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"returner: {message}", err=True)
    return typer.Exit(code)


def settings_from(**options: Any) -> Settings:
    """Settings from env, .env and these CLI options; a bad value exits 2 with one line."""
    try:
        settings = load_settings(**options)
    except SettingsError as exc:
        raise fail(f"bad setting {exc}") from None
    logs.setup(settings.log_level, settings.log_format)
    return settings


@contextlib.contextmanager
def redis_url_for(settings: Settings, embedded_ok: bool) -> Iterator[str]:
    """REDIS_URL, or the URL of an embedded server that lives as long as this block."""
    if settings.redis_url:
        yield settings.redis_url
        return
    if not embedded_ok:
        raise fail("REDIS_URL is not set (use the URL that `returner run` prints)")
    server = EmbeddedRedis(Path(".returner") / "redis")
    try:
        url = server.start()
    except ReturnerError as exc:
        raise fail(str(exc), 1) from None
    typer.echo(f"embedded Redis at {url}  (other local processes: REDIS_URL={url})", err=True)
    try:
        yield url
    finally:
        server.stop()


def stream_for(settings: Settings, url: str, consumer: str | None = None) -> Stream:
    return Stream(
        connect(url),
        settings.hosting_tasks_queue,
        settings.consumer_group,
        consumer or settings.consumer_name,
    )


def install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second signal: leave now; every entry is still safe in Redis
            sys.exit(128 + signum)
        log.info("received %s: finishing what is in hand", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@app.command()
def run(
    redis_url: RedisUrl = None,
    queue: Queue = None,
    output_dir: OutputDirOpt = None,
    group: Group = None,
    consumer: Consumer = None,
    shm_name_pattern: Annotated[str | None, typer.Option(help="SHM_NAME_PATTERN.")] = None,
    jpeg_quality: Annotated[int | None, typer.Option(help="JPEG_QUALITY (1-100).")] = None,
    jpeg_subsampling: Annotated[str | None, typer.Option(help="JPEG_SUBSAMPLING.")] = None,
    channel_order: Annotated[str | None, typer.Option(help="CHANNEL_ORDER.")] = None,
    claim_min_idle_ms: Annotated[int | None, typer.Option(help="CLAIM_MIN_IDLE_MS.")] = None,
    max_deliveries: Annotated[int | None, typer.Option(help="MAX_DELIVERIES.")] = None,
    max_pixels: Annotated[int | None, typer.Option(help="MAX_PIXELS.")] = None,
    results_max_entries: Annotated[int | None, typer.Option(help="RESULTS_MAX_ENTRIES.")] = None,
    metrics_host: Annotated[str | None, typer.Option(help="METRICS_HOST.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="METRICS_PORT (0 disables).")] = None,
    encoder_threads: Annotated[int | None, typer.Option(help="ENCODER_THREADS.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="BATCH_SIZE.")] = None,
    log_level: LogLevel = None,
    log_format: LogFormat = None,
    demo_count: Annotated[
        int,
        typer.Option(
            "--demo", help="Also act as a renderer: push this many sample frames at start."
        ),
    ] = 0,
) -> None:
    """Serve until SIGTERM or SIGINT, then finish what is in hand and exit 0.

    Example: REDIS_URL=redis://localhost:6379/0 returner run --output-dir /srv/frames
    """
    options = {k: v for k, v in locals().items() if k != "demo_count"}
    options.update(
        hosting_tasks_queue=options.pop("queue"),
        consumer_group=options.pop("group"),
        consumer_name=options.pop("consumer"),
    )
    settings = settings_from(**options)
    stop = threading.Event()
    install_stop_handlers(stop)
    health = Health(stuck_after_s=settings.stuck_after_ms / 1000)
    metrics = Metrics()
    server = start_metrics(settings, metrics, health)
    try:
        with redis_url_for(settings, embedded_ok=True) as url:
            worker = Worker(settings, stream_for(settings, url), metrics, stop, health)
            if demo_count:
                start_demo(url, settings.hosting_tasks_queue, demo_count)
            worker.run()
            log.info("stopped: %s", worker.tally)
    except ReturnerError as exc:
        raise fail(str(exc), 1) from None
    finally:
        if server:
            server.stop()


def start_metrics(settings: Settings, metrics: Metrics, health: Health) -> MetricsServer | None:
    if not settings.metrics_port:
        return None
    try:
        server = MetricsServer(metrics, health, settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        raise fail(
            f"bad setting METRICS_PORT: cannot listen on {settings.metrics_host}:"
            f"{settings.metrics_port} ({exc.strerror})"
        ) from None
    server.start()
    host, port = server.address
    log.info("metrics on http://%s:%d/metrics; /healthz, /readyz", host, port)
    return server


def start_demo(url: str, queue: str, count: int) -> None:
    def push() -> None:
        names = demo.push_demo(connect(url), queue, count)
        log.info("demo: pushed %d sample frames", len(names))

    threading.Thread(target=push, name="demo", daemon=True).start()


@app.command()
def replay(
    pending: Annotated[
        bool, typer.Option("--pending", help="Claim and process pending entries.")
    ] = False,
    dead_letter: Annotated[
        bool, typer.Option("--dead-letter", help="Move dead letters back into the stream.")
    ] = False,
    min_idle: Annotated[
        int | None,
        typer.Option(
            "--min-idle",
            help="With --pending: only entries idle this many ms (default "
            "CLAIM_MIN_IDLE_MS; 0 takes everything).",
        ),
    ] = None,
    redis_url: RedisUrl = None,
    queue: Queue = None,
    output_dir: OutputDirOpt = None,
    group: Group = None,
    consumer: Consumer = None,
    log_level: LogLevel = None,
    log_format: LogFormat = None,
) -> None:
    """Recover stuck work: claim and process pending entries, or retry dead letters.

    Example: returner replay --pending --min-idle 0
    """
    if pending == dead_letter:
        raise fail("give exactly one of --pending or --dead-letter")
    settings = settings_from(
        redis_url=redis_url,
        hosting_tasks_queue=queue,
        output_dir=output_dir,
        consumer_group=group,
        log_level=log_level,
        log_format=log_format,
    )
    with redis_url_for(settings, embedded_ok=False) as url:
        try:
            if dead_letter:
                replay_dead(stream_for(settings, url))
            else:
                idle = settings.claim_min_idle_ms if min_idle is None else min_idle
                name = consumer or f"{settings.consumer_name}-replay"
                replay_pending(settings, stream_for(settings, url, name), idle)
        except ReturnerError as exc:
            raise fail(str(exc), 1) from None


def replay_pending(settings: Settings, stream: Stream, min_idle: int) -> None:
    stop = threading.Event()
    install_stop_handlers(stop)
    worker = Worker(settings, stream, Metrics(), stop)
    claimed = 0
    try:
        stream.ping()
        worker.start()
        while not stop.is_set():
            entries = worker.claim_idle(min_idle)
            claimed += len(entries)
            if entries:
                worker.handle(entries)
                typer.echo(f"claimed {claimed}, settled {worker.tally.settled}", err=True)
            if worker.claim_done:
                break
    except Stopping:
        pass
    finally:
        worker.close()
    tally = worker.tally
    typer.echo(
        f"claimed {claimed}: completed {tally.completed}, duplicate {tally.duplicate}, "
        f"failed {tally.failed}, dead-lettered {tally.dead_lettered}, "
        f"still pending {claimed - tally.settled}"
    )
    if tally.settled < claimed:
        raise typer.Exit(1)


def replay_dead(stream: Stream) -> None:
    moved = 0
    with translated("replaying dead letters"):
        while letters := stream.dead_letters(100):
            for dead_id, _ in letters:
                if stream.revive(dead_id):
                    moved += 1
    typer.echo(f"moved {moved} dead letters back into {stream.keys.stream}")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
    redis_url: RedisUrl = None,
    queue: Queue = None,
    output_dir: OutputDirOpt = None,
    group: Group = None,
) -> None:
    """Show list and stream lengths, pending entries per consumer, dead letters, results.

    Example: returner status --json
    """
    settings = settings_from(
        redis_url=redis_url, hosting_tasks_queue=queue, output_dir=output_dir, consumer_group=group
    )
    with redis_url_for(settings, embedded_ok=False) as url:
        try:
            report = stream_for(settings, url).status()
        except ReturnerError as exc:
            raise fail(str(exc), 1) from None
    report["results"] = count_results(settings.output_dir)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"list {report['queue']}: {report['list_length']}")
    typer.echo(f"stream: {report['stream_length']} entries, {report['pending']} pending")
    for c in report["consumers"]:
        typer.echo(
            f"  consumer {c['name']}: {c['pending']} pending, oldest "
            f"{c['oldest_pending_ms']} ms, idle {c['idle_ms']} ms"
        )
    typer.echo(f"dead letters: {report['dead_letters']}")
    typer.echo(f"results: {report['results']}")


def count_results(output_dir: Path) -> int | None:
    try:
        doc = json.loads((output_dir / RESULTS).read_bytes())
    except (OSError, ValueError):
        return None
    return len(doc) if isinstance(doc, list) else None


@app.command("demo")
def demo_cmd(
    count: Annotated[int, typer.Option("--count", min=1, help="How many frames.")] = 10,
    redis_url: RedisUrl = None,
    queue: Queue = None,
) -> None:
    """Act as a renderer: put sample frames in shared memory and push their tasks.

    Example: REDIS_URL=redis://127.0.0.1:6390/0 returner demo --count 20
    """
    settings = settings_from(redis_url=redis_url, hosting_tasks_queue=queue)
    with redis_url_for(settings, embedded_ok=False) as url:
        try:
            with translated("pushing demo tasks"):
                names = demo.push_demo(connect(url), settings.hosting_tasks_queue, count)
        except ReturnerError as exc:
            raise fail(str(exc), 1) from None
    typer.echo(f"pushed {len(names)} frames onto {settings.hosting_tasks_queue}")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app(prog_name="returner")
