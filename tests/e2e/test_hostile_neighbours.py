"""Hostile neighbours end to end: what another local user could plant or change in
OUTPUT_DIR, against the real CLI and a real service."""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.conftest import Frames, random_frame, read_results, read_view, wait_for
from tests.e2e.conftest import Service, run_cli

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="giving files away needs root")


@pytest.mark.parametrize("what", ["group-writable", "world-writable", "another owner"])
def test_start_is_refused_when_output_dir_is_not_private(
    what: str, service_env: dict[str, str], output_dir: Path, tmp_path: Path
) -> None:
    output_dir.mkdir()
    if what == "another owner":
        os.chown(output_dir, 65534, 65534)
    else:
        os.chmod(output_dir, 0o775 if what == "group-writable" else 0o777)
    done = run_cli("run", env=service_env, cwd=tmp_path, timeout=30)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert str(output_dir) in line
    assert ("chown" if what == "another owner" else "chmod go-w") in line


def test_start_is_refused_when_the_store_is_writable_by_others(
    service_env: dict[str, str], output_dir: Path, tmp_path: Path
) -> None:
    output_dir.mkdir()
    store = output_dir / ".results.db"
    store.touch()
    os.chmod(store, 0o666)
    done = run_cli("run", env=service_env, cwd=tmp_path, timeout=30)
    assert done.returncode == 2 and f"chmod go-w {store}" in done.stderr


def test_a_link_planted_as_the_lock_is_refused_and_its_target_untouched(
    service_env: dict[str, str], output_dir: Path, tmp_path: Path
) -> None:
    output_dir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (output_dir / ".results.lock").symlink_to(victim)
    done = run_cli("run", env=service_env, cwd=tmp_path, timeout=30)
    assert done.returncode == 1 and ".results.lock" in done.stderr
    assert victim.read_text() == "precious"


def test_the_private_files_are_0600_and_a_held_view_lock_stops_no_commit(
    service: Callable[..., Service], r: redis.Redis, queue: str, output_dir: Path,
    frames: Frames,
) -> None:
    """Finding 3: a user holding `.results.lock` stopped every commit. Now only the view
    waits for it; the tasks complete and the view catches up once it is let go."""
    svc = service().start()
    svc.wait_ready()
    for name in (".results.db", ".results.lock"):
        assert stat.S_IMODE((output_dir / name).stat().st_mode) == 0o600, name
    holder = os.open(output_dir / ".results.lock", os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        for i in range(5):
            r.rpush(queue, frames.task(random_frame((32, 32, 3), seed=i), "req", f"img_{i}"))
        wait_for(lambda: len(read_results(output_dir)) == 5, what="five records")
        assert len(read_view(output_dir)) == 0  # the view waits for the lock
    finally:
        os.close(holder)
    wait_for(lambda: len(read_view(output_dir)) == 5, what="the view to catch up")
    assert svc.stop() == 0


def test_a_fifo_at_results_json_hangs_nothing(
    service: Callable[..., Service], r: redis.Redis, queue: str, output_dir: Path,
    frames: Frames,
) -> None:
    """Finding 6: a FIFO planted at results.json hung start-up."""
    output_dir.mkdir()
    os.mkfifo(output_dir / "results.json")
    svc = service().start()
    svc.wait_ready()
    r.rpush(queue, frames.task(random_frame((32, 32, 3)), "req", "img"))
    wait_for(lambda: len(read_results(output_dir)) == 1, what="the record")
    assert svc.stop() == 0
    assert stat.S_ISREG((output_dir / "results.json").lstat().st_mode)
