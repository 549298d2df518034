"""The command line: one module per command group, registered here.

`common` declares the options the commands share, builds the settings once from them,
and turns the service's errors into exit codes (a bad setting: 2, any other: 1).
Commands call the service's own API; rendering is theirs.
"""

from __future__ import annotations

import typer

from returner import __version__
from returner.cli import console, events, push, replay, results, run, status
from returner.cli.common import App

app = App(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    help="Save rendered frames from shared memory as JPEG, driven by Redis.",
)
app.command()(run.run)
app.command()(replay.replay)
app.command()(status.status)
app.command("demo")(push.demo_cmd)
app.add_typer(results.app, name="results")
app.command()(events.events)
app.command()(events.wait)
app.command("push")(push.push)
app.command()(console.console)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app(prog_name="returner")
