"""Events end to end: `returner wait` and `returner events` as subprocesses against a
real service, real Redis and real shared memory."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import redis

from returner.stream import Keys
from tests.conftest import Frames, random_frame, wait_for
from tests.e2e.conftest import Service, run_cli

SHAPE = (48, 64, 3)


def cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """A CLI command left running, its output collected when it ends."""
    return subprocess.Popen([sys.executable, "-m", "returner", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def push(r: redis.Redis, queue: str, frames: Frames, request_id: str, *image_ids: str) -> None:
    for i, image_id in enumerate(image_ids):
        r.rpush(queue, frames.task(random_frame(SHAPE, seed=i), request_id, image_id))


def test_wait_started_before_the_pushes_returns_when_all_completed(
    service: Callable[..., Service], service_env: dict[str, str], r: redis.Redis, queue: str,
    frames: Frames, tmp_path: Path,
) -> None:
    svc = service().start()
    svc.wait_ready()
    waiting = cli("wait", "req_w", "a", "b", "--timeout", "30", env=service_env, cwd=tmp_path)
    push(r, queue, frames, "req_other", "a")  # same image id, another request: not it
    push(r, queue, frames, "req_w", "a", "b")
    out, err = waiting.communicate(timeout=40)
    assert waiting.returncode == 0, err
    assert sorted(line.split()[0] for line in out.splitlines()) == ["a", "b"]
    assert all(Path(line.split()[2]).is_file() for line in out.splitlines())
    assert svc.stop() == 0


def test_wait_started_after_the_pushes_reads_the_earlier_events(
    service: Callable[..., Service], service_env: dict[str, str], r: redis.Redis, queue: str,
    frames: Frames, tmp_path: Path,
) -> None:
    push(r, queue, frames, "req_late", "x", "y")
    svc = service().start()
    wait_for(lambda: r.xlen(Keys.for_queue(queue).events) == 2, what="two events")
    assert svc.stop() == 0  # nothing is serving any more: only the history can answer

    done = run_cli("wait", "req_late", "x", "y", "--timeout", "5", env=service_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_wait_exits_1_when_an_image_failed(
    service: Callable[..., Service], service_env: dict[str, str], r: redis.Redis, queue: str,
    frames: Frames, tmp_path: Path,
) -> None:
    svc = service().start()
    svc.wait_ready()
    waiting = cli("wait", "req_f", "good", "gone", "--timeout", "30", env=service_env,
                  cwd=tmp_path)
    push(r, queue, frames, "req_f", "good")
    missing = {"request_id": "req_f", "image_id": "gone", "shm_info": {
        "shm_name": "img_shm_0badc0de", "shape": [4, 4, 3], "dtype": "uint8", "size": 48}}
    r.rpush(queue, json.dumps(missing))
    _, err = waiting.communicate(timeout=40)
    assert waiting.returncode == 1
    assert "req_f/gone failed" in err and "does not exist" in err
    assert svc.stop() == 0


def test_wait_times_out_with_124(service_env: dict[str, str], tmp_path: Path) -> None:
    done = run_cli("wait", "req_never", "img", "--timeout", "0.5", env=service_env, cwd=tmp_path)
    assert done.returncode == 124
    assert "timed out waiting for req_never: img" in done.stderr


def test_events_follow_sees_a_push_made_while_it_runs(
    service: Callable[..., Service], service_env: dict[str, str], r: redis.Redis, queue: str,
    frames: Frames, tmp_path: Path,
) -> None:
    push(r, queue, frames, "req_e", "before")
    svc = service().start()
    wait_for(lambda: r.xlen(Keys.for_queue(queue).events) == 1, what="the first event")
    follower = cli("events", "--follow", "--json", env=service_env, cwd=tmp_path)
    assert follower.stdout is not None
    first = json.loads(follower.stdout.readline())
    assert (first["image_id"], first["outcome"]) == ("before", "completed")
    push(r, queue, frames, "req_e", "during")
    second = json.loads(follower.stdout.readline())
    assert (second["image_id"], second["status"]) == ("during", "completed")
    assert Path(second["file_path"]).is_file()
    follower.terminate()
    assert follower.wait(timeout=10) == 0
    assert svc.stop() == 0

    table = run_cli("events", "--request-id", "req_e", env=service_env, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "before" in table.stdout and "during" in table.stdout
