"""Redis that is not there yet, and Redis that trusts the returner with no more than it
needs: an ACL user limited to the returner's commands and keys."""

from __future__ import annotations

import json
import re
import signal
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from returner.embedded import EmbeddedRedis
from returner.stream import Keys
from tests.conftest import (
    Frames,
    random_frame,
    read_results,
    server_binaries,
    server_version,
    wait_for,
)
from tests.e2e.conftest import Service, base_env, run_cli
from tests.e2e.test_run import free_port, results_count

StartService = Callable[[dict[str, str]], Service]


def http(port: int, path: str) -> tuple[int, str]:
    """Status and body of GET `path` on the metrics port; 0 while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except OSError:
        return 0, ""


def metric(port: int, name: str) -> float:
    for line in http(port, "/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def results(out: Path) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = read_results(out)
    return data


# -- Redis down at start-up ---------------------------------------------------------------

UNAVAILABLE = re.compile(r"^.*redis unavailable.*retrying.*$", re.MULTILINE)


def test_redis_down_at_start_up(service: Callable[..., Service], tmp_path: Path,
                                frames: Frames) -> None:
    """The service starts before Redis: it waits, says so, is neither live nor ready; once
    Redis answers it becomes ready, serves, and stops cleanly on SIGTERM."""
    port, metrics_port, queue, out = free_port(), free_port(), "down:q", tmp_path / "out"
    env = base_env(REDIS_URL=f"redis://127.0.0.1:{port}/0", HOSTING_TASKS_QUEUE=queue,
                   OUTPUT_DIR=out, METRICS_PORT=metrics_port, CONSUMER_NAME="down",
                   ENCODER_THREADS=2)
    svc = service(env).start()

    line = wait_for(lambda: UNAVAILABLE.search(svc.logs(None)), what="a redis-unavailable line")
    assert f"127.0.0.1:{port}" in line[0], f"the line does not say where: {line[0]}"
    wait_for(lambda: http(metrics_port, "/healthz")[0] == 503, what="/healthz 503")
    status, body = http(metrics_port, "/readyz")
    assert status == 503 and "redis" in body, (status, body)
    wait_for(lambda: len(UNAVAILABLE.findall(svc.logs(None))) >= 3, what="several retries")
    assert svc.alive(), svc.logs()
    assert http(metrics_port, "/healthz")[0] == 503
    assert "encoder threads" not in svc.logs(None), "joined a group on a Redis that is not there"

    server = EmbeddedRedis(tmp_path / "redis", port=port, binary=server_binaries()[0])
    server.start()
    try:
        wait_for(lambda: http(metrics_port, "/readyz")[0] == 200, timeout=30, what="ready")
        assert http(metrics_port, "/healthz")[0] == 200
        frame = frames.task(random_frame((48, 64, 3), seed=1), "req-late", "img-late")
        redis.Redis(port=port).rpush(queue, frame)
        wait_for(lambda: results_count(out) == 1, timeout=30, what="the task to complete")
        [rec] = results(out)
        assert rec["status"] == "completed" and Path(rec["file_path"]).is_file()
        assert not frames.exists(frames.names[0])
        assert metric(metrics_port, "returner_redis_reconnects_total") >= 1
        assert metric(metrics_port, 'returner_errors_total{kind="redis"}') >= 3
        assert svc.stop() == 0, svc.logs()
    finally:
        server.stop()


def test_sigterm_while_redis_is_still_down(service: Callable[..., Service],
                                           tmp_path: Path) -> None:
    port = free_port()
    env = base_env(REDIS_URL=f"redis://127.0.0.1:{port}/0", OUTPUT_DIR=tmp_path / "out",
                   METRICS_PORT=0, CONSUMER_NAME="down", ENCODER_THREADS=2)
    svc = service(env).start()
    wait_for(lambda: UNAVAILABLE.search(svc.logs(None)), what="a redis-unavailable line")
    svc.signal(signal.SIGTERM)
    assert svc.proc is not None
    assert svc.proc.wait(timeout=10) == 0, svc.logs()


# -- a least-privilege ACL user -------------------------------------------------------------

# For HOSTING_TASKS_QUEUE=hosting:tasks (the default); for another list L, write L for
# hosting:tasks. Found by running every command path the returner has (run, status,
# replay --pending, replay --dead-letter; new, own pending, claimed and taken-over
# entries) under this user: each command listed is needed by at least one of them.
# AUTH (and HELLO, with ?protocol=3) need no grant. redis-py's CLIENT SETINFO is refused
# and redis-py ignores the refusal; on Redis 7.2+ add +client|setinfo to keep ACL LOG
# free of it (Redis 7.0 does not know the subcommand and refuses the grant).
ACL_SETUSER = (
    "ACL SETUSER returner on >s3cret resetkeys ~hosting:tasks ~{hosting:tasks}:* "
    "resetchannels &events:* -@all +blmove +evalsha +info +llen +lpop +ping +publish +rpush "
    "+script|load +time +xack +xadd +xautoclaim +xclaim +xdel +xgroup|create +xgroup|delconsumer "
    "+xinfo|consumers +xlen +xpending +xrange +xreadgroup +xrevrange"
)
ACL_QUEUE = "hosting:tasks"
ACL_USER, ACL_PASSWORD = "returner", "s3cret"
# Denials a run may leave in ACL LOG that the returner tolerates.
TOLERATED = {b"client"}  # CLIENT SETINFO, sent by redis-py on connect


def acl_commands(line: str) -> list[str]:
    return [word[1:] for word in line.split() if word.startswith("+")]


@pytest.fixture(params=server_binaries(), ids=lambda b: f"redis-{server_version(b)}")
def acl_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of its own: the user and the default queue name belong to this test."""
    server = EmbeddedRedis(tmp_path / "redis-acl", binary=request.param)
    server.start()
    yield server
    server.stop()


def acl_log(admin: redis.Redis) -> list[dict[bytes, Any]]:
    entries: list[dict[bytes, Any]] = admin.execute_command("ACL", "LOG", 128)  # type: ignore[no-untyped-call]
    return entries


def strand(admin: redis.Redis, consumer: str, task: bytes) -> str:
    """A delivery a worker took and never settled (it crashed): pending under `consumer`."""
    keys = Keys.for_queue(ACL_QUEUE)
    try:
        admin.xgroup_create(keys.stream, "returner", id="0", mkstream=True)
    except redis.ResponseError as exc:
        assert "BUSYGROUP" in str(exc)
    entry_id = admin.xadd(keys.stream, {"task": task})
    got: Any = admin.xreadgroup("returner", consumer, {keys.stream: ">"}, count=1)
    assert got and got[0][1][0][0] == entry_id
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def run_acl_scenario(server: EmbeddedRedis, acl_line: str, start: StartService, work: Path,
                     frames: Frames, timeout: float = 30.0) -> None:
    """Every command path of the returner, as the ACL user; raises AssertionError on any
    failure or any denial the returner does not tolerate."""
    admin = redis.Redis(port=server.port)
    admin.execute_command(*acl_line.split())  # type: ignore[no-untyped-call]
    admin.execute_command("ACL", "LOG", "RESET")  # type: ignore[no-untyped-call]
    keys = Keys.for_queue(ACL_QUEUE)
    out = work / "out"
    url = f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{server.port}/0"
    env = base_env(REDIS_URL=url, HOSTING_TASKS_QUEUE=ACL_QUEUE, OUTPUT_DIR=out,
                   CONSUMER_NAME="acl", METRICS_PORT=0, ENCODER_THREADS=2,
                   CONSUMER_TIMEOUT_MS=3000, LOG_LEVEL="INFO", PUBLISH_EVENTS="true")

    def task(rid: str, seed: int) -> bytes:
        return frames.task(random_frame((32, 48, 3), seed=seed), rid, f"img-{rid}")

    def records() -> dict[str, list[str]]:
        try:
            found: dict[str, list[str]] = {}
            for rec in results(out):
                found.setdefault(rec["request_id"], []).append(rec["status"])
            return found
        except (OSError, ValueError):
            return {}

    def cli(*args: str) -> str:
        done = run_cli(*args, env=env, cwd=work, timeout=timeout * 2)
        assert done.returncode == 0, f"returner {' '.join(args)}: {done.stdout}{done.stderr}"
        assert "NOPERM" not in done.stdout + done.stderr, done.stderr
        return done.stdout

    # 1. run: a new task, a bad one, and a crashed consumer's entry taken over (XCLAIM).
    strand(admin, "crashed", task("rescued", 1))
    bad = json.dumps({"request_id": "bad", "image_id": "img-bad"}).encode()
    admin.rpush(ACL_QUEUE, task("new", 2), bad)
    svc = start(env).start()
    wanted = {"new": ["completed"], "bad": ["failed"], "rescued": ["completed"]}
    wait_for(lambda: records() == wanted, timeout=timeout, what=f"results {wanted}")
    assert admin.xlen(keys.dead) == 1
    report = json.loads(cli("status", "--json"))
    assert (report["list_length"], report["stream_length"], report["dead_letters"]) == (0, 0, 1)
    assert report["results"] == {"records": 3}
    assert "dead letters: 1" in cli("status")
    assert svc.stop() == 0, svc.logs()
    logs = svc.logs(None)
    assert "NOPERM" not in logs and "redis unavailable" not in logs, logs[-3000:]

    # 2. replay --pending: another crashed consumer's entry, claimed and completed.
    strand(admin, "crashed-2", task("replayed", 3))
    summary = cli("replay", "--pending", "--min-idle", "0")
    assert "claimed 1: completed 1" in summary, summary
    assert records()["replayed"] == ["completed"]
    assert admin.xpending(keys.stream, "returner")["pending"] == 0
    consumers = {c["name"] for c in admin.xinfo_consumers(keys.stream, "returner")}
    assert b"acl-replay" not in consumers and "acl-replay" not in consumers

    # 3. replay --dead-letter moves the bad task back; a run fails it again.
    assert "moved 1" in cli("replay", "--dead-letter")
    assert (admin.xlen(keys.dead), admin.xlen(keys.stream)) == (0, 1)
    svc = start(env).start()
    wait_for(lambda: records().get("bad") == ["failed", "failed"], timeout=timeout,
             what="the replayed dead letter to fail again")
    wait_for(lambda: admin.xlen(keys.dead) == 1, what="dead-lettered again")
    assert svc.stop() == 0, svc.logs()
    assert "NOPERM" not in svc.logs(None)

    denied = [e for e in acl_log(admin) if e[b"object"] not in TOLERATED]
    assert not denied, f"the returner was refused: {denied}"
    assert not [n for n in frames.names if frames.exists(n)]


def test_acl_user_with_least_privilege(acl_server: EmbeddedRedis, service: Callable[..., Service],
                                       tmp_path: Path, frames: Frames) -> None:
    print(f"\n{ACL_SETUSER}")
    run_acl_scenario(acl_server, ACL_SETUSER, service, tmp_path, frames)

    admin = redis.Redis(port=acl_server.port)
    admin.set("other", "secret")
    user = redis.Redis(port=acl_server.port, username=ACL_USER, password=ACL_PASSWORD)
    admin.execute_command("ACL", "LOG", "RESET")  # type: ignore[no-untyped-call]
    refused: list[Callable[[], Any]] = [
        lambda: user.get("other"),
        lambda: user.set("other", "x"),
        lambda: user.llen("other"),  # an allowed command on another key
        lambda: user.xadd("other", {"a": "b"}),
        lambda: user.lpop("hosting:tasks:other"),
        lambda: user.xlen("{hosting:tasks}"),
        lambda: user.keys("*"),
        lambda: user.flushall(),
        lambda: user.config_get("dir"),
        lambda: user.execute_command("EVAL", "return 1", 0),  # type: ignore[no-untyped-call]
        lambda: user.publish("chan", "x"),
        lambda: user.execute_command("ACL", "WHOAMI"),  # type: ignore[no-untyped-call]
    ]
    for attempt in refused:
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    # A script it may load still runs with its rights: Lua is no way around the key list.
    sha = user.script_load("return redis.call('LLEN', KEYS[1])")
    with pytest.raises(redis.ResponseError, match=r"(?i)can't|no permissions|noperm"):
        user.evalsha(sha, 1, "other")
    assert user.evalsha(sha, 1, "{hosting:tasks}:missing") == 0  # its own keys: allowed
    objects = {e[b"object"] for e in acl_log(admin)}
    assert {b"get", b"other"} <= objects, objects
    assert admin.get("other") == b"secret"
    assert user.llen(ACL_QUEUE) == 0  # and its own key, yes
    assert user.publish("events:req_1", "x") == 0  # and its own channels


# What the client side sends (returner/stream.py, redis-py's Script: EVALSHA, and SCRIPT
# LOAD when Redis does not have the script yet). The Lua scripts' calls are read from
# returner/lua: ACL checks those too.
CLIENT_SIDE = {"evalsha", "script|load", "xgroup|create", "ping", "blmove", "llen", "xlen",
               "time", "xpending", "xinfo|consumers", "xrange", "xrevrange",
               "info"}  # INFO cluster: is REDIS_URL a cluster? (REDIS_CLUSTER=auto)


def lua_commands() -> set[str]:
    found = set()
    for script in (Path(__file__).parents[2] / "returner" / "lua").glob("*.lua"):
        for cmd, sub in re.findall(r"redis\.call\('(\w+)'(?:,\s*'(\w+)')?", script.read_text()):
            container = cmd.upper() in ("XGROUP", "XINFO")
            found.add(f"{cmd}|{sub}".lower() if container else cmd.lower())
    return found


def test_acl_grants_match_what_the_code_calls() -> None:
    """Every command the Lua scripts call is granted, and nothing is granted that neither
    they nor the client side use; the line itself is the shape the README shows."""
    words = ACL_SETUSER.split()
    assert words[:5] == ["ACL", "SETUSER", ACL_USER, "on", f">{ACL_PASSWORD}"]
    assert words[5:9] == ["resetkeys", f"~{ACL_QUEUE}", f"~{{{ACL_QUEUE}}}:*", "resetchannels"]
    assert words[9:11] == ["&events:*", "-@all"]  # PUBLISH_EVENTS: events:{request_id}
    granted = acl_commands(ACL_SETUSER)
    assert len(granted) == len(set(granted)) == len(words) - 11
    lua = lua_commands()
    assert "xautoclaim" in lua and "xgroup|delconsumer" in lua  # the parse found them
    assert lua - set(granted) == set(), "a script calls a command the user may not run"
    assert set(granted) - lua - CLIENT_SIDE == set(), "granted but never used"
