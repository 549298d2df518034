"""A full output disk pauses the worker: nothing is acked or dead-lettered, no partial
JPEG appears, results.json stays valid, and every task completes once space returns."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from returner.stream import Keys
from tests.conftest import CLEAN_DOT_FILES, Frames, dot_files, read_results, wait_for
from tests.e2e.test_run import free_port, results_count


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs: room for a few 1 MB JPEGs and no more."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def test_full_disk_pauses_then_completes(tiny_disk: Path, service, service_env: dict[str, str],
                                         r: redis.Redis, queue: str, frames: Frames) -> None:
    count = 20
    rng = np.random.default_rng(1)
    for i in range(count):  # noise: about 1.5 MB of JPEG each, four fill the disk
        noise = rng.integers(0, 256, (1448, 1024, 3), dtype=np.uint8)
        r.rpush(queue, frames.task(noise, "req", f"img_{i}"))
    out = tiny_disk / "out"
    port = free_port()
    env = {**service_env, "OUTPUT_DIR": str(out), "METRICS_PORT": str(port),
           "MAX_DELIVERIES": "2", "BATCH_SIZE": "4"}
    svc = service(env).start()
    wait_for(lambda: "output disk failing" in svc.logs(None), timeout=60, what="a disk pause")
    wait_for(lambda: readyz(port) == 503, what="not ready while paused")
    done = results_count(out)
    assert 0 < done < count
    stream = Keys.for_queue(queue).stream
    assert r.xlen(f"{{{queue}}}:dead") == 0
    assert r.xlen(stream) + r.llen(queue) == count - done  # nothing acked beyond the results
    visible = sorted(p.name for p in out.glob("*.jpg"))
    entries = read_results(out)  # valid JSON throughout
    assert visible == sorted(Path(e["file_path"]).name for e in entries)  # no partial JPEG

    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_disk)], check=True)
    wait_for(lambda: results_count(out) == count, timeout=90, what="every task after space returns")
    wait_for(lambda: readyz(port) == 200, what="ready again")
    assert svc.stop() == 0
    entries = read_results(out)
    assert {e["image_id"] for e in entries if e["status"] == "completed"} == {
        f"img_{i}" for i in range(count)}
    assert r.xlen(f"{{{queue}}}:dead") == 0, "valid frames were dead-lettered"
    assert r.xlen(stream) == 0
    assert not any(frames.exists(n) for n in frames.names)
    assert dot_files(out) == CLEAN_DOT_FILES
