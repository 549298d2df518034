"""`returner run` end to end: real Redis, real shared memory, real files."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import redis
import simplejpeg

from returner.stream import Keys
from tests.conftest import (
    CLEAN_DOT_FILES,
    Frames,
    dot_files,
    psnr,
    random_frame,
    read_results,
    wait_for,
)
from tests.e2e.conftest import base_env

CASES = [  # (shape, explicit channel_order or None)
    ((120, 90), None),
    ((120, 90, 1), None),
    ((120, 90, 1), "GRAY"),
    ((96, 128, 3), None),
    ((96, 128, 3), "RGB"),
    ((96, 128, 3), "BGR"),
    ((80, 64, 4), None),
    ((80, 64, 4), "RGBA"),
    ((80, 64, 4), "BGRA"),
    ((1448, 1024, 3), "RGB"),
]


def true_rgb(frame: np.ndarray, order: str | None) -> np.ndarray:
    if frame.ndim == 2 or frame.shape[2] == 1:
        return frame.reshape(frame.shape[0], frame.shape[1], 1)
    rgb = frame[..., :3]
    return rgb[..., ::-1] if order and order.startswith("BGR") else rgb


def results_count(output_dir: Path) -> int:
    try:
        return len(read_results(output_dir))
    except (OSError, ValueError):
        return 0


def test_every_shape_and_order(service, r: redis.Redis, queue: str, output_dir: Path,
                               frames: Frames) -> None:
    sent = {}
    for i, (shape, order) in enumerate(CASES):
        frame = random_frame(shape, seed=i)
        r.rpush(queue, frames.task(frame, f"req_{i}", f"img_{i}", order))
        sent[f"img_{i}"] = (frame, order)
    svc = service().start()
    wait_for(lambda: results_count(output_dir) == len(CASES), what="all results")
    assert svc.stop() == 0

    results = read_results(output_dir)
    assert {e["status"] for e in results} == {"completed"}
    for entry in results:
        path = Path(entry["file_path"])
        assert path.is_absolute() and path.parent == output_dir.resolve()
        assert entry["timestamp"].endswith("+00:00")
        frame, order = sent[entry["image_id"]]
        gray = frame.ndim == 2 or frame.shape[2] == 1
        decoded = simplejpeg.decode_jpeg(path.read_bytes(), colorspace="GRAY" if gray else "RGB")
        assert psnr(decoded, true_rgb(frame, order)) >= 30, entry["image_id"]
    assert not any(frames.exists(n) for n in frames.names), "segments left behind"
    keys = Keys.for_queue(queue)
    assert r.xlen(keys.stream) == 0
    assert r.xpending(keys.stream, "returner")["pending"] == 0
    assert r.llen(queue) == 0
    assert dot_files(output_dir) == CLEAN_DOT_FILES


def test_sigterm_with_work_in_flight(service, r: redis.Redis, queue: str, output_dir: Path,
                                     frames: Frames) -> None:
    count = 200  # after SIGTERM only the batches in hand (2 x BATCH_SIZE) are finished
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (1448, 1024, 3), dtype=np.uint8) for _ in range(4)]
    for i in range(count):
        r.rpush(queue, frames.task(noise[i % 4], "req", f"img_{i}"))
    first = service().start()
    first.wait_ready()
    wait_for(lambda: results_count(output_dir) >= 1, what="the first result")
    assert first.stop() == 0
    done_after_stop = results_count(output_dir)
    assert done_after_stop < count, "too fast to catch work in flight"

    second = service().start()
    wait_for(lambda: results_count(output_dir) == count, timeout=60, what="the rest")
    assert second.stop() == 0
    ids = [e["image_id"] for e in read_results(output_dir)]
    assert sorted(ids) == sorted(f"img_{i}" for i in range(count))
    assert r.xlen(Keys.for_queue(queue).stream) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_metrics_and_health(service, service_env: dict[str, str], r: redis.Redis, queue: str,
                            output_dir: Path, frames: Frames) -> None:
    port = free_port()
    svc = service({**service_env, "METRICS_PORT": str(port)}).start()
    r.rpush(queue, frames.task(random_frame((64, 64, 3)), "req", "good"))
    r.rpush(queue, b"not json")
    wait_for(lambda: results_count(output_dir) == 2, what="two results")

    def scrape(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except OSError:
            return 0, ""

    def settled() -> str:
        _, body = scrape("/metrics")
        return body if 'returner_tasks_total{outcome="failed"} 1.0' in body else ""

    body = wait_for(settled, what="metrics after two tasks")
    assert 'returner_tasks_total{outcome="completed"} 1.0' in body
    assert "returner_task_duration_seconds_count 2.0" in body
    assert scrape("/healthz")[0] == 200
    assert svc.stop() == 0


def test_embedded_default(tmp_path: Path) -> None:
    """With REDIS_URL unset, `run --demo` starts a private Redis and saves the frames."""
    from tests.e2e.conftest import Service

    env = base_env(METRICS_PORT=0, ENCODER_THREADS=2)
    svc = Service(env, tmp_path, tmp_path / "run.log").start("--demo", "5")
    out = tmp_path / "output" / "translated"
    wait_for(lambda: results_count(out) == 5, timeout=30, what="demo results")
    log = svc.logs()
    url = log.split("REDIS_URL=", 1)[1].split(")", 1)[0]
    assert redis.Redis.from_url(url).ping()
    svc.signal(signal.SIGINT)
    assert svc.proc is not None and svc.proc.wait(timeout=10) == 0
    with_pid = [p for p in (tmp_path / ".returner" / "redis").iterdir()]
    assert with_pid, "embedded Redis kept no data directory"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        raise AssertionError("embedded Redis still running after exit")
    except redis.ConnectionError:
        pass
    results = read_results(out)
    assert all(Path(e["file_path"]).exists() for e in results)


def test_idle_worker_leaves_redis_idle(service, r: redis.Redis, queue: str, output_dir: Path,
                                       frames: Frames) -> None:
    """No busy polling: an idle worker blocks on the list, and a push wakes it."""
    svc = service().start()
    svc.wait_ready()
    before = int(r.info("stats")["total_commands_processed"])
    window = 3.0
    time.sleep(window)  # the measurement window, not a synchronisation
    per_second = (int(r.info("stats")["total_commands_processed"]) - before - 1) / window
    assert per_second < 20, f"{per_second:.0f} commands/s while idle"

    r.rpush(queue, frames.task(random_frame((32, 32, 3)), "req", "wake"))
    wait_for(lambda: results_count(output_dir) == 1, timeout=5, what="the pushed task")
    assert svc.stop() == 0


def test_json_logs(service, service_env: dict[str, str], r: redis.Redis, queue: str,
                   output_dir: Path, frames: Frames) -> None:
    svc = service({**service_env, "LOG_FORMAT": "json"}).start()
    r.rpush(queue, frames.task(random_frame((48, 48, 3)), "req_j", "img_j"))
    wait_for(lambda: results_count(output_dir) == 1, what="the task")
    assert svc.stop() == 0
    lines = [json.loads(line) for line in svc.logs(None).splitlines() if line.strip()]
    [outcome] = [doc for doc in lines if doc.get("outcome")]
    assert outcome["request_id"] == "req_j" and outcome["image_id"] == "img_j"
    assert outcome["outcome"] == "completed" and outcome["deliveries"] == 1
    assert outcome["entry_id"] and outcome["duration_s"] >= outcome["encode_s"] > 0
