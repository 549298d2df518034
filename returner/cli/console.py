"""`returner console`: the operator console, served from this process."""

from __future__ import annotations

import typer

from returner.cli import common
from returner.cli.common import fail, settings_of


def console(
    ctx: typer.Context,
    redis_url: common.RedisUrl = None,
    hosting_tasks_queue: common.Queue = None,
    output_dir: common.OutputDirOpt = None,
    consumer_group: common.Group = None,
    log_level: common.LogLevel = None,
    log_format: common.LogFormat = None,
) -> None:
    """Serve the operator console: the queue, results with thumbnails, dead letters
    and replay, in a browser, on CONSOLE_HOST:CONSOLE_PORT (127.0.0.1:9110).

    Any address but loopback needs CONSOLE_TOKEN. Needs `pip install 'returner[console]'`.

    Example: CONSOLE_TOKEN=$(openssl rand -hex 16) returner console
    """
    settings = settings_of(ctx)
    try:
        from returner.console import serve
    except ImportError as exc:  # the extra is not installed
        if (exc.name or "").startswith("returner"):
            raise
        raise fail(
            f"the console needs its extra: pip install 'returner[console]' ({exc})"
        ) from None
    serve(settings)
