"""`returner events` and `returner wait`: the event stream for people and scripts."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from returner import events as reading
from returner.cli import common
from returner.cli.common import connected, fail, install_stop_handlers
from returner.logs import escape_controls
from returner.stream import Event, Stream

COLUMNS = ("timestamp", "request_id", "image_id", "outcome", "file_path", "error")


def events(
    ctx: typer.Context,
    request_id: Annotated[
        str | None, typer.Option("--request-id", help="Only events of this request_id.")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Then print new ones.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
    count: Annotated[int, typer.Option("--count", min=1, help="The latest this many.")] = 100,
    redis_url: common.RedisUrl = None,
    hosting_tasks_queue: common.Queue = None,
) -> None:
    """Print the latest events (one per settled delivery), and with --follow new ones.

    Example: returner events --request-id req_001 --follow --json
    """
    show = print_json if as_json else printer()
    stop = threading.Event()
    install_stop_handlers(stop)
    with connected(ctx, log_level="WARNING") as (settings, url):
        stream = Stream.from_settings(settings, url)
        latest, last = reading.latest(stream, request_id, count)
        show(latest)
        if follow:
            for event in reading.follow(stream, last, stop, request_id):
                show([event])


def print_json(batch: list[Event]) -> None:
    for event in batch:
        typer.echo(json.dumps({"id": event.id, **event.fields}, ensure_ascii=False))


def printer() -> Callable[[list[Event]], None]:
    """Prints batches of events as one table, its header over the first batch only."""
    console = Console(highlight=False)
    header = [True]

    def show(batch: list[Event]) -> None:
        if not batch:
            return
        table = Table(*COLUMNS, box=None, show_header=header[0])
        for event in batch:
            table.add_row(*(Text(escape_controls(event[c]) or "-") for c in COLUMNS))
        console.print(table)
        header[0] = False

    return show


def wait(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(help="The request_id.")],
    image_ids: Annotated[list[str], typer.Argument(help="The image_ids to wait for.")],
    timeout: Annotated[
        float | None, typer.Option("--timeout", min=0, help="Give up after S seconds: exit 124.")
    ] = None,
    redis_url: common.RedisUrl = None,
    hosting_tasks_queue: common.Queue = None,
) -> None:
    """Wait until every named image is completed: exit 0; 1 once one failed; 124 on timeout.

    Events already in the stream count, so it never misses one that came before it.

    Example: returner wait req_001 image_001 image_002 --timeout 30
    """
    waiting = reading.Waiting(request_id, frozenset(image_ids))

    def completed(event: Event) -> None:
        typer.echo(f"{event['image_id']} completed {event['file_path']}")

    with connected(ctx, log_level="WARNING") as (settings, url):
        stream = Stream.from_settings(settings, url)
        if not reading.wait(stream, waiting, timeout, completed):
            missing = " ".join(sorted(waiting.left))
            raise fail(f"timed out waiting for {request_id}: {missing}", 124)
    if waiting.failed is not None:
        failed = waiting.failed
        raise fail(f"{request_id}/{failed['image_id']} failed: {failed['error']}", 1)
