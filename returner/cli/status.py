"""`returner status`: the queue, the consumers, the dead letters and the store at a glance."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from returner.cli import common
from returner.cli.common import connected
from returner.errors import SettingsError, TransientError
from returner.logs import escape_controls
from returner.objectstore import ObjectStore
from returner.settings import Settings, object_store_config
from returner.store import records_in
from returner.stream import Status, Stream
from returner.task import brief


def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
    redis_url: common.RedisUrl = None,
    hosting_tasks_queue: common.Queue = None,
    output_dir: common.OutputDirOpt = None,
    consumer_group: common.Group = None,
) -> None:
    """Show the list and stream lengths, pending entries per consumer with the oldest
    idle time, dead letters with the last errors, the records in the store, and the
    object store (OBJECT_STORE_URL) and whether it answers.

    Example: returner status --json
    """
    with connected(ctx, log_level="WARNING") as (settings, url):
        found = Stream.from_settings(settings, url).status(settings.consumer_timeout_ms)
    records = records_in(settings.output_dir)
    store = object_store(settings)
    if as_json:
        doc = as_document(found, records)
        if store is not None:
            doc["object_store"] = store
        typer.echo(json.dumps(doc, indent=2))
    else:
        show(found, records)
        if store is not None:
            state = "reachable" if store["reachable"] else f"failing: {store['error']}"
            line = f"object store: {store['url']} at {store['endpoint']}: {state}"
            Console(highlight=False).print(escape_controls(line), markup=False)


def object_store(settings: Settings) -> dict[str, Any] | None:
    """OBJECT_STORE_URL, its endpoint, and whether it answers the start-up check (never a
    credential); None when JPEGs go to OUTPUT_DIR."""
    config = object_store_config(settings)
    if config is None:
        return None
    try:
        store = ObjectStore(config)
    except SettingsError as exc:
        return {"url": config.url, "endpoint": None, "reachable": False, "error": str(exc)}
    try:
        store.check()
        error = None
    except (SettingsError, TransientError) as exc:
        error = str(exc)
    finally:
        store.close()
    reachable = error is None
    return {
        "url": config.url,
        "endpoint": store.endpoint_url,
        "reachable": reachable,
        "error": error,
    }


def as_document(status: Status, records: int | None) -> dict[str, Any]:
    """The status as `status --json` prints it."""
    doc = dataclasses.asdict(status)
    shown = ("id", "request_id", "image_id", "error", "deliveries")
    doc["last_errors"] = [{k: getattr(e, k) for k in shown} for e in status.last_errors]
    return {**doc, "results": {"records": records}}


def show(status: Status, records: int | None) -> None:
    console = Console(highlight=False)
    oldest = status.oldest_pending_s
    console.print(f"list [bold]{status.queue}[/]: {status.list_length} waiting")
    console.print(
        f"stream: {status.stream_length} entries, {status.pending} pending"
        + (f", oldest {oldest:.1f}s" if oldest is not None else "")
    )
    table = Table("consumer", "pending", "oldest pending", "idle", "", box=None)
    for c in status.consumers:
        age = c.oldest_pending_ms
        table.add_row(
            Text(escape_controls(c.name)),
            str(c.pending),
            "-" if age is None else f"{age / 1000:.1f}s",
            f"{c.idle_ms / 1000:.1f}s",
            ("gone: entries to be taken over" if c.pending else "gone: to be removed")
            if c.gone
            else "",
        )
    console.print(table)
    console.print(f"dead letters: {status.dead_letters}")
    for e in status.last_errors:
        ids = f"{brief(e.request_id)}/{brief(e.image_id)}"
        line = f"  {e.id}  {ids}: {brief(e.error, 200)}"
        console.print(escape_controls(line), markup=False)
    console.print(f"results: {'no store yet' if records is None else f'{records} records'}")
