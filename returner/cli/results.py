"""`returner results get|export`: reading the results store."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from returner.cli import common
from returner.cli.common import fail, settings_of
from returner.errors import DiskError
from returner.store import Store, timestamp

app = typer.Typer(
    no_args_is_help=True, help="Read the results store: one task's records, or an export."
)


@contextlib.contextmanager
def open_store(ctx: typer.Context) -> Iterator[Store]:
    """The store of OUTPUT_DIR, read-only; exit 1 when there is none."""
    settings = settings_of(ctx, log_level="WARNING")
    try:
        store = Store(settings.output_dir, create=False)
    except DiskError:
        raise fail(f"no results store in {settings.output_dir} (OUTPUT_DIR)", 1) from None
    with contextlib.closing(store):
        yield store


@app.command("get")
def get(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(help="The task's request_id.")],
    image_id: Annotated[str | None, typer.Argument(help="Only this image of it.")] = None,
    output_dir: common.OutputDirOpt = None,
) -> None:
    """Print a request's records (or one image's) as a JSON array; exit 1 if none.

    Example: returner results get req_001 image_001
    """
    with open_store(ctx) as store:
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
    return timestamp(moment if moment.tzinfo else moment.replace(tzinfo=UTC))


@app.command("export")
def export(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option(help="From this ISO-8601 time on.")] = None,
    until: Annotated[str | None, typer.Option(help="Before this ISO-8601 time.")] = None,
    request_id: Annotated[str | None, typer.Option(help="Only this request_id.")] = None,
    status: Annotated[str | None, typer.Option(help="Only completed or failed records.")] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="json (one array) or jsonl (an object a line).")
    ] = "json",
    output_dir: common.OutputDirOpt = None,
) -> None:
    """Write records to standard output, oldest first, streaming (constant memory).

    Example: returner results export --since 2026-11-30 --format jsonl
    """
    if fmt not in ("json", "jsonl"):
        raise fail(f"--format: json or jsonl (got {fmt!r})")
    if status not in (None, "completed", "failed"):
        raise fail(f"--status: completed or failed (got {status!r})")
    bounds = iso_bound(since, "--since"), iso_bound(until, "--until")
    with open_store(ctx) as store:
        write_records(store.export(*bounds, request_id=request_id, status=status), fmt == "jsonl")


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
