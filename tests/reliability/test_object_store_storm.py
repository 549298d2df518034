"""A storm of `kill -9`s with JPEGs in an object store (SeaweedFS, a server of this test's
own), and the store itself killed -9 and stalled (SIGSTOP) under load: nothing lost,
nothing doubled, every object under the prefix referenced by exactly one completed
record and every such record's object there, one event and one result-list message per
settled delivery.

CI runs a shorter storm; RETURNER_STORM_TASKS=3000 RETURNER_STORM_KILLS=40 runs the
full one (docs/reliability.md has its figures)."""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from returner.stream import Keys
from tests.conftest import Frames, count_records, random_frame, read_results, wait_for
from tests.e2e.conftest import Service
from tests.reliability.test_crash_storm import aim, push_tasks
from tests.s3support import SeaweedS3

TASKS = int(os.environ.get("RETURNER_STORM_TASKS", "900"))
KILLS = int(os.environ.get("RETURNER_STORM_KILLS", "12"))
SHAPE = (96, 128, 3)
SEED = 20_261_203
MODES = ("progress", "delay", "spawn", "commit")
PREFIX = "storm"


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path / "seaweedfs")
    server.start()
    yield server
    server.close()


def store_fault(k: int, server: SeaweedS3, output_dir: Path) -> None:
    """A third of the way in, kill the store under load and start it again; two thirds
    in, stall it for a few seconds."""
    if k == KILLS // 3:
        wait_for(lambda: count_records(output_dir) > 0, timeout=60, what="work before")
        server.kill()
        time.sleep(1.0)  # the returner meets a store that is down, then one coming back
        server.start()
    elif k == 2 * KILLS // 3:
        server.pause()
        time.sleep(3.0)  # longer than nothing, shorter than the request timeout: a stall
        server.resume()


def test_object_store_crash_storm(
    service: Callable[..., Service], service_env: dict[str, str], own_s3: SeaweedS3,
    r: redis.Redis, queue: str, output_dir: Path, frames: Frames,
) -> None:
    bucket = own_s3.create_bucket("storm")
    env = {**service_env, **own_s3.env(), "OBJECT_STORE_URL": f"s3://{bucket}/{PREFIX}",
           "SUCCESS_QUEUE": f"{queue}:success", "ERROR_QUEUE": f"{queue}:error"}
    started, rng = time.monotonic(), random.Random(SEED)
    palette = [random_frame(SHAPE, seed=s) for s in range(8)]
    push_tasks(r, queue, frames, range(TASKS * 3 // 5), palette)
    runs: list[Service] = []
    for k in range(KILLS):
        if k == KILLS // 2:
            push_tasks(r, queue, frames, range(TASKS * 3 // 5, TASKS), palette)
        svc = service(env).start()
        runs.append(svc)
        store_fault(k, own_s3, output_dir)
        aim(MODES[k % len(MODES)], svc, output_dir, rng)
        assert svc.alive(), f"run {k} died before the kill:\n{svc.logs()}"
        svc.kill9()
    final = service(env).start()
    wait_for(lambda: count_records(output_dir) >= TASKS and r.xlen(Keys.for_queue(queue).stream)
             == 0 and r.llen(queue) == 0, timeout=180, what="every task")
    assert final.stop() == 0, final.logs()

    results = read_results(output_dir)
    completed = Counter(e["image_id"] for e in results if e["status"] == "completed")
    expected = {f"img_{i}" for i in range(TASKS)}
    referenced = Counter(e["image_url"].removeprefix(f"s3://{bucket}/")
                         for e in results if e["status"] == "completed")
    paginator = own_s3.admin.get_paginator("list_objects_v2")
    stored = {o["Key"] for page in paginator.paginate(Bucket=bucket) for o in
              page.get("Contents", [])}
    keys = Keys.for_queue(queue)
    events = r.xlen(keys.events)
    success = [json.loads(m) for m in r.lrange(f"{queue}:success", 0, -1)]
    print(f"\nobject-store storm: {TASKS} tasks, {KILLS} kills, store killed and stalled; "
          f"lost {len(expected - set(completed))}, duplicates "
          f"{sum(n - 1 for n in completed.values())}, orphan objects "
          f"{len(stored - set(referenced))}, missing objects {len(set(referenced) - stored)}, "
          f"events {events}, success messages {len(success)}, "
          f"{time.monotonic() - started:.1f}s")
    assert set(completed) == expected and max(completed.values()) == 1
    assert {e["status"] for e in results} == {"completed"} and len(results) == TASKS
    assert stored == set(referenced), (sorted(stored - set(referenced))[:5],
                                       sorted(set(referenced) - stored)[:5])
    assert max(referenced.values()) == 1, "an object referenced by two records"
    assert all(k.startswith(f"{PREFIX}/") for k in stored)
    assert len(success) == events >= TASKS  # one message per settled delivery
    assert {m["image_id"] for m in success} == expected
    assert r.llen(f"{queue}:error") == 0 and r.xlen(keys.dead) == 0
    assert not list(output_dir.glob("*.jpg"))
    assert sum(frames.exists(n) for n in frames.names) == 0
