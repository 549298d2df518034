"""Pending entries of a dead consumer, the replay commands and status, through the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis

from returner.stream import Consumer
from tests.conftest import Frames, dead_lettered, random_frame, read_results, wait_for
from tests.e2e.conftest import run_cli
from tests.e2e.test_run import results_count


def strand(r: redis.Redis, queue: str, frames: Frames, count: int, consumer: str = "ghost"
           ) -> Consumer:
    """Push tasks and leave them pending under a consumer that never acks (a dead worker)."""
    for i in range(count):
        r.rpush(queue, frames.task(random_frame((64, 48, 3), seed=i), "req", f"img_{i}"))
    ghost = Consumer(r, queue, "returner", consumer)
    ghost.stream.ensure_group()
    assert len(ghost.fetch(count)) == count
    return ghost


def test_dead_consumers_entries_are_claimed(service, service_env: dict[str, str], r: redis.Redis,
                                            queue: str, output_dir: Path, frames: Frames) -> None:
    strand(r, queue, frames, 5)
    svc = service({**service_env, "CLAIM_MIN_IDLE_MS": "300"}).start()
    wait_for(lambda: results_count(output_dir) == 5, what="claimed entries completed")
    assert svc.stop() == 0
    assert {e["status"] for e in read_results(output_dir)} == {"completed"}
    assert r.xpending(f"{{{queue}}}:stream", "returner")["pending"] == 0
    assert not any(frames.exists(n) for n in frames.names)


def test_replay_pending(service_env: dict[str, str], r: redis.Redis, queue: str,
                        output_dir: Path, frames: Frames, tmp_path: Path) -> None:
    strand(r, queue, frames, 4)
    left_alone = run_cli("replay", "--pending", env=service_env, cwd=tmp_path)
    assert left_alone.returncode == 0, left_alone.stderr
    assert "claimed 0" in left_alone.stdout  # default min idle: a live worker's entries stay

    done = run_cli("replay", "--pending", "--min-idle", "0", env=service_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "claimed 4: completed 4" in done.stdout
    assert len(read_results(output_dir)) == 4
    assert r.xpending(f"{{{queue}}}:stream", "returner")["pending"] == 0


def test_replay_dead_letters(service, service_env: dict[str, str], r: redis.Redis, queue: str,
                             output_dir: Path, frames: Frames, tmp_path: Path) -> None:
    ghost = strand(r, queue, frames, 2)
    for entry in ghost.own_pending("0", 10)[0]:
        ghost.settle(dead_lettered(entry, "simulated outage"))
    assert r.xlen(f"{{{queue}}}:dead") == 2

    moved = run_cli("replay", "--dead-letter", env=service_env, cwd=tmp_path)
    assert moved.returncode == 0, moved.stderr
    assert "moved 2" in moved.stdout
    assert r.xlen(f"{{{queue}}}:dead") == 0
    svc = service().start()
    wait_for(lambda: results_count(output_dir) == 2, what="replayed tasks completed")
    assert svc.stop() == 0


def test_status_json(service_env: dict[str, str], r: redis.Redis, queue: str,
                     frames: Frames, tmp_path: Path) -> None:
    strand(r, queue, frames, 3)
    r.rpush(queue, b"waiting")
    shown = run_cli("status", "--json", env=service_env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["list_length"] == 1
    assert report["stream_length"] == 3
    assert report["pending"] == 3
    [ghost] = report["consumers"]
    assert ghost["name"] == "ghost" and ghost["pending"] == 3
    assert ghost["oldest_pending_ms"] >= 0
    assert report["dead_letters"] == 0


def test_unreachable_redis_is_a_clear_error(service_env: dict[str, str], tmp_path: Path) -> None:
    env = {**service_env, "REDIS_URL": "redis://127.0.0.1:1/0"}
    shown = run_cli("status", env=env, cwd=tmp_path)
    assert shown.returncode == 1
    assert "Traceback" not in shown.stderr and "returner:" in shown.stderr


def test_silent_consumer_recovered_in_seconds(service, service_env: dict[str, str],
                                              r: redis.Redis, queue: str, output_dir: Path,
                                              frames: Frames) -> None:
    """A crashed worker's entries are taken over after CONSUMER_TIMEOUT_MS, long before
    the default CLAIM_MIN_IDLE_MS of a minute."""
    strand(r, queue, frames, 3)
    started = time.monotonic()
    svc = service({**service_env, "CONSUMER_TIMEOUT_MS": "3000"}).start()
    wait_for(lambda: results_count(output_dir) == 3, timeout=30, what="rescued entries")
    assert time.monotonic() - started < 30
    assert svc.stop() == 0
    assert "consumer ghost silent" in svc.logs(None)
    assert r.xpending(f"{{{queue}}}:stream", "returner")["pending"] == 0
