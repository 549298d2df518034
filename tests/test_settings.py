"""Settings: defaults, environment, .env, CLI overrides, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from returner.errors import SettingsError
from returner.settings import Settings, load_settings

SETTINGS = [field.alias for field in Settings.model_fields.values() if field.alias]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No setting in the environment and a working directory without a .env file."""
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def child_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(values)
    return env


def test_aliases_cover_the_spec() -> None:
    spec = {
        "REDIS_URL", "HOSTING_TASKS_QUEUE", "OUTPUT_DIR", "SHM_NAME_PATTERN", "JPEG_QUALITY",
        "JPEG_SUBSAMPLING", "CHANNEL_ORDER", "CONSUMER_GROUP", "CONSUMER_NAME",
        "CLAIM_MIN_IDLE_MS", "MAX_DELIVERIES", "MAX_PIXELS", "OUTPUT_LAYOUT",
        "RESULTS_JSON_ENTRIES", "RESULTS_RETENTION_DAYS", "METRICS_HOST", "METRICS_PORT",
        "LOG_LEVEL", "LOG_FORMAT", "EVENTS_MAXLEN", "PUBLISH_EVENTS", "MAX_TASK_BYTES",
        "DEAD_LETTERS_MAXLEN",
    }
    assert spec <= set(SETTINGS)


def test_defaults() -> None:
    s = load_settings()
    assert s.redis_url is None
    assert s.hosting_tasks_queue == "hosting:tasks"
    assert s.output_dir == Path("./output/translated")
    assert s.jpeg_quality == 80
    assert s.jpeg_subsampling == "420"
    assert s.channel_order == "RGB"
    assert s.consumer_group == "returner"
    assert s.claim_min_idle_ms == 60_000
    assert s.max_deliveries == 5
    assert (s.output_layout, s.results_json_entries, s.results_retention_days) == (
        "flat", 1000, 30)
    assert s.max_pixels >= 1448 * 1024
    assert s.log_format == "text"
    assert 0 <= s.metrics_port <= 65535


def test_default_consumer_name_is_stable() -> None:
    first, second = load_settings().consumer_name, load_settings().consumer_name
    assert first == second and first
    assert first == (socket.gethostname() or "returner")


def test_default_shm_name_pattern_is_safe() -> None:
    pattern = re.compile(load_settings().shm_name_pattern)
    assert pattern.fullmatch("img_shm_3f2a9c0b")
    assert pattern.fullmatch("img_shm_" + "ab" * 16)
    for name in ("img_shm_../etc", "img_shm_", "other", "img_shm_ab/cd", "img_shm_xyz",
                 "../img_shm_ab", "img_shm_ab\n"):
        assert not pattern.fullmatch(name), name


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "REDIS_URL": "redis://db:6380/2", "HOSTING_TASKS_QUEUE": "q:env",
        "OUTPUT_DIR": "/srv/frames", "SHM_NAME_PATTERN": r"frame_\d+", "JPEG_QUALITY": "55",
        "JPEG_SUBSAMPLING": "444", "CHANNEL_ORDER": "BGR", "CONSUMER_GROUP": "g",
        "CONSUMER_NAME": "c1", "CLAIM_MIN_IDLE_MS": "1500", "MAX_DELIVERIES": "9",
        "MAX_PIXELS": "1000", "RESULTS_JSON_ENTRIES": "10", "METRICS_HOST": "0.0.0.0",
        "OUTPUT_LAYOUT": "Daily", "RESULTS_RETENTION_DAYS": "0",
        "METRICS_PORT": "0", "LOG_LEVEL": "DEBUG", "LOG_FORMAT": "json",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert s.redis_url == "redis://db:6380/2"
    assert s.hosting_tasks_queue == "q:env"
    assert s.output_dir == Path("/srv/frames")
    assert s.shm_name_pattern == r"frame_\d+"
    assert (s.jpeg_quality, s.jpeg_subsampling, s.channel_order) == (55, "444", "BGR")
    assert (s.consumer_group, s.consumer_name) == ("g", "c1")
    assert (s.claim_min_idle_ms, s.max_deliveries, s.max_pixels) == (1500, 9, 1000)
    assert (s.output_layout, s.results_json_entries, s.results_retention_days) == (
        "daily", 10, 0)
    assert (s.metrics_host, s.metrics_port) == ("0.0.0.0", 0)
    assert (s.log_level, s.log_format) == ("DEBUG", "json")


def test_dotenv_file_is_read(clean_env: Path) -> None:
    (clean_env / ".env").write_text(
        "JPEG_QUALITY=42\nHOSTING_TASKS_QUEUE=q:dotenv\nCHANNEL_ORDER=BGRA\n"
    )
    s = load_settings()
    assert (s.jpeg_quality, s.hosting_tasks_queue, s.channel_order) == (42, "q:dotenv", "BGRA")


def test_environment_beats_dotenv(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".env").write_text("JPEG_QUALITY=42\nCONSUMER_GROUP=from-file\n")
    monkeypatch.setenv("JPEG_QUALITY", "55")
    s = load_settings()
    assert (s.jpeg_quality, s.consumer_group) == (55, "from-file")


def test_cli_overrides_win(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".env").write_text("JPEG_QUALITY=42\nOUTPUT_DIR=/from/file\n")
    monkeypatch.setenv("JPEG_QUALITY", "55")
    monkeypatch.setenv("HOSTING_TASKS_QUEUE", "q:env")
    s = load_settings(jpeg_quality=90, output_dir=Path("/from/cli"), hosting_tasks_queue="q:cli")
    assert (s.jpeg_quality, s.output_dir, s.hosting_tasks_queue) == (90, Path("/from/cli"), "q:cli")


def test_unset_cli_options_do_not_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JPEG_QUALITY", "55")
    assert load_settings(jpeg_quality=None).jpeg_quality == 55


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("JPEG_QUALITY", "150"), ("JPEG_QUALITY", "0"), ("JPEG_QUALITY", "abc"),
        ("JPEG_SUBSAMPLING", "999"), ("METRICS_PORT", "-1"), ("METRICS_PORT", "70000"),
        ("LOG_FORMAT", "xml"), ("LOG_LEVEL", "loud"), ("MAX_DELIVERIES", "0"),
        ("SHM_NAME_PATTERN", "("), ("CHANNEL_ORDER", "YUV"), ("CLAIM_MIN_IDLE_MS", "-5"),
        ("MAX_PIXELS", "0"), ("RESULTS_JSON_ENTRIES", "-1"), ("REDIS_URL", "http://x"),
        ("OUTPUT_LAYOUT", "hourly"), ("RESULTS_RETENTION_DAYS", "-1"),
        ("RESULTS_JSON_ENTRIES", "2000000"),
        ("WORKERS", "0"),
        ("WORKERS", "257"),
        ("WORKERS", "-1"),
        ("WORKERS", "two"),
        ("REDIS_CLUSTER", "maybe"),
        ("REDIS_CLUSTER", "cluster"),
        ("REDIS_WAIT_REPLICAS", "-1"),
        ("REDIS_WAIT_REPLICAS", "17"),
        ("REDIS_WAIT_REPLICAS", "all"),
        ("REDIS_WAIT_TIMEOUT_MS", "0"),
        ("REDIS_WAIT_TIMEOUT_MS", "-5"),
        ("HOSTING_TASKS_QUEUE", "q:{host}"),
        ("HOSTING_TASKS_QUEUE", "q:{"),
        ("HOSTING_TASKS_QUEUE", "q:}"),
        ("HOSTING_TASKS_QUEUE", "{q}"),
        ("HOSTING_TASKS_QUEUE", "q:{HOSTNAME}"),
        ("HOSTING_TASKS_QUEUE", "q:{{hostname}}"),
        ("HOSTING_TASKS_QUEUE", "q:{hostname"),
        ("REDIS_URL", "redis://h:notaport/0"),
        ("REDIS_URL", "redis://h:99999/0"),
        ("MAX_TASK_BYTES", "10"),
        ("DEAD_LETTERS_MAXLEN", "0"),
        ("EVENTS_MAXLEN", "0"),
        ("PUBLISH_EVENTS", "sometimes"),
    ],
)
def test_bad_environment_value_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith(f"{name}:"), message
    assert "\n" not in message


@pytest.mark.parametrize("url", ["http://user:hunter2@redis:6379/0",
                                 "redis://user:hunter2@redis:port/0", "redis://:hunter2@r:1x/0"])
def test_a_bad_redis_url_never_shows_its_password(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "hunter2" not in str(info.value) and ":***@" in str(info.value)


def test_bad_dotenv_value_names_the_setting(clean_env: Path) -> None:
    (clean_env / ".env").write_text("MAX_DELIVERIES=0\n")
    with pytest.raises(SettingsError, match="MAX_DELIVERIES"):
        load_settings()


@pytest.mark.parametrize(
    ("field", "value", "name"),
    [("jpeg_quality", 150, "JPEG_QUALITY"), ("jpeg_subsampling", "999", "JPEG_SUBSAMPLING"),
     ("metrics_port", -1, "METRICS_PORT"), ("shm_name_pattern", "(", "SHM_NAME_PATTERN")],
)
def test_bad_override_names_the_setting(field: str, value: object, name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        load_settings(**{field: value})


# --- through the real command line -----------------------------------------------------


def run_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "returner", *args], capture_output=True, text=True,
        cwd=cwd, env=child_env(**env), timeout=60,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], name: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert name in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_bad_env_value_exits_2_with_one_line(clean_env: Path) -> None:
    result = run_cli("run", cwd=clean_env, JPEG_QUALITY="abc",
                     REDIS_URL="redis://127.0.0.1:1/0")
    assert_one_line_error(result, "JPEG_QUALITY")


def test_cli_bad_option_value_exits_2_with_one_line(clean_env: Path) -> None:
    result = run_cli("run", "--jpeg-quality", "150", cwd=clean_env,
                     REDIS_URL="redis://127.0.0.1:1/0")
    assert_one_line_error(result, "JPEG_QUALITY")


def test_cli_bad_dotenv_value_exits_2_with_one_line(clean_env: Path) -> None:
    (clean_env / ".env").write_text("LOG_FORMAT=xml\n")
    result = run_cli("run", cwd=clean_env, REDIS_URL="redis://127.0.0.1:1/0")
    assert_one_line_error(result, "LOG_FORMAT")


def test_cli_option_beats_env_and_dotenv(clean_env: Path, redis_url: str, queue: str) -> None:
    (clean_env / ".env").write_text("HOSTING_TASKS_QUEUE=q:dotenv\n")
    from_file = run_cli("status", "--json", cwd=clean_env, REDIS_URL=redis_url)
    from_env = run_cli("status", "--json", cwd=clean_env, REDIS_URL=redis_url,
                       HOSTING_TASKS_QUEUE="q:env")
    from_cli = run_cli("status", "--json", "--queue", queue, cwd=clean_env,
                       REDIS_URL=redis_url, HOSTING_TASKS_QUEUE="q:env")
    for result in (from_file, from_env, from_cli):
        assert result.returncode == 0, result.stderr
    assert json.loads(from_file.stdout)["queue"] == "q:dotenv"
    assert json.loads(from_env.stdout)["queue"] == "q:env"
    assert json.loads(from_cli.stdout)["queue"] == queue


# --- WORKERS, REDIS_CLUSTER, REDIS_WAIT_*, {hostname} in HOSTING_TASKS_QUEUE -------------


def test_new_settings_defaults() -> None:
    s = load_settings()
    assert s.workers == 1
    assert s.redis_cluster is None  # unset: asked of the server at start
    assert (s.redis_wait_replicas, s.redis_wait_timeout_ms) == (0, 1_000)


def test_new_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERS", "4")
    monkeypatch.setenv("REDIS_CLUSTER", "true")
    monkeypatch.setenv("REDIS_WAIT_REPLICAS", "2")
    monkeypatch.setenv("REDIS_WAIT_TIMEOUT_MS", "250")
    s = load_settings()
    assert (s.workers, s.redis_cluster) == (4, True)
    assert (s.redis_wait_replicas, s.redis_wait_timeout_ms) == (2, 250)


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("WORKERS", "1", "workers", 1),
        ("WORKERS", "256", "workers", 256),
        ("REDIS_WAIT_REPLICAS", "0", "redis_wait_replicas", 0),
        ("REDIS_WAIT_REPLICAS", "16", "redis_wait_replicas", 16),
        ("REDIS_WAIT_TIMEOUT_MS", "1", "redis_wait_timeout_ms", 1),
    ],
)
def test_new_settings_accept_their_bounds(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, field: str, expected: int
) -> None:
    monkeypatch.setenv(name, value)
    assert getattr(load_settings(), field) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("auto", None),
        ("AUTO", None),
        (" Auto ", None),
        ("", None),
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("false", False),
        ("0", False),
    ],
)
def test_redis_cluster_values(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool | None
) -> None:
    monkeypatch.setenv("REDIS_CLUSTER", value)
    assert load_settings().redis_cluster is expected




@pytest.mark.parametrize(
    ("template", "expanded"),
    [
        ("tasks:{hostname}", "tasks:{h}"),
        ("{hostname}", "{h}"),
        ("{hostname}:tasks:{hostname}", "{h}:tasks:{h}"),
        ("plain:tasks", "plain:tasks"),
    ],
)
def test_hostname_in_the_queue_name_is_expanded(
    monkeypatch: pytest.MonkeyPatch, template: str, expanded: str
) -> None:
    host = socket.gethostname()
    assert host and "{" not in host and "}" not in host
    want = expanded.replace("{h}", host)
    monkeypatch.setenv("HOSTING_TASKS_QUEUE", template)
    assert load_settings().hosting_tasks_queue == want
    monkeypatch.delenv("HOSTING_TASKS_QUEUE")
    assert load_settings(hosting_tasks_queue=template).hosting_tasks_queue == want


def test_hostname_in_the_queue_name_is_expanded_from_dotenv(clean_env: Path) -> None:
    (clean_env / ".env").write_text("HOSTING_TASKS_QUEUE=frames:{hostname}:in\n")
    assert load_settings().hosting_tasks_queue == f"frames:{socket.gethostname()}:in"


def test_hostname_is_looked_up_when_settings_are_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "render-7")
    monkeypatch.setenv("HOSTING_TASKS_QUEUE", "q:{hostname}")
    assert load_settings().hosting_tasks_queue == "q:render-7"


@pytest.mark.parametrize(
    ("args", "env", "name"),
    [
        (("run",), {"HOSTING_TASKS_QUEUE": "q:{other}"}, "HOSTING_TASKS_QUEUE"),
        (("run", "--queue", "q:}"), {}, "HOSTING_TASKS_QUEUE"),
        (("status", "--queue", "{q}"), {}, "HOSTING_TASKS_QUEUE"),
        (("run", "--workers", "0"), {}, "WORKERS"),
        (("run",), {"WORKERS": "257"}, "WORKERS"),
        (("run",), {"REDIS_CLUSTER": "maybe"}, "REDIS_CLUSTER"),
        (("run",), {"REDIS_WAIT_REPLICAS": "17"}, "REDIS_WAIT_REPLICAS"),
        (("run",), {"REDIS_WAIT_TIMEOUT_MS": "0"}, "REDIS_WAIT_TIMEOUT_MS"),
    ],
)
def test_cli_bad_new_setting_exits_2_with_one_line(
    clean_env: Path, args: tuple[str, ...], env: dict[str, str], name: str
) -> None:
    result = run_cli(*args, cwd=clean_env, REDIS_URL="redis://127.0.0.1:1/0", **env)
    assert_one_line_error(result, name)


def test_cli_status_expands_hostname_in_the_queue_name(clean_env: Path, redis_url: str) -> None:
    result = run_cli(
        "status", "--json", cwd=clean_env, REDIS_URL=redis_url, HOSTING_TASKS_QUEUE="t:{hostname}"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["queue"] == f"t:{socket.gethostname()}"
