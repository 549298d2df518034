"""`returner replay`: claim and settle pending entries, or retry dead letters."""

from __future__ import annotations

import threading
from typing import Annotated

import typer

from returner.cli import common
from returner.cli.common import connected, fail, install_stop_handlers, progress_bar
from returner.metrics import Metrics
from returner.settings import Settings
from returner.stream import Consumer, Stream
from returner.worker import Worker

Pending = Annotated[bool, typer.Option("--pending", help="Claim and process pending entries.")]
DeadLetterOpt = Annotated[
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


def replay(
    ctx: typer.Context,
    pending: Pending = False,
    dead_letter: DeadLetterOpt = False,
    min_idle: MinIdle = None,
    limit: Limit = None,
    dry_run: DryRun = False,
    request_id: RequestId = None,
    redis_url: common.RedisUrl = None,
    hosting_tasks_queue: common.Queue = None,
    output_dir: common.OutputDirOpt = None,
    consumer_group: common.Group = None,
    consumer: common.ConsumerOpt = None,
    log_level: common.LogLevel = None,
    log_format: common.LogFormat = None,
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
    with connected(ctx, log_level="WARNING") as (settings, url):
        if dead_letter:
            replay_dead(Stream.from_settings(settings, url), request_id, limit, dry_run)
            return
        idle = settings.claim_min_idle_ms if min_idle is None else min_idle
        name = consumer or f"{settings.consumer_name}-replay"
        replayer = Consumer.from_settings(settings, url, name)
        replayer.stream.ping()
        if dry_run:
            show_pending(replayer.stream, idle, limit)
        else:
            replay_pending(settings, replayer, idle, limit)


def replay_pending(
    settings: Settings, consumer: Consumer, min_idle: int, limit: int | None
) -> None:
    stop = threading.Event()
    install_stop_handlers(stop)
    total = limit or consumer.stream.observe().pending
    worker = Worker(settings, consumer, Metrics(), stop)
    with progress_bar(total, "replaying") as advance:
        claimed = worker.replay_pending(min_idle, limit, advance)
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
            f"{row.id}  consumer {row.consumer}  idle {row.idle_ms} ms  deliveries {row.deliveries}"
        )
    typer.echo(f"would claim {len(rows)} entries idle for {min_idle} ms or more")


def replay_dead(stream: Stream, request_id: str | None, limit: int | None, dry_run: bool) -> None:
    moved = 0
    for letter in stream.each_dead_letter(request_id, limit):
        if dry_run:
            typer.echo(f"{letter.id}  {letter.error or ''}")
        elif not stream.revive(letter.id):
            continue  # replayed by someone else meanwhile
        moved += 1
    verb = "would move" if dry_run else "moved"
    typer.echo(f"{verb} {moved} dead letters back into {stream.keys.stream}")
