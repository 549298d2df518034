"""Deployment: Dockerfile, compose.yaml, deploy/ (Prometheus, alerts, Grafana, Kubernetes).

Docker cannot run here, so these are static checks: hadolint on the Dockerfile, the
Compose specification's JSON schema on compose.yaml, the settings that matter for shared
memory (IPC namespace, UID, /dev/shm size), the alert rules and the Grafana dashboard's
queries parsed as PromQL and checked against the metrics the service really exports,
and the Kubernetes example against the Kubernetes schemas (kubernetes-validate). The
tools are dev dependencies, found in the same bin directory as the running Python.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import promql_parser
import pytest
import yaml

from tests.conftest import served_metrics

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "alerts.yml"
# Not resolved: a venv's python is a symlink, and its bin directory is the one we want.
BIN = Path(sys.executable).parent

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "returner.json"
GRAFANA_DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "returner.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
CONSOLE_MANIFEST = "console.yaml"  # the console's own Deployment, Service and Secret

METRICS_PORT = 9108
# Labels Prometheus attaches to every scraped series (the service never sets them).
TARGET_LABELS = {"instance", "job"}


@functools.cache
def exported_series() -> dict[str, dict[str, frozenset[str]]]:
    """Every sample name the service serves on /metrics, with its labels and their values.

    Read from the service's own registries, as /metrics renders them: a worker's (with
    returner_ready and returner_build_info, which the metrics server adds) and the
    supervisor's under `run --workers N` (returner_workers, returner_worker_restarts).
    Counters appear with _total, histograms with _bucket, _sum and _count.
    """
    from prometheus_client.parser import text_string_to_metric_families

    texts = served_metrics()
    series: dict[str, dict[str, set[str]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = series.setdefault(sample.name, {})
                for label, value in sample.labels.items():
                    labels.setdefault(label, set()).add(value)
    return {
        name: {label: frozenset(values) for label, values in labels.items()}
        for name, labels in series.items()
    }


def tool(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN}: pip install -e '.[dev]'")
    return path


def run_tool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    # No HADOLINT_* variables from the caller's environment (they can silence rules).
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    return subprocess.run(
        [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends in a line continuation"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def only(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [rest for kw, rest in stage if kw == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


def env_defaults(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, sep, value = item.partition("=")
                assert sep, f"use ENV KEY=value, not the legacy form: {rest}"
                env[key] = value
    return env


def test_hadolint_reports_nothing() -> None:
    done = run_tool(tool("hadolint"), "--no-color", "--failure-threshold", "style", DOCKERFILE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "", done.stdout
    assert done.stderr.strip() == "", done.stderr


def test_dockerfile_base_images_are_pinned_slim_python() -> None:
    images = [rest.split()[0] for kw, rest in dockerfile_instructions() if kw == "FROM"]
    assert images
    for image in images:
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", image), image


def test_dockerfile_runs_as_non_root_user_from_build_args() -> None:
    stage = final_stage()
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for kw, rest in stage if kw == "ARG"}
    assert args.get("UID") == "1000"
    assert args.get("GID") == "1000"
    user = only(stage, "USER")
    assert re.fullmatch(r"\$\{?UID\}?(:\$\{?GID\}?)?", user), user
    assert user.split(":")[0] not in ("root", "0")
    # The user is created from the same args, and /app is theirs.
    setup = " ".join(rest for kw, rest in stage if kw == "RUN")
    assert re.search(r"useradd .*--uid \"?\$\{?UID", setup), setup
    assert re.search(r"groupadd .*--gid \"?\$\{?GID", setup), setup


def test_dockerfile_entrypoint_cmd_and_signals() -> None:
    stage = final_stage()
    assert json.loads(only(stage, "ENTRYPOINT")) == ["returner"]
    assert json.loads(only(stage, "CMD")) == ["run"]
    assert only(stage, "EXPOSE").split() == [str(METRICS_PORT)]
    assert only(stage, "STOPSIGNAL") == "SIGTERM"


def test_dockerfile_env_defaults_for_a_container() -> None:
    env = env_defaults(final_stage())
    assert env["OUTPUT_DIR"] == "/app/output/translated"
    assert env["METRICS_HOST"] == "0.0.0.0"
    assert env["METRICS_PORT"] == str(METRICS_PORT)
    assert env["PYTHONUNBUFFERED"] == "1"


def test_dockerfile_installs_with_pip_without_cache_or_apt() -> None:
    runs = [rest for kw, rest in dockerfile_instructions() if kw == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert installs, runs
    assert all("--no-cache-dir" in r for r in installs), installs
    assert not any("apt-get" in r or "apt " in r for r in runs), runs


def healthcheck_command() -> list[str]:
    healthcheck = only(final_stage(), "HEALTHCHECK")
    assert "CMD [" in healthcheck, "use the exec form: HEALTHCHECK ... CMD [...]"
    command = json.loads(healthcheck[healthcheck.index("CMD [") + len("CMD ") :])
    assert isinstance(command, list)
    return [str(part) for part in command]


def test_dockerfile_healthcheck_asks_healthz_with_urllib() -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"], command
    code = command[2]
    assert "urllib.request" in code
    assert "http://127.0.0.1:" in code
    assert "/healthz" in code
    assert str(METRICS_PORT) in code


def serve_healthz(status: int) -> ThreadingHTTPServer:
    """A stand-in for the service's /healthz answering `status`, on a free port."""

    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK's Python snippet, run for real with METRICS_PORT=port."""
    env = {**os.environ, "METRICS_PORT": str(port)}
    return subprocess.run(
        [sys.executable, "-c", healthcheck_command()[2]],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_command_follows_healthz(status: int, healthy: bool) -> None:
    server = serve_healthz(status)
    try:
        done = run_healthcheck(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
    assert (done.returncode == 0) is healthy, done.stderr


def test_healthcheck_command_fails_when_nothing_listens() -> None:
    server = serve_healthz(200)
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    assert run_healthcheck(port).returncode != 0


def test_dockerignore_keeps_the_context_small() -> None:
    entries = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".venv", ".git", "output", ".env", ".pytest_cache", ".mypy_cache"):
        assert needed in entries, needed
    assert "**/__pycache__" in entries or "__pycache__" in entries
    # What the Dockerfile copies must stay in the context.
    for copied in ("pyproject.toml", "README.md", "returner"):
        assert copied not in entries, copied


# ---------------------------------------------------------------- compose.yaml


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"no service {name!r} in compose.yaml"
    svc = services[name]
    assert isinstance(svc, dict)
    return svc


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_compose_matches_the_compose_spec_schema() -> None:
    done = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_never_shares_the_host_ipc_or_pid_namespace() -> None:
    for name, svc in compose()["services"].items():
        assert svc.get("ipc") != "host", name
        assert svc.get("pid") != "host", name
        assert svc.get("network_mode") != "host", name


def test_compose_returner_owns_a_shareable_ipc_namespace() -> None:
    returner = service("returner")
    ipc = returner.get("ipc")
    assert ipc == "shareable" or str(ipc).startswith("service:"), ipc
    assert returner.get("shm_size"), "shm_size must be set: Docker's default /dev/shm is 64 MB"


def test_compose_returner_settings() -> None:
    returner = service("returner")
    assert "./output:/app/output" in returner["volumes"]
    env_files = returner["env_file"]
    assert {"path": ".env", "required": False} in env_files
    env = environment(returner)
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert env["OUTPUT_DIR"] == "/app/output/translated"
    assert returner["depends_on"]["redis"]["condition"] == "service_healthy"
    assert returner["restart"] == "unless-stopped"
    assert returner["stop_grace_period"] == "15s"
    assert f"{METRICS_PORT}:{METRICS_PORT}" in [str(p) for p in returner["ports"]]


def test_compose_returner_is_built_as_the_renderers_user() -> None:
    build = service("returner")["build"]
    assert build["context"] == "."
    assert build["args"]["UID"] == "${RENDERER_UID:-1000}"
    assert build["args"]["GID"] == "${RENDERER_GID:-1000}"


def test_compose_redis_is_durable_and_checked() -> None:
    redis = service("redis")
    assert re.fullmatch(r"redis:7(\.\d+)*-alpine", redis["image"]), redis["image"]
    command = redis["command"]
    words = command if isinstance(command, list) else shlex.split(command)
    assert words[words.index("--appendonly") + 1] == "yes"
    assert words[words.index("--appendfsync") + 1] in ("everysec", "always")
    assert any(str(v).endswith(":/data") for v in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert "ping" in redis["healthcheck"]["test"]


def test_compose_images_are_pinned() -> None:
    for name, svc in compose()["services"].items():
        image = svc.get("image")
        if image is None or "build" in svc:
            continue
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"


def test_compose_demo_joins_the_returners_ipc() -> None:
    demo = service("demo")
    returner = service("returner")
    assert demo["profiles"] == ["demo"]
    assert demo["ipc"] == "service:returner"
    assert demo["entrypoint"] == ["returner"]
    command = demo["command"]
    words = command if isinstance(command, list) else shlex.split(command)
    assert words[:1] == ["demo"] and "--count" in words, words
    assert environment(demo)["REDIS_URL"] == environment(returner)["REDIS_URL"]
    assert demo["depends_on"]["returner"]["condition"] == "service_started"
    # Same image, so the same UID as the returner: the segments it makes are readable.
    assert demo["image"] == returner["image"]
    assert demo["build"] == returner["build"]


def test_compose_prometheus_gets_config_and_rules_side_by_side() -> None:
    prometheus = service("prometheus")
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    mounts = {}
    for volume in prometheus["volumes"]:
        source, target = str(volume).split(":")[:2]
        mounts[source] = target
    config = mounts["./deploy/prometheus.yml"]
    rules = mounts["./deploy/alerts.yml"]
    assert config == "/etc/prometheus/prometheus.yml"  # the image's default --config.file
    # rule_files are relative to the config file's directory.
    assert Path(rules).parent == Path(config).parent
    assert Path(rules).name in prometheus_config()["rule_files"]


# ---------------------------------------------------------------- Prometheus


def prometheus_config() -> dict[str, Any]:
    doc = yaml.safe_load(PROMETHEUS.read_text())
    assert isinstance(doc, dict)
    return doc


def test_prometheus_scrapes_the_returner_every_15s() -> None:
    config = prometheus_config()
    assert config["rule_files"] == ["alerts.yml"]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "returner"]
    assert len(jobs) == 1
    job = jobs[0]
    interval = job.get("scrape_interval", config.get("global", {}).get("scrape_interval"))
    assert interval == "15s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"returner:{METRICS_PORT}"]


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert isinstance(doc, dict) and isinstance(doc["groups"], list) and doc["groups"]
    rules: list[dict[str, Any]] = []
    for group in doc["groups"]:
        assert isinstance(group["name"], str) and group["name"]
        assert isinstance(group["rules"], list) and group["rules"]
        rules.extend(group["rules"])
    return rules


DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    names = [rule.get("alert") for rule in rules]
    assert len(names) == len(set(names)) >= 3, names
    for rule in rules:
        name = rule.get("alert")
        assert isinstance(name, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), rule
        assert "record" not in rule, name
        assert isinstance(rule.get("expr"), str) and rule["expr"].strip(), name
        assert DURATION.fullmatch(str(rule.get("for"))), f"{name}: for {rule.get('for')!r}"
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name
        assert isinstance(rule["annotations"]["summary"], str), name
        assert rule["annotations"]["summary"].strip(), name


def selected_metrics(expr: str) -> set[str]:
    """The metric names an expression selects; raises ValueError if it is not PromQL."""
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def test_alert_expressions_parse_as_promql() -> None:
    for rule in alert_rules():
        try:
            selected_metrics(rule["expr"])
        except ValueError as exc:
            pytest.fail(f"{rule['alert']}: {exc}")


def exported(name: str) -> bool:
    # `up` is Prometheus's own, per target.
    return name == "up" or name in exported_series()


def test_exported_metrics_come_from_the_service_registries() -> None:
    series = exported_series()
    for name in (
        "returner_tasks_total",  # counters: _total
        "returner_task_duration_seconds_bucket",  # histograms: _bucket, _sum, _count
        "returner_task_duration_seconds_sum",
        "returner_queue_length",
        "returner_ready",  # the metrics server's
        "returner_build_info",
        "returner_workers",  # the supervisor's
        "returner_worker_restarts_total",
    ):
        assert name in series, name
    outcomes = series["returner_tasks_total"]["outcome"]
    assert {"completed", "duplicate", "failed", "dead_lettered"} <= outcomes
    assert "le" in series["returner_stage_duration_seconds_bucket"]
    assert not exported("returner_tasks"), "a counter is only exported with _total"


def test_alerts_use_only_exported_metrics() -> None:
    used: set[str] = set()
    for rule in alert_rules():
        used |= selected_metrics(rule["expr"])
    # Names mentioned anywhere (annotations too) must exist as well.
    used |= set(re.findall(r"\breturner_[a-z0-9_]+", ALERTS.read_text()))
    unknown = sorted(name for name in used if not exported(name))
    assert not unknown, f"not exported by the service: {unknown}"


def test_alerts_cover_stuck_pending_dead_letters_and_backlog() -> None:
    by_metric: dict[str, dict[str, Any]] = {}
    for rule in alert_rules():
        for name in selected_metrics(rule["expr"]):
            by_metric.setdefault(name, rule)
    stuck = by_metric["returner_oldest_pending_seconds"]
    assert re.search(r"returner_oldest_pending_seconds\s*>\s*300\b", stuck["expr"])
    assert stuck["for"] == "5m"
    dead = by_metric["returner_dead_letters"]
    assert re.search(r"\[15m\]\)\s*>\s*0\b", dead["expr"]), dead["expr"]
    backlog = by_metric["returner_queue_length"]
    assert re.search(r"returner_queue_length\s*>\s*1000\b", backlog["expr"])
    assert 'rate(returner_tasks_total{outcome="completed"}[5m])' in backlog["expr"]
    assert backlog["for"] == "10m"


# ---------------------------------------------------------------- PromQL, beyond names

RANGE_FUNCTIONS = {"rate", "irate", "increase"}
COUNTER_SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def children(node: object) -> list[object]:
    if isinstance(node, promql_parser.Call):
        return list(node.args)
    if isinstance(node, promql_parser.AggregateExpr):
        return [node.expr] + ([node.param] if node.param is not None else [])
    if isinstance(node, promql_parser.BinaryExpr):
        return [node.lhs, node.rhs]
    if isinstance(node, promql_parser.MatrixSelector):
        return [node.vector_selector]
    if isinstance(
        node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)
    ):
        return [node.expr]
    return []


def selectors(node: object) -> Iterator[promql_parser.VectorSelector]:
    if isinstance(node, promql_parser.VectorSelector):
        yield node
    for child in children(node):
        yield from selectors(child)


def unwrap(node: object) -> object:
    while isinstance(node, promql_parser.ParenExpr):
        node = node.expr
    return node


def counters_outside_a_rate(node: object, in_rate: bool = False) -> Iterator[str]:
    """Counters (and histogram series) selected other than inside rate/irate/increase."""
    if isinstance(node, promql_parser.VectorSelector):
        name = node.name or ""
        if name.startswith("returner_") and name.endswith(COUNTER_SUFFIXES) and not in_rate:
            yield name
        return
    if isinstance(node, promql_parser.Call):
        in_rate = node.func.name in RANGE_FUNCTIONS
    elif not isinstance(node, promql_parser.MatrixSelector):
        in_rate = False
    for child in children(node):
        yield from counters_outside_a_rate(child, in_rate)


def quantile_problems(node: object) -> Iterator[str]:
    """histogram_quantile over anything but `sum by (..., le)` of _bucket series."""
    if isinstance(node, promql_parser.Call) and node.func.name == "histogram_quantile":
        inner = unwrap(node.args[1])
        names = {s.name for s in selectors(inner)}
        by = inner.modifier if isinstance(inner, promql_parser.AggregateExpr) else None
        if (
            by is None
            or str(inner.op) != "sum"
            or by.type != promql_parser.AggModifierType.By
            or "le" not in by.labels
        ):
            yield f"histogram_quantile needs sum by (..., le): {inner}"
        if not names or not all(str(n).endswith("_bucket") for n in names):
            yield f"histogram_quantile over {sorted(map(str, names))}, not _bucket series"
    for child in children(node):
        yield from quantile_problems(child)


def label_problems(node: object) -> Iterator[str]:
    """Matchers and `by` labels the selected series do not carry; values they never take."""
    series = exported_series()
    for selector in selectors(node):
        labels = series.get(selector.name or "")
        if labels is None:
            continue  # an unknown name is reported by exported()
        for matcher in selector.matchers.matchers:
            if matcher.name in TARGET_LABELS:
                continue
            if matcher.name not in labels:
                yield f"{selector.name} has no label {matcher.name!r}"
            elif (
                matcher.op == promql_parser.MatchOp.Equal
                and matcher.value not in labels[matcher.name]
            ):
                yield f"{selector.name}{{{matcher.name}}} is never {matcher.value!r}"
    yield from grouping_problems(node)


def grouping_problems(node: object) -> Iterator[str]:
    if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
        series = exported_series()
        if node.modifier.type == promql_parser.AggModifierType.By:
            for selector in selectors(node.expr):
                carried = series.get(selector.name or "", {}).keys() | TARGET_LABELS
                for label in node.modifier.labels:
                    if label not in carried:
                        yield f"by ({label}) over {selector.name}, which has no such label"
    for child in children(node):
        yield from grouping_problems(child)


def promql_problems(expr: str) -> list[str]:
    tree = promql_parser.parse(expr)
    return [
        *counters_outside_a_rate(tree),
        *quantile_problems(tree),
        *label_problems(tree),
    ]


def test_promql_checks_catch_what_they_should() -> None:
    assert promql_problems("returner_tasks_total") == ["returner_tasks_total"]
    assert promql_problems('sum(returner_dead_letters{kind="x"})')
    assert promql_problems('rate(returner_tasks_total{outcome="done"}[1m])')
    assert promql_problems("sum by (stage) (rate(returner_task_duration_seconds_sum[1m]))")
    assert promql_problems(
        "histogram_quantile(0.9, rate(returner_task_duration_seconds_bucket[1m]))"
    )
    assert promql_problems(
        "histogram_quantile(0.9, sum by (stage) (rate(returner_stage_duration_seconds_bucket[1m])))"
    )
    assert not promql_problems(
        "histogram_quantile(0.9, sum by (stage, le) "
        '(rate(returner_stage_duration_seconds_bucket{instance=~"a", stage="load"}[1m])))'
    )


def test_alert_expressions_rate_counters_and_use_real_labels() -> None:
    for rule in alert_rules():
        assert not promql_problems(rule["expr"]), (rule["alert"], promql_problems(rule["expr"]))


# ---------------------------------------------------------------- Grafana

# Grafana's own variables, replaced as Grafana does before the query reaches Prometheus.
# Dashboard variables ($instance) appear only inside label matchers' strings.
GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
PANEL_TYPES = {"timeseries", "stat", "row"}


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def panels() -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    found: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target, Grafana's interval variables replaced."""
    found = []
    for panel in panels():
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_INTERVALS.items():
                expr = expr.replace(variable, value)
            found.append((panel["title"], expr))
    return found


def grafana_datasource() -> dict[str, Any]:
    doc = yaml.safe_load(GRAFANA_DATASOURCES.read_text())
    assert doc["apiVersion"] == 1
    sources = [s for s in doc["datasources"] if s["type"] == "prometheus"]
    assert len(sources) == 1, doc
    source = sources[0]
    assert isinstance(source, dict)
    return source


def test_dashboard_is_a_grafana_dashboard() -> None:
    board = dashboard()
    assert board["uid"] == "returner" and board["title"]
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    taken: set[tuple[int, int]] = set()
    for panel in panels():
        assert panel["type"] in PANEL_TYPES, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        if panel["type"] != "row":
            targets = panel["targets"]
            assert targets, panel["title"]
            refs = [target["refId"] for target in targets]
            assert len(refs) == len(set(refs)), panel["title"]


def test_dashboard_queries_parse_as_promql() -> None:
    assert queries()
    for title, expr in queries():
        assert "$__" not in expr, f"{title}: unknown Grafana variable in {expr}"
        try:
            selected_metrics(expr)
        except ValueError as exc:
            pytest.fail(f"{title}: {exc}: {expr}")


def test_dashboard_uses_only_exported_metrics() -> None:
    used: set[str] = set()
    for _, expr in queries():
        used |= selected_metrics(expr)
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else str(query or "")
        for text in (query, str(variable.get("definition", ""))):
            used |= set(re.findall(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", text))
    unknown = sorted(name for name in used if not exported(name))
    assert not unknown, f"not exported by the service: {unknown}"


def test_dashboard_queries_rate_counters_and_use_real_labels() -> None:
    for title, expr in queries():
        problems = promql_problems(expr)
        assert not problems, f"{title}: {problems}: {expr}"


def test_dashboard_shows_what_operators_look_at() -> None:
    used: set[str] = set()
    for _, expr in queries():
        used |= selected_metrics(expr)
    for name in (
        "returner_tasks_total",
        "returner_task_duration_seconds_bucket",
        "returner_queue_length",
        "returner_pending",
        "returner_oldest_pending_seconds",
        "returner_dead_letters",
        "returner_stage_duration_seconds_bucket",
        "returner_stage_duration_seconds_sum",
        "returner_stage_duration_seconds_count",
        "returner_worker_restarts_total",
        "returner_workers",
        "returner_errors_total",
        "returner_redis_reconnects_total",
        "returner_redis_short_waits_total",
        "returner_events_total",
        "returner_ready",
    ):
        assert name in used, f"no panel shows {name}"
    exprs = [expr for _, expr in queries()]
    for q in ("0.5", "0.9", "0.99"):
        assert any(
            e.startswith(f"histogram_quantile({q}, sum by (le) ")
            and "returner_task_duration_seconds_bucket" in e
            for e in exprs
        ), f"no p{q} of the task latency"
    assert any("sum by (outcome) (rate(returner_tasks_total" in e for e in exprs)
    assert any("sum by (kind) (rate(returner_errors_total" in e for e in exprs)


def test_dashboard_datasource_is_the_provisioned_one() -> None:
    uid = grafana_datasource()["uid"]
    refs = [panel["datasource"] for panel in panels() if panel["type"] != "row"]
    refs += [target["datasource"] for panel in panels() for target in panel.get("targets", [])]
    refs += [v["datasource"] for v in dashboard()["templating"]["list"] if "datasource" in v]
    assert refs
    for ref in refs:
        assert ref == {"type": "prometheus", "uid": uid}, ref


def test_grafana_datasource_is_the_compose_prometheus() -> None:
    source = grafana_datasource()
    assert source["access"] == "proxy"  # Grafana's server asks, inside the compose network
    assert source["url"] == "http://prometheus:9090"
    assert "9090:9090" in [str(p) for p in service("prometheus")["ports"]]
    # $__rate_interval is four times this: it must be the real scrape interval.
    interval = prometheus_config()["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == interval


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of a service's bind mounts (short syntax)."""
    found = {}
    for volume in svc["volumes"]:
        source, target = str(volume).split(":")[:2]
        if source.startswith("./"):
            found[target] = source
    return found


def test_compose_grafana_is_provisioned_from_deploy() -> None:
    grafana = service("grafana")
    assert re.fullmatch(r"grafana/grafana-oss:\d+\.\d+\.\d+", grafana["image"])
    binds = mounts(grafana)
    for source in binds.values():
        assert (ROOT / source).exists(), source
    datasources = binds["/etc/grafana/provisioning/datasources"]
    assert ROOT / datasources / GRAFANA_DATASOURCES.name == GRAFANA_DATASOURCES
    providers = binds["/etc/grafana/provisioning/dashboards"]
    assert ROOT / providers / GRAFANA_PROVIDERS.name == GRAFANA_PROVIDERS
    doc = yaml.safe_load(GRAFANA_PROVIDERS.read_text())
    assert doc["apiVersion"] == 1
    [provider] = doc["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert ROOT / binds[path] / DASHBOARD.name == DASHBOARD, "the dashboard is not mounted there"
    home = environment(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert ROOT / binds[str(Path(home).parent)] / Path(home).name == DASHBOARD
    assert grafana["depends_on"] == ["prometheus"] or "prometheus" in grafana["depends_on"]


def test_compose_grafana_is_local_and_read_only_for_visitors() -> None:
    grafana = service("grafana")
    ports = [str(p) for p in grafana["ports"]]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports), ports
    env = environment(grafana)
    if env.get("GF_AUTH_ANONYMOUS_ENABLED") == "true":
        assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    # The admin password is never written in the file.
    password = env.get("GF_SECURITY_ADMIN_PASSWORD", "")
    assert re.fullmatch(r"\$\{[A-Z_]+(:-[^}]*)?\}", password), password
    assert env.get("GF_USERS_ALLOW_SIGN_UP") == "false"


# ---------------------------------------------------------------- Kubernetes

# The Kubernetes versions whose schemas the manifests must satisfy: the oldest meant to
# work and the newest kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
# Custom resources: no schema in kubernetes-validate; checked by hand below.
CUSTOM_API_GROUPS = ("monitoring.coreos.com/",)


def kustomization() -> dict[str, Any]:
    doc = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, resource) of every manifest in deploy/kubernetes/."""
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.name, doc))
    assert found
    return found


def k8s_resource(kind: str, filename: str | None = None) -> dict[str, Any]:
    """The one resource of `kind` in `filename`, or in the files of the renderer's Pod
    (every file but console.yaml)."""
    [resource] = [doc for name, doc in k8s_documents() if doc["kind"] == kind
                  and (name == filename if filename else name != CONSOLE_MANIFEST)]
    return resource


def k8s_resources(kind: str) -> list[dict[str, Any]]:
    """Every resource of `kind` in the files of the renderer's Pod."""
    return [doc for name, doc in k8s_documents() if doc["kind"] == kind
            and name != CONSOLE_MANIFEST]


def pod_spec() -> dict[str, Any]:
    spec = k8s_resource("Deployment")["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def container(name: str) -> dict[str, Any]:
    [found] = [c for c in pod_spec()["containers"] if c["name"] == name]
    assert isinstance(found, dict)
    return found


def container_env(name: str) -> dict[str, dict[str, Any]]:
    """name -> the env entry (with `value` or `valueFrom`), in order."""
    return {item["name"]: item for item in container(name).get("env", [])}


def env_value(name: str, variable: str) -> str:
    return str(container_env(name)[variable]["value"])


def test_kustomization_lists_the_manifests() -> None:
    doc = kustomization()
    assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert doc["kind"] == "Kustomization"
    listed = doc["resources"]
    for name in listed:
        assert (KUBERNETES / name).is_file(), name
    text = (KUBERNETES / "kustomization.yaml").read_text()
    for path in KUBERNETES.glob("*.yaml"):
        if path.name == "kustomization.yaml":
            continue
        if path.name == "podmonitor.yaml":  # needs the Prometheus Operator's CRDs
            assert path.name not in listed
            assert re.search(r"#\s*- podmonitor\.yaml", text), "offer it, commented out"
        else:
            assert path.name in listed, f"{path.name} is not in kustomization.yaml"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_match_the_schemas(version: str) -> None:
    checked = 0
    for filename, doc in k8s_documents():
        if doc["apiVersion"].startswith(CUSTOM_API_GROUPS):
            continue
        try:
            # strict: unknown fields (a typo) are errors too.
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{filename}: {doc['kind']} {where}: {exc.message}")
        checked += 1
    assert checked >= 4


def test_kubernetes_podmonitor_selects_the_returners_metrics_port() -> None:
    monitor = k8s_resource("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    spec = monitor["spec"]
    known = {"selector", "podMetricsEndpoints", "jobLabel", "namespaceSelector",
             "podTargetLabels", "sampleLimit", "targetLimit", "attachMetadata"}  # fmt: skip
    assert set(spec) <= known, set(spec) - known
    labels = k8s_resource("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    endpoint_keys = {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings",
                     "metricRelabelings", "honorLabels", "honorTimestamps", "params"}  # fmt: skip
    ports = {p["name"]: p["containerPort"] for p in container("returner")["ports"]}
    [endpoint] = spec["podMetricsEndpoints"]
    assert set(endpoint) <= endpoint_keys, set(endpoint) - endpoint_keys
    assert ports[endpoint["port"]] == METRICS_PORT
    assert endpoint.get("path", "/metrics") == "/metrics"
    assert DURATION.fullmatch(endpoint["interval"])
    # ReturnerDown (deploy/alerts.yml) looks for job="returner".
    jobs = [r for r in endpoint.get("relabelings", []) if r.get("targetLabel") == "job"]
    assert [r["replacement"] for r in jobs] == ["returner"]
    assert any('up{job="returner"}' in rule["expr"] for rule in alert_rules())


def test_kubernetes_service_has_the_scrape_annotations() -> None:
    svc = k8s_resource("Service")
    annotations = svc["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    labels = k8s_resource("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    [port] = svc["spec"]["ports"]
    assert port["port"] == METRICS_PORT and port["targetPort"] == "metrics"
    assert svc["spec"].get("clusterIP") == "None", "headless: every Pod is its own target"


def test_kubernetes_pod_shares_a_bounded_memory_dev_shm() -> None:
    spec = pod_spec()
    assert [c["name"] for c in spec["containers"]] == ["renderer", "returner"]
    shm = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert len(shm) == 1, shm
    assert shm[0]["emptyDir"]["sizeLimit"], "a memory-backed emptyDir needs a sizeLimit"
    for name in ("renderer", "returner"):
        mounted = {m["mountPath"]: m["name"] for m in container(name)["volumeMounts"]}
        assert mounted.get("/dev/shm") == shm[0]["name"], name
    for host_namespace in ("hostIPC", "hostPID", "hostNetwork"):
        assert not spec.get(host_namespace), host_namespace


def test_kubernetes_containers_run_as_one_unprivileged_user() -> None:
    spec = pod_spec()
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] > 0 and pod["runAsGroup"] > 0
    assert pod["fsGroup"] == pod["runAsGroup"]
    # Always (the default) would make OUTPUT_DIR and the store group-writable at each
    # mount, and the returner refuses to start on those.
    assert pod["fsGroupChangePolicy"] == "OnRootMismatch"
    # The image's default user is the same (Dockerfile ARG UID/GID).
    args = dict(rest.split("=", 1) for kw, rest in final_stage() if kw == "ARG")
    assert (str(pod["runAsUser"]), str(pod["runAsGroup"])) == (args["UID"], args["GID"])
    for c in spec["containers"]:
        context = c["securityContext"]
        for key in ("runAsUser", "runAsGroup"):
            assert context.get(key, pod[key]) == pod[key], f"{c['name']}: {key}"
        assert context["allowPrivilegeEscalation"] is False, c["name"]
        assert context["capabilities"]["drop"] == ["ALL"], c["name"]
        assert not context.get("capabilities", {}).get("add"), c["name"]
        assert not context.get("privileged"), c["name"]
    assert container("returner")["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["enableServiceLinks"] is False  # no METRICS_PORT=tcp://... from a Service


def test_kubernetes_returner_probes_and_metrics() -> None:
    returner = container("returner")
    assert env_value("returner", "METRICS_HOST") == "0.0.0.0"
    assert env_value("returner", "METRICS_PORT") == str(METRICS_PORT)
    ports = {p["name"]: p["containerPort"] for p in returner["ports"]}
    assert ports["metrics"] == METRICS_PORT

    def probe(kind: str) -> str:
        get = returner[kind]["httpGet"]
        assert get["port"] in ("metrics", METRICS_PORT), kind
        return str(get["path"])

    assert probe("livenessProbe") == "/healthz"
    assert probe("readinessProbe") == "/readyz"
    if "startupProbe" in returner:
        assert probe("startupProbe") == "/healthz"
    # The returner exits within 10 s of SIGTERM; leave room beyond that.
    assert pod_spec()["terminationGracePeriodSeconds"] >= 15


def test_kubernetes_queue_is_per_pod_and_shared_with_the_renderer() -> None:
    queue = env_value("returner", "HOSTING_TASKS_QUEUE")
    assert "{hostname}" in queue
    renderer = container_env("renderer")
    names = list(renderer)
    # $(POD_NAME) expands only if POD_NAME is defined earlier in the list.
    assert names.index("POD_NAME") < names.index("HOSTING_TASKS_QUEUE")
    assert renderer["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert renderer["HOSTING_TASKS_QUEUE"]["value"] == queue.replace("{hostname}", "$(POD_NAME)")


def test_kubernetes_returner_settings_are_real_and_valid() -> None:
    from returner.settings import Settings

    aliases = {f.alias for f in Settings.model_fields.values() if f.alias}
    env = container_env("returner")
    credentials = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # the AWS chain's own
    unknown = sorted(set(env) - aliases - credentials)
    assert not unknown, f"not settings of the returner: {unknown}"
    secrets = {s["metadata"]["name"]: s for s in k8s_resources("Secret")}
    values = {}
    for name, item in env.items():
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            values[name] = secrets[ref["name"]]["stringData"][ref["key"]]
        else:
            values[name] = item["value"]
    for name in credentials:
        values.pop(name)
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    assert settings.metrics_host == "0.0.0.0"
    # Both containers get Redis from the same Secret key.
    assert container_env("renderer")["REDIS_URL"] == env["REDIS_URL"]


def test_kubernetes_output_dir_is_on_the_claim() -> None:
    spec = pod_spec()
    claim = k8s_resource("PersistentVolumeClaim")
    [volume] = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    [mount] = [m for m in container("returner")["volumeMounts"] if m["name"] == volume["name"]]
    output = Path(env_value("returner", "OUTPUT_DIR"))
    # A directory the returner creates inside the volume: the volume's root is
    # group-writable (fsGroup), which the returner refuses for OUTPUT_DIR itself.
    assert output.parent == Path(mount["mountPath"]), (output, mount)
    assert not mount.get("readOnly")
    deployment = k8s_resource("Deployment")["spec"]
    if "ReadWriteOnce" in claim["spec"]["accessModes"]:
        assert deployment["replicas"] == 1
        assert deployment["strategy"]["type"] == "Recreate"


def test_kubernetes_renderer_is_marked_as_a_placeholder() -> None:
    text = (KUBERNETES / "deployment.yaml").read_text()
    renderer = container("renderer")
    for line in text.splitlines():
        if renderer["image"] in line:
            assert "REPLACE" in line, line
    assert renderer["image"] != container("returner")["image"]


# ---------------------------------------------------------------- the console


CONSOLE_PORT = 9110


def test_compose_console_reads_the_returners_redis_and_output() -> None:
    console, returner = service("console"), service("returner")
    assert console["profiles"] == ["console"], "started only when asked for"
    assert console["command"] == ["console"]
    assert (console["image"], console["build"]) == (returner["image"], returner["build"])
    env = environment(console)
    for same in ("REDIS_URL", "OUTPUT_DIR"):
        assert env[same] == environment(returner)[same], same
    assert "./output:/app/output" in console["volumes"]  # the same path as the returner's
    assert env["CONSOLE_HOST"] == "0.0.0.0" and env["CONSOLE_PORT"] == str(CONSOLE_PORT)
    # The token comes from the shell or .env, never from this file.
    assert re.fullmatch(r"\$\{CONSOLE_TOKEN(:-)?\}", env["CONSOLE_TOKEN"]), env["CONSOLE_TOKEN"]
    ports = [str(p) for p in console["ports"]]
    assert ports == [f"127.0.0.1:{CONSOLE_PORT}:{CONSOLE_PORT}"]
    check = " ".join(console["healthcheck"]["test"])
    assert f"http://127.0.0.1:{CONSOLE_PORT}/healthz" in check


def console_container() -> dict[str, Any]:
    spec = k8s_resource("Deployment", CONSOLE_MANIFEST)["spec"]["template"]["spec"]
    [found] = spec["containers"]
    assert isinstance(found, dict)
    return found


def test_kubernetes_console_is_a_deployment_of_its_own_with_a_valid_setup() -> None:
    from returner.console.server import check_access
    from returner.settings import Settings

    deployment = k8s_resource("Deployment", CONSOLE_MANIFEST)
    assert deployment["metadata"]["name"] != k8s_resource("Deployment")["metadata"]["name"]
    console = console_container()
    assert console["args"] == ["console"]
    assert console["image"] == container("returner")["image"]
    env = {item["name"]: item for item in console["env"]}
    aliases = {f.alias for f in Settings.model_fields.values() if f.alias}
    assert set(env) <= aliases, set(env) - aliases
    assert env["REDIS_URL"] == container_env("returner")["REDIS_URL"]  # the same Redis
    secret = k8s_resource("Secret", CONSOLE_MANIFEST)
    token = env["CONSOLE_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token["name"] == secret["metadata"]["name"]
    values = {name: item["value"] for name, item in env.items() if "value" in item}
    values["CONSOLE_TOKEN"] = secret["stringData"][token["key"]]
    settings = Settings(_env_file=None, REDIS_URL="redis://r:6379/0", **values)  # type: ignore[call-arg]
    check_access(settings)  # beyond loopback, with a token: starts
    assert settings.console_port == CONSOLE_PORT
    assert settings.output_dir == Path(env_value("returner", "OUTPUT_DIR"))


def test_kubernetes_console_shares_the_returners_node_volume_and_user() -> None:
    spec = k8s_resource("Deployment", CONSOLE_MANIFEST)["spec"]["template"]["spec"]
    renderer = pod_spec()
    # The claim is ReadWriteOnce: only Pods on the renderer's node can mount it too.
    [term] = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    labels = k8s_resource("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()
    assert term["topologyKey"] == "kubernetes.io/hostname"
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
              if "persistentVolumeClaim" in v}
    [(volume, claim)] = claims.items()
    assert claim == k8s_resource("PersistentVolumeClaim")["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in console_container()["volumeMounts"]}
    returner_mounts = {m["mountPath"] for m in container("returner")["volumeMounts"]}
    assert mounts[volume] in returner_mounts  # records name JPEGs by absolute path
    for key in ("runAsUser", "runAsGroup", "fsGroup", "fsGroupChangePolicy"):
        assert spec["securityContext"][key] == renderer["securityContext"][key], key
    context = console_container()["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"]
    assert context["capabilities"]["drop"] == ["ALL"]
    assert spec["enableServiceLinks"] is False


def test_kubernetes_console_probes_and_service() -> None:
    console = console_container()
    ports = {p["name"]: p["containerPort"] for p in console["ports"]}
    assert ports == {"console": CONSOLE_PORT}
    for probe in ("readinessProbe", "livenessProbe"):
        assert console[probe]["httpGet"] == {"path": "/healthz", "port": "console"}, probe
    svc = k8s_resource("Service", CONSOLE_MANIFEST)
    labels = k8s_resource("Deployment", CONSOLE_MANIFEST)["spec"]["template"]["metadata"]
    assert svc["spec"]["selector"].items() <= labels["labels"].items()
    [port] = svc["spec"]["ports"]
    assert port["port"] == CONSOLE_PORT and port["targetPort"] == "console"
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"  # not published by itself
