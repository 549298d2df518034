"""Command line: run, replay, status, demo. Settings are built here, once, and passed down."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import simplejpeg
import typer
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from returner import __version__, demo, logs
from returner.embedded import EmbeddedRedis
from returner.errors import ReturnerError, SettingsError
from returner.logs import escape_controls
from returner.metrics import Checks, Health, Metrics, MetricsServer
from returner.producer import Producer
from returner.results import Store
from returner.settings import Settings, load_settings
from returner.stream import Event, Replication, Server, Settling, Stream, translated
from returner.supervisor import Supervisor, report_health
from returner.task import brief
from returner.worker import Worker

log = logging.getLogger("returner")
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
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
        Server(url, settings.redis_cluster),
        settings.hosting_tasks_queue,
        settings.consumer_group,
        consumer or settings.consumer_name,
        Replication(settings.redis_wait_replicas, settings.redis_wait_timeout_ms),
        Settling(
            settings.events_maxlen,
            settings.publish_events,
            settings.dead_letters_maxlen,
            settings.max_task_bytes,
        ),
    )


def install_stop_handlers(
    stop: threading.Event, on_second: Callable[[], None] = lambda: None
) -> None:
    # The handler only sets the event: it runs between any two bytecodes of the main
    # thread, even inside a log write, so it must not log or do any other I/O itself.
    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second signal: leave now; every entry is still safe in Redis
            on_second()
            os._exit(128 + signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


_NOT_SETTINGS = ("demo_count", "health_file", "supervisor")
GIL_SWITCH_INTERVAL_S = 0.001


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
    consumer_timeout_ms: Annotated[int | None, typer.Option(help="CONSUMER_TIMEOUT_MS.")] = None,
    stuck_after_ms: Annotated[int | None, typer.Option(help="STUCK_AFTER_MS.")] = None,
    max_deliveries: Annotated[int | None, typer.Option(help="MAX_DELIVERIES.")] = None,
    max_pixels: Annotated[int | None, typer.Option(help="MAX_PIXELS.")] = None,
    output_layout: Annotated[str | None, typer.Option(help="OUTPUT_LAYOUT: flat or daily.")] = None,
    results_json_entries: Annotated[
        int | None, typer.Option(help="RESULTS_JSON_ENTRIES (0: no results.json).")
    ] = None,
    results_retention_days: Annotated[
        int | None, typer.Option(help="RESULTS_RETENTION_DAYS (0 keeps every record).")
    ] = None,
    metrics_host: Annotated[str | None, typer.Option(help="METRICS_HOST.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="METRICS_PORT (0 disables).")] = None,
    encoder_threads: Annotated[int | None, typer.Option(help="ENCODER_THREADS.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="BATCH_SIZE.")] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="WORKERS: worker processes, named CONSUMER_NAME-<i> when > 1."),
    ] = None,
    log_level: LogLevel = None,
    log_format: LogFormat = None,
    demo_count: Annotated[
        int,
        typer.Option(
            "--demo", help="Also act as a renderer: push this many sample frames at start."
        ),
    ] = 0,
    health_file: Annotated[Path | None, typer.Option(hidden=True)] = None,
    supervisor: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then finish what is in hand and exit 0.

    Example: REDIS_URL=redis://localhost:6379/0 returner run --output-dir /srv/frames
    """
    options = {k: v for k, v in locals().items() if k not in _NOT_SETTINGS}
    options.update(
        hosting_tasks_queue=options.pop("queue"),
        consumer_group=options.pop("group"),
        consumer_name=options.pop("consumer"),
    )
    settings = settings_from(**options)
    try:
        if supervisor is not None and health_file is not None:
            serve(settings, demo_count, (health_file, supervisor))
        elif settings.workers > 1:
            supervise(settings, demo_count)
        else:
            serve(settings, demo_count)
    except SettingsError as exc:
        raise fail(f"bad setting {exc}") from None
    except ReturnerError as exc:
        raise fail(str(exc), 1) from None


def serve(settings: Settings, demo_count: int, supervised: tuple[Path, int] | None = None) -> None:
    """One worker in this process; `supervised`: (health file, supervisor pid) of a
    worker under `run --workers`."""
    # The main thread settles batches while encoder and I/O threads hand frames on; a
    # thread waiting for the GIL waits up to the switch interval (5 ms by default),
    # which showed in the latency tail (p99 lower at 1 ms in 8 of 10 paired runs) with
    # no change in throughput; see benchmarks/README.md.
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
            worker = Worker(settings, stream_for(settings, url), metrics, stop, health)
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
    if not settings.metrics_port:
        return None
    try:
        server = MetricsServer(registry, health, settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        raise fail(
            f"bad setting METRICS_PORT: cannot listen on {settings.metrics_host}:"
            f"{settings.metrics_port} ({exc.strerror})"
        ) from None
    server.start()
    host, port = server.address
    log.info("metrics on http://%s:%d/metrics; /healthz, /readyz", host, port)
    return server


def push_demo(url: str, settings: Settings, count: int) -> list[str]:
    """Push `count` sample frames onto the queue; their segment names."""
    producer = Producer(url, settings.hosting_tasks_queue, cluster=settings.redis_cluster)
    return demo.push_demo(producer, count)


def start_demo(url: str, settings: Settings, count: int) -> None:
    def push() -> None:
        log.info("demo: pushed %d sample frames", len(push_demo(url, settings, count)))

    threading.Thread(target=push, name="demo", daemon=True).start()


Pending = Annotated[bool, typer.Option("--pending", help="Claim and process pending entries.")]
DeadLetter = Annotated[
    bool, typer.Option("--dead-letter", help="Move dead letters back into the stream.")
]
MinIdle = Annotated[
    int | None,
    typer.Option(
        "--min-idle",
        help="--pending: entries idle at least this many ms (default "
        "CLAIM_MIN_IDLE_MS, which leaves live workers' entries alone; 0 takes everything).",
    ),
]
Limit = Annotated[int | None, typer.Option("--limit", min=1, help="At most this many entries.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Only show what would be done.")]
RequestId = Annotated[
    str | None,
    typer.Option("--request-id", help="--dead-letter: only dead letters of this request_id."),
]


@app.command()
def replay(
    pending: Pending = False,
    dead_letter: DeadLetter = False,
    min_idle: MinIdle = None,
    limit: Limit = None,
    dry_run: DryRun = False,
    request_id: RequestId = None,
    redis_url: RedisUrl = None,
    queue: Queue = None,
    output_dir: OutputDirOpt = None,
    group: Group = None,
    consumer: Consumer = None,
    log_level: LogLevel = None,
    log_format: LogFormat = None,
) -> None:
    """Recover stuck work: claim and process pending entries, or retry dead letters.

    --pending claims entries of any consumer (as CONSUMER_NAME-replay unless --consumer
    is given) and runs them through the same pipeline as `run`; exit 0 when every
    claimed entry was settled, 1 if some are still pending. --dead-letter moves dead
    letters back into the stream, where running workers retry them.

    Example: returner replay --pending --min-idle 0

    Example: returner replay --dead-letter --request-id req_001 --dry-run
    """
    if pending == dead_letter:
        raise fail("give exactly one of --pending or --dead-letter")
    settings = settings_from(
        redis_url=redis_url,
        hosting_tasks_queue=queue,
        output_dir=output_dir,
        consumer_group=group,
        log_level=log_level or "WARNING",
        log_format=log_format,
    )
    with redis_url_for(settings, embedded_ok=False) as url:
        try:
            if dead_letter:
                replay_dead(stream_for(settings, url), request_id, limit, dry_run)
                return
            idle = settings.claim_min_idle_ms if min_idle is None else min_idle
            stream = stream_for(settings, url, consumer or f"{settings.consumer_name}-replay")
            stream.ping()
            if dry_run:
                show_pending(stream, idle, limit)
            else:
                replay_pending(settings, stream, idle, limit)
        except SettingsError as exc:
            raise fail(f"bad setting {exc}") from None
        except ReturnerError as exc:
            raise fail(str(exc), 1) from None


def replay_pending(settings: Settings, stream: Stream, min_idle: int, limit: int | None) -> None:
    stop = threading.Event()
    install_stop_handlers(stop)
    worker = Worker(settings, stream, Metrics(), stop)
    total = limit or stream.observe().pending
    with progress_bar(total, "replaying") as advance:
        try:
            claimed = worker.replay_pending(min_idle, limit, advance)
        finally:
            worker.close()
    stream.forget(stream.consumer)  # a replay consumer holding nothing leaves no trace
    t = worker.tally
    left = claimed - t.settled
    typer.echo(
        f"claimed {claimed}: completed {t.completed}, duplicate {t.duplicate}, "
        f"failed {t.failed}, dead-lettered {t.dead_lettered}, still pending {left}"
    )
    if left:
        raise typer.Exit(1)


def show_pending(stream: Stream, min_idle: int, limit: int | None) -> None:
    rows = stream.pending_idle(min_idle, limit or 10_000)
    for row in rows:
        typer.echo(
            f"{row['id']}  consumer {row['consumer']}  idle {row['idle_ms']} ms  "
            f"deliveries {row['deliveries']}"
        )
    typer.echo(f"would claim {len(rows)} entries idle for {min_idle} ms or more")


def replay_dead(stream: Stream, request_id: str | None, limit: int | None, dry_run: bool) -> None:
    wanted = request_id.encode() if request_id is not None else None
    moved, after = 0, "-"
    with translated("replaying dead letters"):
        while (limit is None or moved < limit) and (letters := stream.dead_letters(100, after)):
            for dead_id, fields in letters:
                after = dead_id
                if wanted is not None and fields.get(b"request_id") != wanted:
                    continue
                if limit is not None and moved >= limit:
                    break
                if dry_run:
                    error = fields.get(b"error", b"").decode("utf-8", "replace")
                    typer.echo(f"{dead_id}  {error}")
                    moved += 1
                elif stream.revive(dead_id):
                    moved += 1
    verb = "would move" if dry_run else "moved"
    typer.echo(f"{verb} {moved} dead letters back into {stream.keys.stream}")


@contextlib.contextmanager
def progress_bar(
    total: int, what: str, done_word: str = "claimed"
) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on a terminal, plain lines otherwise; yields `advance(done)`."""
    if not sys.stderr.isatty():
        yield lambda done: typer.echo(f"{what}: {done} {done_word}", err=True)
        return
    with Progress(*Progress.get_default_columns(), console=Console(stderr=True)) as bar:
        task = bar.add_task(what, total=max(total, 1))
        yield lambda done: bar.update(task, completed=done)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
    redis_url: RedisUrl = None,
    queue: Queue = None,
    output_dir: OutputDirOpt = None,
    group: Group = None,
) -> None:
    """Show the list and stream lengths, pending entries per consumer with the oldest
    idle time, dead letters with the last errors, and the records in the store.

    Example: returner status --json
    """
    settings = settings_from(
        redis_url=redis_url,
        hosting_tasks_queue=queue,
        output_dir=output_dir,
        consumer_group=group,
        log_level="WARNING",
    )
    with redis_url_for(settings, embedded_ok=False) as url:
        try:
            report = stream_for(settings, url).status(settings.consumer_timeout_ms)
        except ReturnerError as exc:
            raise fail(str(exc), 1) from None
    report["results"] = count_results(settings.output_dir)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        show_status(report)


def show_status(report: dict[str, Any]) -> None:
    console = Console(highlight=False)
    oldest = report["oldest_pending_s"]
    console.print(f"list [bold]{report['queue']}[/]: {report['list_length']} waiting")
    console.print(
        f"stream: {report['stream_length']} entries, {report['pending']} pending"
        + (f", oldest {oldest:.1f}s" if oldest is not None else "")
    )
    table = Table("consumer", "pending", "oldest pending", "idle", "", box=None)
    for c in report["consumers"]:
        age = c["oldest_pending_ms"]
        table.add_row(
            Text(escape_controls(c["name"])),
            str(c["pending"]),
            "-" if age is None else f"{age / 1000:.1f}s",
            f"{c['idle_ms'] / 1000:.1f}s",
            ("gone: entries to be taken over" if c["pending"] else "gone: to be removed")
            if c["gone"]
            else "",
        )
    console.print(table)
    console.print(f"dead letters: {report['dead_letters']}")
    for e in report["last_errors"]:
        ids = f"{brief(e['request_id'])}/{brief(e['image_id'])}"
        line = f"  {e['id']}  {ids}: {brief(e['error'], 200)}"
        console.print(escape_controls(line), markup=False)
    records = report["results"]["records"]
    console.print(f"results: {'no store yet' if records is None else f'{records} records'}")


def count_results(output_dir: Path) -> dict[str, int | None]:
    """Records in the store of OUTPUT_DIR; None when there is no store yet."""
    try:
        with contextlib.closing(Store(output_dir, create=False)) as store:
            return {"records": store.counts()["total"]}
    except ReturnerError:
        return {"records": None}


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
                names = push_demo(url, settings, count)
        except ReturnerError as exc:
            raise fail(str(exc), 1) from None
    typer.echo(f"pushed {len(names)} frames onto {settings.hosting_tasks_queue}")


results_app = typer.Typer(
    no_args_is_help=True, help="Read the results store: one task's records, or an export."
)
app.add_typer(results_app, name="results")


@contextlib.contextmanager
def open_store(output_dir: Path | None) -> Iterator[Store]:
    settings = settings_from(output_dir=output_dir, log_level="WARNING")
    try:
        store = Store(settings.output_dir, create=False)
    except ReturnerError:
        raise fail(f"no results store in {settings.output_dir} (OUTPUT_DIR)", 1) from None
    try:
        yield store
    except ReturnerError as exc:
        raise fail(str(exc), 1) from None
    finally:
        store.close()


@results_app.command("get")
def results_get(
    request_id: Annotated[str, typer.Argument(help="The task's request_id.")],
    image_id: Annotated[str | None, typer.Argument(help="Only this image of it.")] = None,
    output_dir: OutputDirOpt = None,
) -> None:
    """Print a request's records (or one image's) as a JSON array; exit 1 if none.

    Example: returner results get req_001 image_001
    """
    with open_store(output_dir) as store:
        records = store.get(request_id, image_id)
    typer.echo(json.dumps(records, indent=2, ensure_ascii=False))
    if not records:
        raise typer.Exit(1)


def iso_bound(value: str | None, name: str) -> str | None:
    """An ISO-8601 time as the store writes it (UTC); no offset means UTC."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise fail(f"{name}: not an ISO-8601 time (got {value!r})") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


@results_app.command("export")
def results_export(
    since: Annotated[str | None, typer.Option(help="From this ISO-8601 time on.")] = None,
    until: Annotated[str | None, typer.Option(help="Before this ISO-8601 time.")] = None,
    request_id: Annotated[str | None, typer.Option(help="Only this request_id.")] = None,
    status: Annotated[str | None, typer.Option(help="Only completed or failed records.")] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="json (one array) or jsonl (an object a line).")
    ] = "json",
    output_dir: OutputDirOpt = None,
) -> None:
    """Write records to standard output, oldest first, streaming (constant memory).

    Example: returner results export --since 2026-11-30 --format jsonl
    """
    if fmt not in ("json", "jsonl"):
        raise fail(f"--format: json or jsonl (got {fmt!r})")
    if status not in (None, "completed", "failed"):
        raise fail(f"--status: completed or failed (got {status!r})")
    bounds = iso_bound(since, "--since"), iso_bound(until, "--until")
    with open_store(output_dir) as store:
        records = store.export(*bounds, request_id=request_id, status=status)
        write_records(records, fmt == "jsonl")


def write_records(records: Iterator[dict[str, Any]], lines: bool) -> None:
    out = sys.stdout
    first = True
    if not lines:
        out.write("[")
    for record in records:
        text = json.dumps(record, ensure_ascii=False)
        out.write(text + "\n" if lines else ("\n" if first else ",\n") + text)
        first = False
    if not lines:
        out.write("]\n" if first else "\n]\n")
    out.flush()


EVENT_COLUMNS = ("timestamp", "request_id", "image_id", "outcome", "file_path", "error")
FOLLOW_BLOCK_MS = 1000  # a follower wakes this often to notice Ctrl-C or a deadline


@app.command()
def events(
    request_id: Annotated[
        str | None, typer.Option("--request-id", help="Only events of this request_id.")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Then print new ones.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
    count: Annotated[int, typer.Option("--count", min=1, help="The latest this many.")] = 100,
    redis_url: RedisUrl = None,
    queue: Queue = None,
) -> None:
    """Print the latest events (one per settled delivery), and with --follow new ones.

    Example: returner events --request-id req_001 --follow --json
    """
    settings = settings_from(redis_url=redis_url, hosting_tasks_queue=queue, log_level="WARNING")
    show = print_event_json if as_json else event_printer()
    stop = threading.Event()
    install_stop_handlers(stop)
    with redis_url_for(settings, embedded_ok=False) as url:
        stream = stream_for(settings, url)
        try:
            last = show_latest(stream, request_id, count, show)
            while follow and not stop.is_set():
                for event in stream.read_events(last, block_ms=FOLLOW_BLOCK_MS):
                    last = event.id
                    if request_id is None or event["request_id"] == request_id:
                        show([event])
        except ReturnerError as exc:
            raise fail(str(exc), 1) from None


def show_latest(
    stream: Stream, request_id: str | None, count: int, show: Callable[[list[Event]], None]
) -> str:
    """Print the latest `count` (matching) events; the ID to follow from."""
    if request_id is None:
        latest = stream.last_events(count)
        show(latest)
        return latest[-1].id if latest else "$"
    kept: deque[Event] = deque(maxlen=count)
    last = read_history(
        stream, lambda batch: kept.extend(e for e in batch if e["request_id"] == request_id)
    )
    show(list(kept))
    return last if last != "0-0" else "$"


def read_history(stream: Stream, take: Callable[[list[Event]], None]) -> str:
    """Hand every event in the stream to `take`, oldest first, a batch at a time; the
    ID of the last one ("0-0" when there is none)."""
    last = "0-0"
    while batch := stream.read_events(last):
        last = batch[-1].id
        take(batch)
    return last


def print_event_json(batch: list[Event]) -> None:
    for event in batch:
        typer.echo(json.dumps({"id": event.id, **event.fields}, ensure_ascii=False))


def event_printer() -> Callable[[list[Event]], None]:
    console = Console(highlight=False)
    header = [True]

    def show(batch: list[Event]) -> None:
        if not batch:
            return
        table = Table(*EVENT_COLUMNS, box=None, show_header=header[0])
        for event in batch:
            table.add_row(*(Text(escape_controls(event[c]) or "-") for c in EVENT_COLUMNS))
        console.print(table)
        header[0] = False

    return show


@app.command()
def wait(
    request_id: Annotated[str, typer.Argument(help="The request_id.")],
    image_ids: Annotated[list[str], typer.Argument(help="The image_ids to wait for.")],
    timeout: Annotated[
        float | None, typer.Option("--timeout", min=0, help="Give up after S seconds: exit 124.")
    ] = None,
    redis_url: RedisUrl = None,
    queue: Queue = None,
) -> None:
    """Wait until every named image is completed: exit 0; 1 once one failed; 124 on timeout.

    Events already in the stream count, so it never misses one that came before it.

    Example: returner wait req_001 image_001 image_002 --timeout 30
    """
    settings = settings_from(redis_url=redis_url, hosting_tasks_queue=queue, log_level="WARNING")
    deadline = None if timeout is None else time.monotonic() + timeout
    waiting = Waiting(request_id, set(image_ids))
    with redis_url_for(settings, embedded_ok=False) as url:
        stream = stream_for(settings, url)
        try:
            last = read_history(stream, waiting.take)  # what came before: the latest decides
            while waiting.failed is None and waiting.left:
                left_s = None if deadline is None else deadline - time.monotonic()
                if left_s is not None and left_s <= 0:
                    missing = " ".join(sorted(waiting.left))
                    raise fail(f"timed out waiting for {request_id}: {missing}", 124)
                block = FOLLOW_BLOCK_MS if left_s is None else min(FOLLOW_BLOCK_MS, left_s * 1000)
                for event in stream.read_events(last, block_ms=max(1, int(block))):
                    last = event.id
                    waiting.take([event])
                    if waiting.failed is not None:
                        break
        except ReturnerError as exc:
            raise fail(str(exc), 1) from None
    if waiting.failed is not None:
        failed = waiting.failed
        raise fail(f"{request_id}/{failed['image_id']} failed: {failed['error']}", 1)


class Waiting:
    """The images of one request still to complete, from the events seen so far."""

    def __init__(self, request_id: str, image_ids: set[str]) -> None:
        self.request_id = request_id
        self.wanted = frozenset(image_ids)
        self.left = set(image_ids)
        self.done: dict[str, str] = {}
        self.failed: Event | None = None

    def take(self, batch: list[Event]) -> None:
        for event in batch:
            image_id = event["image_id"]
            if event["request_id"] != self.request_id or image_id not in self.wanted:
                continue
            if event["status"] == "completed":
                self.left.discard(image_id)
                if image_id not in self.done:
                    typer.echo(f"{image_id} completed {event['file_path']}")
                self.done[image_id] = event["file_path"]
                if self.failed is not None and self.failed["image_id"] == image_id:
                    self.failed = None  # a replay completed what had failed
            else:
                self.failed = event


PUSH_AT_ONCE = 16  # frames per RPUSH: /dev/shm holds at most this many in flight


@app.command("push")
def push_cmd(
    files: Annotated[list[Path], typer.Argument(help="JPEG files, each one frame.")],
    request_id: Annotated[str, typer.Option("--request-id", help="request_id of every task.")],
    image_id: Annotated[
        str | None,
        typer.Option("--image-id", help="image_id (one file only; default: the file's stem)."),
    ] = None,
    redis_url: RedisUrl = None,
    queue: Queue = None,
) -> None:
    """Decode JPEG files into shared memory and push their tasks, as a renderer would.

    A file that cannot be decoded is reported and skipped; exit 1 if any was.

    Example: returner push pages/*.jpg --request-id req_smoke
    """
    if image_id is not None and len(files) != 1:
        raise fail("--image-id goes with exactly one file")
    settings = settings_from(redis_url=redis_url, hosting_tasks_queue=queue, log_level="WARNING")
    skipped = 0
    with redis_url_for(settings, embedded_ok=False) as url:
        producer = Producer(
            url,
            settings.hosting_tasks_queue,
            settings.redis_wait_replicas,
            settings.redis_wait_timeout_ms,
            settings.redis_cluster,
        )
        with progress_bar(len(files), "pushing", "pushed") as advance:
            for start in range(0, len(files), PUSH_AT_ONCE):
                chunk = files[start : start + PUSH_AT_ONCE]
                items = [
                    (frame, request_id, image_id or path.stem) for path, frame in decoded(chunk)
                ]
                skipped += len(chunk) - len(items)
                try:
                    producer.publish_many(items)
                except ReturnerError as exc:
                    raise fail(str(exc), 1) from None
                advance(start + len(chunk))
    typer.echo(f"pushed {len(files) - skipped} frames onto {settings.hosting_tasks_queue}")
    if skipped:
        raise typer.Exit(1)


def decoded(paths: list[Path]) -> Iterator[tuple[Path, Any]]:
    """(path, RGB frame) of each file that decodes as a JPEG; the others are reported."""
    for path in paths:
        try:
            frame = simplejpeg.decode_jpeg(path.read_bytes(), colorspace="RGB")
        except (OSError, ValueError) as exc:
            typer.echo(f"returner: skipping {path}: not a readable JPEG ({exc})", err=True)
            continue
        yield path, frame


@app.command()
def console(
    redis_url: RedisUrl = None,
    queue: Queue = None,
    output_dir: OutputDirOpt = None,
    group: Group = None,
    log_level: LogLevel = None,
    log_format: LogFormat = None,
) -> None:
    """Serve the operator console: the queue, results with thumbnails, dead letters
    and replay, in a browser, on CONSOLE_HOST:CONSOLE_PORT (127.0.0.1:9110).

    Any address but loopback needs CONSOLE_TOKEN. Needs `pip install 'returner[console]'`.

    Example: CONSOLE_TOKEN=$(openssl rand -hex 16) returner console
    """
    settings = settings_from(
        redis_url=redis_url,
        hosting_tasks_queue=queue,
        output_dir=output_dir,
        consumer_group=group,
        log_level=log_level,
        log_format=log_format,
    )
    try:
        from returner.console import serve as serve_console
    except ImportError as exc:  # the extra is not installed
        if (exc.name or "").startswith("returner"):
            raise
        missing = f"pip install 'returner[console]' ({exc})"
        raise fail(f"the console needs its extra: {missing}") from None
    try:
        serve_console(settings)
    except SettingsError as exc:
        raise fail(f"bad setting {exc}") from None


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app(prog_name="returner")
