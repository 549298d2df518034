"""A storm of `kill -9`s: thousands of tasks, a kill at a random moment of every run
(some aimed at the commit), a restart after each. Nothing is lost, nothing doubled, no
orphan is left, no record points to a missing file, and results.json is a valid document
at every read."""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import redis

from returner.stream import Keys
from tests.conftest import (
    CLEAN_DOT_FILES,
    Frames,
    count_records,
    dot_files,
    random_frame,
    read_results,
    wait_for,
)
from tests.e2e.conftest import Service
from tests.e2e.test_crash import ResultsReader, completed_ids

SHAPE = (96, 128, 3)
TASKS = 3000
FIRST_WAVE = 1800  # pushed before the storm; the rest halfway through it
KILLS = 40
SEED = 20_240_611
# Where a kill lands: right after progress is seen, a random delay after the worker is
# ready, a random delay after the process was spawned (start-up and recovery included),
# the instant a temp file appears (a JPEG or the view being written), the instant the
# store's WAL changes (a commit: the JPEGs are not renamed yet, nothing is acked).
MODES = ("progress", "delay", "spawn", "temp", "commit")


def push_tasks(r: redis.Redis, queue: str, frames: Frames, ids: Sequence[int],
               palette: Sequence[np.ndarray]) -> None:
    """One segment and one RPUSH per task, as the renderer does."""
    pipe = r.pipeline(transaction=False)
    for i in ids:
        pipe.rpush(queue, frames.task(palette[i % len(palette)], f"req_{i % 7}", f"img_{i}"))
    pipe.execute()


def current_results(output_dir: Path) -> int:
    return count_records(output_dir)


def temp_files(output_dir: Path) -> set[str]:
    return {str(p) for p in output_dir.glob(".tmp/*/*")}


def results_stamp(output_dir: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(output_dir / ".results.db-wal")
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def aim(mode: str, svc: Service, output_dir: Path, rng: random.Random) -> None:
    """Return at the moment the kill should land."""
    if mode == "spawn":
        time.sleep(rng.uniform(0.05, 0.7))
        return
    if mode == "progress":
        target = min(TASKS, current_results(output_dir) + rng.randint(1, 60))
        wait_for(lambda: current_results(output_dir) >= target or not svc.alive(),
                 timeout=60, interval=0.002, what="progress before the kill")
        return
    svc.wait_ready()
    if mode == "delay":
        time.sleep(rng.uniform(0.0, 0.06))
        return
    watch: Callable[[], object]
    if mode == "temp":
        before = temp_files(output_dir)
        watch = lambda: temp_files(output_dir) - before  # noqa: E731
    else:
        stamp = results_stamp(output_dir)
        watch = lambda: results_stamp(output_dir) != stamp  # noqa: E731
    wait_for(lambda: watch() or not svc.alive(), timeout=60, interval=0.0,
             what=f"a {mode} to aim the kill at")


def settled_lines(logs: str, word: str) -> int:
    return sum(1 for line in logs.splitlines() if f" {word}" in line and "(entry " in line
               and "/img_" in line)


def test_crash_storm(service: Callable[..., Service], r: redis.Redis, queue: str,
                     output_dir: Path, frames: Frames) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    palette = [random_frame(SHAPE, seed=s) for s in range(8)]
    push_tasks(r, queue, frames, range(FIRST_WAVE), palette)
    reader = ResultsReader(output_dir / "results.json")
    reader.start()

    runs: list[Service] = []
    modes: list[str] = []
    for k in range(KILLS):
        if k == KILLS // 2:
            push_tasks(r, queue, frames, range(FIRST_WAVE, TASKS), palette)
        svc = service().start()
        runs.append(svc)
        mode = MODES[k % len(MODES)] if k < len(MODES) else rng.choice(MODES)
        modes.append(mode)
        aim(mode, svc, output_dir, rng)
        assert svc.alive(), f"run {k} ({mode}) died before the kill:\n{svc.logs()}"
        svc.kill9()
    storm_done = current_results(output_dir)

    final = service().start()
    runs.append(final)
    wait_for(lambda: len(completed_ids(output_dir)) == TASKS, timeout=90, what="every task")
    assert final.stop() == 0, final.logs()
    reader.halt.set()
    reader.join()
    elapsed = time.monotonic() - started

    results = read_results(output_dir)
    completed = Counter(e["image_id"] for e in results if e["status"] == "completed")
    expected = {f"img_{i}" for i in range(TASKS)}
    lost = len(expected - set(completed))
    duplicates = sum(n - 1 for n in completed.values())
    referenced = Counter(Path(e["file_path"]).name for e in results if e["file_path"])
    on_disk = {p.name for p in output_dir.glob("*.jpg")}
    orphans = len(on_disk - set(referenced))
    missing = len(set(referenced) - on_disk)
    segments_left = sum(frames.exists(n) for n in frames.names)
    logs = [svc.logs(None) for svc in runs]
    in_flight = sum("recovering entry" in logs[k + 1] for k in range(KILLS))
    recovered = sum(text.count("recovering entry") for text in logs)
    swept = sum(text.count("finished the work of a writer that died") for text in logs)
    redelivered_dups = sum(settled_lines(text, "duplicate") for text in logs)
    keys = Keys.for_queue(queue)

    print(f"\ncrash storm: {TASKS} tasks, {KILLS} kills ({in_flight} with work in flight; "
          f"{recovered} entries recovered, {redelivered_dups} settled as duplicates, "
          f"{swept} dead writers' moves finished and temp files removed; "
          f"{storm_done} done during the storm), lost {lost}, duplicate completed "
          f"{duplicates}, orphans {orphans}, events {r.xlen(keys.events)}, reads "
          f"{reader.reads}, invalid reads "
          f"{reader.invalid}, segments left {segments_left}, {elapsed:.1f}s; "
          f"modes {dict(Counter(modes))}")

    assert len(runs) == KILLS + 1 and len(set(modes)) == len(MODES)
    assert lost == 0, f"lost: {sorted(expected - set(completed))[:10]}"
    assert duplicates == 0, [k for k, n in completed.items() if n > 1][:10]
    assert len(results) == TASKS and {e["status"] for e in results} == {"completed"}
    assert orphans == 0 and missing == 0, (sorted(on_disk - set(referenced))[:10],
                                           sorted(set(referenced) - on_disk)[:10])
    assert max(referenced.values()) == 1, "a JPEG referenced by two entries"
    assert reader.invalid == 0, f"{reader.invalid} invalid reads of results.json"
    assert reader.reads >= 2000, f"only {reader.reads} reads of results.json"
    assert segments_left == 0
    assert r.llen(queue) == 0 and r.xlen(keys.stream) == 0 and r.xlen(keys.dead) == 0
    assert r.xpending(keys.stream, "returner")["pending"] == 0
    assert in_flight >= KILLS // 2, f"only {in_flight} kills landed with work in flight"
    # One event per settled entry, whatever the kills: none lost, none extra.
    events = [fields for _, fields in r.xrange(keys.events)]
    assert len(events) == TASKS, f"{len(events)} events for {TASKS} settled entries"
    assert len({e[b"entry_id"] for e in events}) == TASKS
    assert {e[b"image_id"].decode() for e in events} == expected
    assert {e[b"status"] for e in events} == {b"completed"}
    assert dot_files(output_dir) == CLEAN_DOT_FILES
