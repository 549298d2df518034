"""returner.producer against a real redis-server and real POSIX shared memory, and the
hazard it exists for: a renderer that makes its segments with `SharedMemory(create=True)`
loses its queued frames when it exits."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis

from returner.errors import RedisUnavailable
from returner.producer import (
    InvalidFrame,
    NotReplicated,
    Producer,
)
from returner.settings import DEFAULT_SHM_NAME_PATTERN, Settings
from tests.conftest import Frames, random_frame, read_results
from tests.test_worker import running

MakeSettings = Callable[..., Settings]
SHAPE = (64, 48, 3)
QUEUED = 20


def segments() -> set[str]:
    return set(os.listdir("/dev/shm"))


def sent(r: redis.Redis, queue: str) -> list[dict[str, object]]:
    return [json.loads(m) for m in r.lrange(queue, 0, -1)]


def test_a_segment_is_private_untracked_named_for_the_default_pattern_and_exact(
    redis_url: str, r: redis.Redis, queue: str, frames: Frames
) -> None:
    frame = random_frame(SHAPE, seed=3)
    task = Producer(redis_url, queue).publish(frame, "req", "img", "RGB")
    frames.names.append(task.shm_name)

    assert re.fullmatch(DEFAULT_SHM_NAME_PATTERN, task.shm_name)
    path = Path("/dev/shm", task.shm_name)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == frame.tobytes()
    [doc] = sent(r, queue)
    assert doc == {"request_id": "req", "image_id": "img", "channel_order": "RGB",
                   "shm_info": {"shm_name": task.shm_name, "shape": list(SHAPE),
                                "dtype": "uint8", "size": frame.nbytes}}
    assert json.loads(task.message) == doc


def test_publish_many_pushes_a_batch_in_one_rpush(
    redis_url: str, r: redis.Redis, queue: str, frames: Frames
) -> None:
    before = r.info("commandstats").get("cmdstat_rpush", {}).get("calls", 0)
    items = [(random_frame((8, 8), seed=i), "req", f"img_{i}") for i in range(10)]
    items.append((random_frame((8, 8, 4), seed=99), "req", "rgba", "BGRA"))
    tasks = Producer(redis_url, queue).publish_many(items)
    frames.names += [t.shm_name for t in tasks]

    assert r.info("commandstats")["cmdstat_rpush"]["calls"] == before + 1
    assert [d["image_id"] for d in sent(r, queue)] == [f"img_{i}" for i in range(10)] + ["rgba"]
    assert sent(r, queue)[-1]["channel_order"] == "BGRA"


@pytest.mark.parametrize(("frame", "order"), [
    (np.zeros((4, 4, 3), np.float32), None),
    (np.zeros((4, 4, 2), np.uint8), None),
    (np.zeros((4,), np.uint8), None),
    (np.zeros((4, 4, 3), np.uint8), "GRAY"),
    (np.zeros((0, 4, 3), np.uint8), None),
])
def test_an_invalid_frame_makes_nothing(redis_url: str, r: redis.Redis, queue: str,
                                        frame: np.ndarray, order: str | None) -> None:
    before = segments()
    good = (np.zeros((4, 4, 3), np.uint8), "req", "ok")
    with pytest.raises(InvalidFrame):
        Producer(redis_url, queue).publish_many([good, (frame, "req", "bad", order)])
    assert segments() - before == set()
    assert r.llen(queue) == 0


def test_redis_down_removes_the_segments_and_pushes_nothing(queue: str) -> None:
    before = segments()
    producer = Producer("redis://127.0.0.1:1/0", queue, cluster=False)
    with pytest.raises(RedisUnavailable):
        producer.publish_many([(random_frame(SHAPE, seed=i), "req", f"i{i}") for i in range(3)])
    assert segments() - before == set()


def test_a_shortfall_of_replicas_is_reported_after_the_push(
    redis_url: str, r: redis.Redis, queue: str, frames: Frames
) -> None:
    producer = Producer(redis_url, queue, wait_replicas=1, wait_timeout_ms=10)
    with pytest.raises(NotReplicated) as raised:
        producer.publish(random_frame(SHAPE), "req", "img")
    [task] = raised.value.tasks
    frames.names.append(task.shm_name)
    assert Path("/dev/shm", task.shm_name).exists()  # pushed: the returner's now
    assert r.llen(queue) == 1


RENDERER = textwrap.dedent("""
    import sys
    import numpy as np
    import redis
    url, queue, how, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    frames = [np.full((64, 48, 3), i, np.uint8) for i in range(count)]
    if how == "upstream":  # the upstream renderer's create_shm_from_array
        import json
        from multiprocessing.shared_memory import SharedMemory
        client = redis.Redis.from_url(url)
        for i, frame in enumerate(frames):
            shm = SharedMemory(name=f"img_shm_{i:04x}{sys.argv[5]}", create=True,
                               size=frame.nbytes)
            np.ndarray(frame.shape, np.uint8, shm.buf)[...] = frame
            client.rpush(queue, json.dumps({"request_id": "render", "image_id": f"p{i}",
                "shm_info": {"shm_name": shm.name, "shape": list(frame.shape),
                             "dtype": "uint8", "size": frame.nbytes}}))
            shm.close()
    elif how == "producer":
        from returner.producer import Producer
        Producer(url, queue).publish_many([(f, "render", f"p{i}") for i, f in enumerate(frames)])
    elif how == "killed":  # dies between making its segments and pushing them
        import os, signal
        from returner.producer import Producer
        Producer._push = lambda self, messages: os.kill(os.getpid(), signal.SIGKILL)
        Producer(url, queue).publish_many([(f, "render", f"p{i}") for i, f in enumerate(frames)])
""")


def render_and_exit(redis_url: str, queue: str, how: str) -> subprocess.CompletedProcess[str]:
    tag = os.urandom(4).hex()
    return subprocess.run([sys.executable, "-c", RENDERER, redis_url, queue, how, str(QUEUED),
                           tag], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("how", ["upstream", "producer"])
def test_a_renderer_exits_with_frames_queued(how: str, make_settings: MakeSettings,
                                             redis_url: str, r: redis.Redis, queue: str,
                                             output_dir: Path, frames: Frames) -> None:
    """The upstream pattern loses every queued frame to its resource tracker at exit; the
    same renderer on returner.producer loses none."""
    done = render_and_exit(redis_url, queue, how)
    assert done.returncode == 0, done.stderr
    assert r.llen(queue) == QUEUED
    frames.names += [d["shm_info"]["shm_name"] for d in sent(r, queue)]  # type: ignore[index]

    with running(make_settings()) as run:
        run.settled(QUEUED)
        missing = run.metrics.registry.get_sample_value(
            "returner_errors_total", {"kind": "missing_segment"})

    records = read_results(output_dir)
    statuses = {rec["status"] for rec in records}
    print(f"\n{how}: {len(records)} records {sorted(statuses)}, {missing:.0f} missing segments")
    assert len(records) == QUEUED
    if how == "upstream":
        assert "leaked shared_memory" in done.stderr  # the tracker's own warning
        assert statuses == {"failed"} and missing == QUEUED
        assert all("does not exist" in rec["error"] for rec in records)
    else:
        assert statuses == {"completed"} and missing == 0


def test_a_renderer_killed_before_its_push_leaks_only_that_batch(
    redis_url: str, r: redis.Redis, queue: str
) -> None:
    """Nothing is pushed. Its segments stay: no process is left to remove them, and the
    returner never heard of them (see the README)."""
    before = segments()
    done = render_and_exit(redis_url, queue, "killed")
    assert done.returncode == -9
    leaked = {n for n in segments() - before if n.startswith("img_shm_")}
    for name in leaked:
        os.unlink(Path("/dev/shm", name))
    print(f"\nkilled between its segments and its push: {len(leaked)} segments leaked")
    assert r.llen(queue) == 0
    assert len(leaked) == QUEUED


FULL = textwrap.dedent("""
    import os, sys
    import numpy as np
    from returner.producer import Producer, SharedMemoryFull
    producer = Producer(sys.argv[1], sys.argv[2])
    small = [(np.zeros((256, 256, 3), np.uint8), "req", f"s{i}") for i in range(3)]
    big = (np.zeros((1024, 1024, 3), np.uint8), "req", "big")  # 3 MiB: no room
    try:
        producer.publish_many(small + [big])
    except SharedMemoryFull as exc:
        print("full:", exc)
    print("left:", sorted(os.listdir("/dev/shm")))
""")


def test_a_full_dev_shm_is_a_clear_error_with_nothing_left_or_pushed(
    redis_url: str, r: redis.Redis, queue: str
) -> None:
    """/dev/shm is a 1 MiB tmpfs in a mount namespace of the child's own."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a private tmpfs on /dev/shm needs root and unshare")
    script = (f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} -c "
              f"\"$0\" {redis_url} {queue}")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                           FULL], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "full: /dev/shm has no room for a 3145728-byte frame" in done.stdout
    assert "left: []" in done.stdout
    assert r.llen(queue) == 0
