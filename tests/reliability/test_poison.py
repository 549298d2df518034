"""A frame that kills the process every time is dead-lettered after MAX_DELIVERIES,
and the crashes count against it alone, not against the frames that shared its batch."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from tests.conftest import Frames, random_frame, read_results, wait_for
from tests.e2e.conftest import POISON_SEAM
from tests.e2e.test_run import results_count


def test_poison_frame_is_dead_lettered(service, service_env: dict[str, str], r: redis.Redis,
                                       queue: str, output_dir: Path, frames: Frames) -> None:
    max_deliveries, good = 3, 6
    ids = [f"img_{i}" for i in range(good)]
    ids.insert(2, "poison")
    messages = {i: frames.task(random_frame((64, 64, 3), seed=n), "req", i)
                for n, i in enumerate(ids)}
    for image_id in ids:  # all in one batch
        r.rpush(queue, messages[image_id])
    env = {**service_env, "MAX_DELIVERIES": str(max_deliveries),
           **POISON_SEAM, "RETURNER_TEST_CRASH_ON": "poison"}

    crashes = 0
    while results_count(output_dir) < len(ids):
        assert crashes <= max_deliveries, "the poison frame keeps coming back"
        svc = service(env).start()
        assert svc.proc is not None
        wait_for(lambda s=svc: results_count(output_dir) == len(ids) or not s.alive(),
                 timeout=30, what="a crash or the end")
        if svc.alive():
            assert svc.stop() == 0
        else:
            assert svc.proc.returncode == -9
            crashes += 1
    assert crashes == max_deliveries

    entries = read_results(output_dir)
    by_id = {e["image_id"]: e for e in entries}
    assert len(entries) == len(ids)
    assert by_id["poison"]["status"] == "failed"
    assert by_id["poison"]["error"] == f"gave up after {max_deliveries + 1} deliveries"
    assert all(by_id[i]["status"] == "completed" for i in ids if i != "poison")
    [(_, dead)] = r.xrange(f"{{{queue}}}:dead")
    assert dead[b"task"] == messages["poison"]
    assert int(dead[b"deliveries"]) == max_deliveries + 1
    poison_segment = json.loads(messages["poison"])["shm_info"]["shm_name"]
    assert frames.exists(poison_segment), "a valid frame given up keeps its segment for replay"
    assert r.xlen(f"{{{queue}}}:stream") == 0
