"""kill -9 mid-stream, several times: nothing lost, nothing doubled, no orphans."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from pathlib import Path

import redis

from returner.stream import Keys
from tests.conftest import CLEAN_DOT_FILES, Frames, dot_files, random_frame, read_results, wait_for
from tests.e2e.test_run import results_count


class ResultsReader(threading.Thread):
    """Reads results.json in a loop and counts reads that were not a valid JSON array."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.reads, self.invalid = path, 0, 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                continue  # before the service first started
            self.reads += 1
            try:
                if not isinstance(json.loads(data), list):
                    self.invalid += 1
            except ValueError:
                self.invalid += 1


def test_kill9_mid_stream(service, r: redis.Redis, queue: str, output_dir: Path,
                          frames: Frames) -> None:
    count, kills = 200, 6
    rng = random.Random(7)
    for i in range(count):
        frame = random_frame((724, 512, 3), seed=i % 8)
        r.rpush(queue, frames.task(frame, f"req_{i}", f"img_{i}"))
    reader = ResultsReader(output_dir / "results.json")
    reader.start()

    for _ in range(kills):
        svc = service().start()
        target = min(count - 10, results_count(output_dir) + rng.randint(3, 25))
        wait_for(lambda t=target: results_count(output_dir) >= t, timeout=60,
                 what="progress before the kill")
        time.sleep(rng.uniform(0, 0.03))  # land the kill at a random point of the next batch
        svc.kill9()

    final = service().start()
    starts = [service_log for service_log in sorted(output_dir.parent.glob("service-*.log"))]
    wait_for(lambda: len(completed_ids(output_dir)) == count, timeout=120, what="every task")
    assert final.stop() == 0
    reader.halt.set()
    reader.join()

    results = read_results(output_dir)
    completed = Counter(e["image_id"] for e in results if e["status"] == "completed")
    assert set(completed) == {f"img_{i}" for i in range(count)}, "lost tasks"
    assert max(completed.values()) == 1, "duplicate completed entries"
    referenced = Counter(Path(e["file_path"]).name for e in results if e["file_path"])
    on_disk = {p.name for p in output_dir.glob("*.jpg")}
    assert on_disk == set(referenced), "orphan or missing JPEGs"
    assert max(referenced.values()) == 1
    assert reader.reads > 0 and reader.invalid == 0
    recovered = sum("recovering" in log.read_text() for log in starts)
    assert recovered >= 1, "no kill landed on work in flight"
    assert not any(frames.exists(n) for n in frames.names)
    assert r.xlen(Keys.for_queue(queue).stream) == 0
    assert dot_files(output_dir) == CLEAN_DOT_FILES


def completed_ids(output_dir: Path) -> set[str]:
    return {e["image_id"] for e in read_results(output_dir) if e["status"] == "completed"}
