"""`returner push` and `returner demo`: acting as a renderer, through returner.producer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from returner import demo
from returner.cli import common
from returner.cli.common import connected, fail, progress_bar
from returner.encode import decode
from returner.frames import Frame
from returner.producer import Producer
from returner.settings import Settings

PUSH_AT_ONCE = 16  # frames per RPUSH: /dev/shm holds at most this many in flight


def push_samples(settings: Settings, url: str, count: int) -> int:
    """Push `count` sample frames onto the queue; how many were pushed."""
    producer = Producer(url, settings.hosting_tasks_queue, cluster=settings.redis_cluster)
    return len(demo.push_demo(producer, count))


def demo_cmd(
    ctx: typer.Context,
    count: Annotated[int, typer.Option("--count", min=1, help="How many frames.")] = 10,
    redis_url: common.RedisUrl = None,
    hosting_tasks_queue: common.Queue = None,
) -> None:
    """Act as a renderer: put sample frames in shared memory and push their tasks.

    Example: REDIS_URL=redis://127.0.0.1:6390/0 returner demo --count 20
    """
    with connected(ctx) as (settings, url):
        pushed = push_samples(settings, url, count)
    typer.echo(f"pushed {pushed} frames onto {settings.hosting_tasks_queue}")


def push(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="JPEG files, each one frame.")],
    request_id: Annotated[str, typer.Option("--request-id", help="request_id of every task.")],
    image_id: Annotated[
        str | None,
        typer.Option("--image-id", help="image_id (one file only; default: the file's stem)."),
    ] = None,
    redis_url: common.RedisUrl = None,
    hosting_tasks_queue: common.Queue = None,
) -> None:
    """Decode JPEG files into shared memory and push their tasks, as a renderer would.

    A file that cannot be decoded is reported and skipped; exit 1 if any was.

    Example: returner push pages/*.jpg --request-id req_smoke
    """
    if image_id is not None and len(files) != 1:
        raise fail("--image-id goes with exactly one file")
    skipped = 0
    with connected(ctx, log_level="WARNING") as (settings, url):
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
                producer.publish_many(items)
                advance(start + len(chunk))
    typer.echo(f"pushed {len(files) - skipped} frames onto {settings.hosting_tasks_queue}")
    if skipped:
        raise typer.Exit(1)


def decoded(paths: list[Path]) -> Iterator[tuple[Path, Frame]]:
    """(path, RGB frame) of each file that decodes as a JPEG; the others are reported."""
    for path in paths:
        try:
            frame = decode(path.read_bytes())
        except (OSError, ValueError) as exc:
            typer.echo(f"returner: skipping {path}: not a readable JPEG ({exc})", err=True)
            continue
        yield path, frame
