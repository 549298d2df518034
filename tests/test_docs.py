"""The documentation: the CLI reference matches the app, every `--help` reads cleanly in
80 columns, the site builds with `mkdocs build --strict`, and the settings and metrics
references name exactly what the service has."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import served_metrics

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@functools.cache
def gen_cli() -> ModuleType:
    """docs/gen_cli.py, the script that writes docs/reference/cli.md."""
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def helps() -> dict[str, str]:
    """`returner ... --help` of every command, as docs/reference/cli.md shows it."""
    gen = gen_cli()
    return {" ".join(("returner", *path)): gen.help_text(path) for path in gen.command_paths()}


def test_the_cli_reference_is_generated_from_the_app() -> None:
    gen = gen_cli()
    committed = gen.PAGE.read_text(encoding="utf-8")
    if committed != gen.render():
        pytest.fail(
            "docs/reference/cli.md differs from the CLI's help: regenerate it with "
            f"`{gen.REGENERATE}` and commit it"
        )


def test_the_cli_reference_covers_every_command() -> None:
    names = set(helps())
    assert {"returner", "returner run", "returner replay", "returner status"} <= names
    assert {"returner results", "returner results get", "returner results export"} <= names
    assert {"returner events", "returner wait", "returner push", "returner demo"} <= names


def test_every_help_fits_in_80_columns() -> None:
    too_wide = [
        f"{command}: {line!r} ({len(line)} columns)"
        for command, text in helps().items()
        for line in text.splitlines()
        if len(line) > gen_cli().WIDTH
    ]
    assert not too_wide, "\n".join(too_wide)


def ragged_breaks(text: str, width: int = 80) -> list[str]:
    """Lines of a help that end early: the next line's first word would have fit, so the
    break is a hard line break of the docstring, not the terminal's wrapping.

    Checks the description (rich pads it by one column each side) and the last column of
    the option and command panels (`│ ... │`), where wrapped help continues under itself.
    Typer's markers ([default: ...], [required]) start a line of their own by design.
    """
    found: list[str] = []
    lines = text.splitlines()
    for above, line in itertools.pairwise(lines):
        if line.startswith("│") and above.startswith("│"):
            inner, prev = line[1:-1], above[1:-1]
            start = len(inner) - len(inner.lstrip())
            segment = prev[start:].rstrip()
            if start < 2 or not inner.strip() or not segment or prev[start - 1] != " ":
                continue
            if "  " in segment:
                continue  # the row above has another column there: not a continuation
            words, room = inner.split(), len(inner) - 1 - start
        elif line.startswith(" ") and above.startswith(" ") and above.strip() and line.strip():
            segment, words, room = above.strip(), line.split(), width - 2
        else:
            continue
        if words[0].startswith("["):
            continue  # typer's own [default: ...] and [required] go on a line of their own
        if len(segment) + 1 + len(words[0]) <= room:
            found.append(f"{segment!r} is followed by {words[0]!r} on the next line")
    return found


def test_the_ragged_check_catches_a_hard_line_break() -> None:
    # `returner --help` before markdown mode: the docstring's own line break survived.
    ragged = (
        " Show the list and stream lengths, pending entries per consumer with the oldest\n"
        " idle time, dead letters with the last errors, and the records in the store.\n"
        " Show pending entries per consumer with the oldest\n"
        " idle time.\n"
    )
    assert ragged_breaks(ragged) == ["'Show pending entries per consumer with the oldest' is "
                                     "followed by 'idle' on the next line"]  # fmt: skip
    panel = (
        "│ --min-idle  <int>  --pending: entries idle at least this many ms (default    │\n"
        "│                    CLAIM_MIN_IDLE_MS). A sentence broken by hand              │\n"
        "│                    here.                                                      │\n"
    )
    assert ragged_breaks(panel) == ["'CLAIM_MIN_IDLE_MS). A sentence broken by hand' is "
                                    "followed by 'here.' on the next line"]  # fmt: skip


def test_no_help_has_a_ragged_line_break() -> None:
    found = [
        f"{command}: {problem}"
        for command, text in helps().items()
        for problem in ragged_breaks(text, gen_cli().WIDTH)
    ]
    assert not found, "\n".join(found)


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: a broken link, anchor or missing page fails."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's banner about MkDocs 2
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    warnings = [line for line in output.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert not warnings, "\n".join(warnings)
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").exists()
    assert (tmp_path / "site" / "repo" / "deploy" / "alerts.yml").exists()


# ---------------------------------------------------------------- settings reference


def table_names(page: Path, pattern: str) -> set[str]:
    """Names in the first column of the page's tables that match `pattern`."""
    names = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            names.update(re.findall(pattern, first))
    return names


def test_the_settings_reference_lists_every_setting() -> None:
    from returner.settings import Settings

    settings = {field.alias for field in Settings.model_fields.values()}
    documented = table_names(DOCS / "reference" / "settings.md", r"`([A-Z][A-Z0-9_]+)`")
    assert settings - documented == set(), "settings missing from docs/reference/settings.md"
    assert documented - settings == set(), "docs/reference/settings.md names unknown settings"


def test_the_settings_reference_names_the_options_of_run() -> None:
    import typer.main

    from returner.cli import app

    run = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    options = {
        opt
        for param in run.params
        if not getattr(param, "hidden", False)
        for opt in param.opts
        if opt.startswith("--") and opt not in ("--demo", "--help")
    }
    documented = set()
    for line in (DOCS / "reference" / "settings.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            documented.update(re.findall(r"`(--[a-z-]+)`", line.split("|")[2]))
    assert documented == options


# ---------------------------------------------------------------- metrics reference


@functools.cache
def exported() -> dict[str, set[str]]:
    """Each metric as documented (counters with _total, info with _info) and its labels,
    from the registries the service serves: a worker's, the metrics server's additions,
    and the supervisor's under `run --workers N`."""
    from prometheus_client.parser import text_string_to_metric_families

    texts = served_metrics()
    suffix = {"counter": "_total", "info": "_info"}
    metrics: dict[str, set[str]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created"):
                continue  # prometheus-client's creation times; the reference says so once
            labels = metrics.setdefault(family.name + suffix.get(family.type, ""), set())
            for sample in family.samples:
                labels.update(sample.labels.keys() - {"le"})
    return metrics


def test_the_metrics_reference_lists_every_metric_and_label() -> None:
    page = DOCS / "reference" / "metrics.md"
    documented = table_names(page, r"`(returner_[a-z_]+)")
    assert set(exported()) - documented == set(), "metrics missing from the reference"
    assert documented - set(exported()) == set(), "the reference names metrics not exported"
    text = page.read_text(encoding="utf-8")
    for name, labels in exported().items():
        for label in labels:
            assert re.search(rf"`{name}\{{[^`]*\b{label}\b", text), f"{name}: label {label}"


def test_the_metrics_reference_lists_every_label_value() -> None:
    from returner.metrics import ERROR_KINDS, OUTCOMES, STAGES

    text = (DOCS / "reference" / "metrics.md").read_text(encoding="utf-8")
    for value in (*(o.value for o in OUTCOMES), *STAGES, *ERROR_KINDS):
        assert f"`{value}`" in text, value


# ---------------------------------------------------------------- the README


def test_the_readme_is_short_and_points_into_the_docs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    first_screen = "\n".join(readme.splitlines()[:50])
    for needed in ("make run", "make test", "| `REDIS_URL`", "| `OUTPUT_DIR`"):
        assert needed in first_screen, f"{needed!r} is not in the README's first screen"
    assert "SPEC.md" not in readme and "shared folder" not in readme
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_the_docs_stand_on_their_own() -> None:
    """A user who clones the repository has no project folder beside it to be sent to."""
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        text = page.read_text(encoding="utf-8")
        assert "SPEC.md" not in text and "shared folder" not in text, page
