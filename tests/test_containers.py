"""Container deployment: Dockerfile, compose.yaml, deploy/prometheus.yml, deploy/alerts.yml.

Docker cannot run here, so these are static checks: hadolint on the Dockerfile, the
Compose specification's JSON schema on compose.yaml, the settings that matter for shared
memory (IPC namespace, UID, /dev/shm size), and the alert rules parsed as PromQL. The
tools are dev dependencies, found in the same bin directory as the running Python.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "alerts.yml"
# Not resolved: a venv's python is a symlink, and its bin directory is the one we want.
BIN = Path(sys.executable).parent

METRICS_PORT = 9108
# The metric names the service exports (histograms add _bucket, _sum and _count).
EXPORTED_METRICS = {
    "returner_queue_length",
    "returner_pending",
    "returner_oldest_pending_seconds",
    "returner_dead_letters",
    "returner_tasks_total",
    "returner_task_duration_seconds",
    "returner_redis_short_waits_total",
    "returner_worker_restarts_total",  # the supervisor's (run --workers)
}
HISTOGRAMS = {"returner_task_duration_seconds"}


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
    if name in EXPORTED_METRICS or name == "up":  # `up` is Prometheus's own, per target
        return True
    base, _, suffix = name.rpartition("_")
    return base in HISTOGRAMS and suffix in ("bucket", "sum", "count")


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
