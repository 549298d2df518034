"""What every command shares: its options, declared once; the settings, built once
from them; Redis; the one place where errors become exit codes; and small helpers for
output on a terminal."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress

from returner import logs
from returner.embedded import EmbeddedRedis
from returner.errors import ReturnerError, SettingsError
from returner.settings import Settings, load_settings


class App(typer.Typer):
    """A Typer app whose commands may raise ReturnerError: a bad setting exits 2 with
    one line naming it, any other ReturnerError exits 1 with one line."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except SettingsError as exc:
            typer.echo(f"returner: bad setting {exc}", err=True)
            raise SystemExit(2) from None
        except ReturnerError as exc:
            typer.echo(f"returner: {exc}", err=True)
            raise SystemExit(1) from None


def fail(message: str, code: int = 2) -> typer.Exit:
    """An exit with `message` on standard error (2: the command was used wrongly)."""
    typer.echo(f"returner: {message}", err=True)
    return typer.Exit(code)


# Options shared by several commands. Each parameter is named after the setting it
# sets, so that `settings_of` finds it in the command's parameters.
RedisUrl = Annotated[
    str | None,
    typer.Option("--redis-url", help="REDIS_URL; unset: an embedded local Redis (run only)."),
]
Queue = Annotated[str | None, typer.Option("--queue", help="HOSTING_TASKS_QUEUE.")]
OutputDirOpt = Annotated[Path | None, typer.Option("--output-dir", help="OUTPUT_DIR.")]
Group = Annotated[str | None, typer.Option("--group", help="CONSUMER_GROUP.")]
ConsumerOpt = Annotated[str | None, typer.Option("--consumer", help="CONSUMER_NAME.")]
LogLevel = Annotated[str | None, typer.Option("--log-level", help="LOG_LEVEL.")]
LogFormat = Annotated[str | None, typer.Option("--log-format", help="LOG_FORMAT: text or json.")]


def settings_of(ctx: typer.Context, **defaults: Any) -> Settings:
    """The settings: environment, `.env`, then the command's options named after
    settings (which win; `defaults` apply where an option is not given). Sets up
    logging. Raises SettingsError."""
    given = {k: v for k, v in ctx.params.items() if k in Settings.model_fields and v is not None}
    settings = load_settings(**{**defaults, **given})
    logs.setup(settings.log_level, settings.log_format)
    return settings


@contextlib.contextmanager
def redis_url_for(settings: Settings, embedded_ok: bool = False) -> Iterator[str]:
    """REDIS_URL, or with `embedded_ok` the URL of an embedded server that lives as long
    as this block."""
    if settings.redis_url:
        yield settings.redis_url
        return
    if not embedded_ok:
        raise fail("REDIS_URL is not set (use the URL that `returner run` prints)")
    server = EmbeddedRedis(Path(".returner") / "redis")
    url = server.start()
    typer.echo(f"embedded Redis at {url}  (other local processes: REDIS_URL={url})", err=True)
    try:
        yield url
    finally:
        server.stop()


@contextlib.contextmanager
def connected(ctx: typer.Context, **defaults: Any) -> Iterator[tuple[Settings, str]]:
    """The settings (as `settings_of`) and REDIS_URL, for a command that needs Redis."""
    settings = settings_of(ctx, **defaults)
    with redis_url_for(settings) as url:
        yield settings, url


def install_stop_handlers(
    stop: threading.Event, on_second: Callable[[], None] = lambda: None
) -> None:
    """SIGTERM and SIGINT set `stop`; a second one calls `on_second` and leaves now."""

    # The handler only sets the event: it runs between any two bytecodes of the main
    # thread, even inside a log write, so it must not log or do any other I/O itself.
    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second signal: leave now; every entry is still safe in Redis
            on_second()
            os._exit(128 + signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


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
