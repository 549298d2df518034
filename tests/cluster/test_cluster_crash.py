"""`kill -9` of a worker in the middle of its batches on a Redis Cluster, restarted under
the same CONSUMER_NAME each time: nothing lost, nothing doubled, no orphan, every
segment released. The cluster counterpart of tests/e2e/test_crash.py; the kills are
aimed as in tests/reliability/test_crash_storm.py (at a JPEG or results.json being
written, and at the instant results.json is replaced, before the ack)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.cluster.conftest import Cluster, Services
from tests.cluster.support import (
    cluster_env,
    fresh_queue,
    not_owner,
    outputs,
    queue_state,
    segments_left,
)
from tests.conftest import CLEAN_DOT_FILES, Frames, random_frame, wait_for
from tests.e2e.conftest import Service
from tests.e2e.test_crash import ResultsReader, completed_ids
from tests.reliability.test_crash_storm import aim, push_tasks, settled_lines

SHAPE = (192, 256, 3)
TASKS = 400
KILLS = 4
MODES = ("temp", "commit")  # mid-batch: files being written; committed but not acked
SEED = 4242


@pytest.mark.timeout(180)
def test_kill9_mid_batch_and_restart_on_the_cluster(
    redis_cluster: Cluster, services: Services, output_dir: Path, frames: Frames
) -> None:
    """Each kill lands in a batch of new entries, once the run has finished recovering
    (files being written, or results committed but not yet acked); each restart, as the
    same consumer, first recovers its own pending entries. In the end every task has
    exactly one completed entry, every JPEG exactly one entry, every segment is gone and
    nothing is left in Redis."""
    cluster, rng = redis_cluster, random.Random(SEED)
    queue = fresh_queue(cluster, "crash")
    env = cluster_env(not_owner(cluster, queue).url, queue, output_dir, CONSUMER_NAME="crashy")
    palette = [random_frame(SHAPE, seed=s) for s in range(8)]
    push_tasks(cluster.client(), queue, frames, range(TASKS), palette)
    reader = ResultsReader(output_dir / "results.json")
    reader.start()

    runs: list[Service] = []
    try:
        for k in range(KILLS):
            svc = services(env).start()
            runs.append(svc)
            # past its own pending entries (each alone), into a batch of new ones
            wait_for(lambda s=svc: ", delivery 1)" in s.logs(None) or not s.alive(), timeout=60,
                     what="a batch of new entries")  # fmt: skip
            aim(MODES[k % len(MODES)], svc, output_dir, rng)
            assert svc.alive(), f"run {k} died before the kill:\n{svc.logs()}"
            svc.kill9()
            done = len(completed_ids(output_dir))
            assert done < TASKS, f"all {TASKS} tasks done after {k + 1} kills: too few tasks"
        final = services(env).start()
        runs.append(final)
        wait_for(lambda: len(completed_ids(output_dir)) == TASKS, timeout=90, what="every task")
        assert final.stop() == 0, final.logs()
    finally:
        reader.halt.set()
        reader.join()

    found = outputs(output_dir)
    logs = [svc.logs(None) for svc in runs]
    recovered = [text.count("recovering entry") for text in logs[1:]]
    duplicates = sum(settled_lines(text, "duplicate") for text in logs)
    print(
        f"\ncluster crash: {TASKS} tasks, {KILLS} kills; entries recovered per restart "
        f"{recovered}, settled as duplicates {duplicates}, reads {reader.reads}"
    )
    assert set(found.completed) == {f"img_{i}" for i in range(TASKS)}, "lost tasks"
    assert found.duplicates == 0, found.completed.most_common(3)
    assert {e["status"] for e in found.results} == {"completed"}
    assert not found.orphans and not found.missing and found.shared_names == 0
    assert found.dot_files == CLEAN_DOT_FILES
    assert reader.reads > 0 and reader.invalid == 0
    assert all(recovered), f"a restart found nothing of its own to recover: {recovered}"
    assert segments_left(frames) == []
    state = queue_state(cluster, queue)
    assert state.drained and state.dead_letters == 0
    assert state.consumers == {"crashy": 0}, "a restart joined under another name"
