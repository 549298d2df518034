"""`returner run` with OBJECT_STORE_URL against a real S3 server (SeaweedFS on loopback,
through a fault-injecting proxy where a fault is needed): JPEGs as objects with their
headers and metadata, image_url in records, events and the result lists, no overwrite
of another task's object, a redelivery finding its own, nothing left of a frame given up,
faults that pause without spending deliveries, and start-up refusals in one line."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import simplejpeg

from returner import embedded
from returner.encode import JpegOptions, encode
from returner.files import file_name
from returner.stream import Consumer, Keys
from tests.conftest import Frames, random_frame, read_results, wait_for
from tests.e2e.conftest import Service, run_cli
from tests.s3proxy import FaultProxy
from tests.s3support import READER, SeaweedS3

PREFIX = "translated"
SHAPE = (48, 64, 3)


@pytest.fixture
def s3_env(service_env: dict[str, str], s3_server: SeaweedS3, s3_bucket: str) -> dict[str, str]:
    return {**service_env, **s3_server.env(), "OBJECT_STORE_URL": f"s3://{s3_bucket}/{PREFIX}",
            "SUCCESS_QUEUE": f"{service_env['HOSTING_TASKS_QUEUE']}:success",
            "ERROR_QUEUE": f"{service_env['HOSTING_TASKS_QUEUE']}:error"}


@pytest.fixture
def proxy(s3_server: SeaweedS3) -> Iterator[FaultProxy]:
    made = FaultProxy(s3_server.port)
    yield made
    made.close()


def objects(s3_server: SeaweedS3, bucket: str) -> dict[str, dict[str, Any]]:
    """Every object of `bucket`: key -> its HEAD (metadata, headers)."""
    listed = s3_server.admin.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: s3_server.admin.head_object(Bucket=bucket, Key=o["Key"]) for o in listed}


def body(s3_server: SeaweedS3, bucket: str, key: str) -> bytes:
    data: bytes = s3_server.admin.get_object(Bucket=bucket, Key=key)["Body"].read()
    return data


def keys_of(records: list[dict[str, Any]], bucket: str) -> list[str]:
    """The object keys the completed records name, from their s3:// image_url."""
    base = f"s3://{bucket}/"
    return [r["image_url"].removeprefix(base) for r in records if r["status"] == "completed"]


def popped(r: redis.Redis, name: str) -> list[dict[str, Any]]:
    return [json.loads(m) for m in r.lrange(name, 0, -1)]


def test_frames_become_objects_named_like_files_with_their_url_everywhere(
    service: Callable[..., Service], s3_env: dict[str, str], s3_server: SeaweedS3,
    s3_bucket: str, r: redis.Redis, frames: Frames, output_dir: Path,
) -> None:
    queue = s3_env["HOSTING_TASKS_QUEUE"]
    truth = random_frame(SHAPE, seed=1)
    good = [frames.task(truth, "req_s3", f"img_{i}") for i in range(3)]
    bad = b'{"request_id": "req_s3", "image_id": "broken"}'
    r.rpush(queue, *good, bad)
    svc = service(s3_env).start()
    wait_for(lambda: len(read_results(output_dir)) == 4, what="four records")
    assert svc.stop() == 0, svc.logs()

    records = read_results(output_dir)
    done = [rec for rec in records if rec["status"] == "completed"]
    stored = objects(s3_server, s3_bucket)
    assert sorted(stored) == sorted(keys_of(records, s3_bucket))
    assert len(stored) == 3 and all(key.startswith(f"{PREFIX}/img_") for key in stored)
    assert all(rec["file_path"] is None for rec in records)
    assert not list(output_dir.glob("*.jpg"))
    for rec in done:
        key = rec["image_url"].removeprefix(f"s3://{s3_bucket}/")
        head = stored[key]
        assert head["ContentType"] == "image/jpeg"
        assert head["CacheControl"] == "public, max-age=31536000, immutable"
        assert head["Metadata"]["request-id"] == "req_s3"
        assert head["Metadata"]["image-id"] == rec["image_id"]
        assert head["Metadata"]["entry-id"] == rec["entry_id"]
        millis = int(rec["entry_id"].split("-")[0])
        assert key == f"{PREFIX}/{file_name(rec['image_id'], millis)}"
        decoded = simplejpeg.decode_jpeg(body(s3_server, s3_bucket, key))
        assert decoded.shape == SHAPE
    events = {f[b"image_id"].decode(): f for _, f in r.xrange(Keys.for_queue(queue).events)}
    for rec in done:
        assert events[rec["image_id"]][b"image_url"].decode() == rec["image_url"]
        assert events[rec["image_id"]][b"file_path"] == b""
    success = popped(r, s3_env["SUCCESS_QUEUE"])
    assert sorted(m["image_id"] for m in success) == ["img_0", "img_1", "img_2"]
    assert {m["image_url"] for m in success} == {rec["image_url"] for rec in done}
    assert all(set(m) == {"request_id", "image_id", "image_url"} for m in success)
    [error] = popped(r, s3_env["ERROR_QUEUE"])
    assert set(error) == {"request_id", "image_id", "error_message", "timestamp"}
    assert (error["request_id"], error["image_id"]) == ("req_s3", "broken")
    assert "shm_info" in error["error_message"]
    assert error["timestamp"] == next(
        rec["timestamp"] for rec in records if rec["status"] == "failed")


def test_public_base_url_makes_the_image_url(
    service: Callable[..., Service], s3_env: dict[str, str], r: redis.Redis, frames: Frames,
    output_dir: Path,
) -> None:
    env = {**s3_env, "PUBLIC_BASE_URL": "https://img.example.com/"}
    r.rpush(env["HOSTING_TASKS_QUEUE"], frames.task(random_frame(SHAPE, seed=2), "req", "a b"))
    svc = service(env).start()
    wait_for(lambda: read_results(output_dir), what="the record")
    assert svc.stop() == 0, svc.logs()
    [rec] = read_results(output_dir)
    millis = int(rec["entry_id"].split("-")[0])
    name = file_name("a b", millis).replace("%", "%25")  # the key, percent-encoded in a URL
    assert rec["image_url"] == f"https://img.example.com/{PREFIX}/{name}"


def test_a_key_another_task_holds_gets_a_suffix_and_stays_untouched(
    service: Callable[..., Service], s3_env: dict[str, str], s3_server: SeaweedS3,
    s3_bucket: str, r: redis.Redis, frames: Frames, output_dir: Path,
) -> None:
    queue = s3_env["HOSTING_TASKS_QUEUE"]
    ghost = Consumer(r, queue, "returner", "e2e")  # the service's own name: recovered first
    ghost.stream.ensure_group()
    r.rpush(queue, frames.task(random_frame(SHAPE, seed=3), "req", "img"))
    [entry] = ghost.fetch(1)
    taken = f"{PREFIX}/{file_name('img', entry.millis)}"
    s3_server.admin.put_object(Bucket=s3_bucket, Key=taken, Body=b"another task's",
                               Metadata={"entry-id": "1-0"})
    svc = service(s3_env).start()
    wait_for(lambda: read_results(output_dir), what="the record")
    assert svc.stop() == 0, svc.logs()
    [rec] = read_results(output_dir)
    assert rec["image_url"] == f"s3://{s3_bucket}/{taken.removesuffix('.jpg')}_1.jpg"
    assert body(s3_server, s3_bucket, taken) == b"another task's"


def put_as_a_crashed_delivery(s3_server: SeaweedS3, bucket: str, entry: Any,
                              frame: Any) -> str:
    """The object an earlier delivery of `entry` uploaded before it was killed."""
    key = f"{PREFIX}/{file_name('img', entry.millis)}"
    data = encode(frame, "RGB", JpegOptions())
    s3_server.admin.put_object(Bucket=bucket, Key=key, Body=data, ContentType="image/jpeg",
                               Metadata={"request-id": "req", "image-id": "img",
                                         "entry-id": entry.id})
    return key


def test_a_redelivery_finds_its_own_object_and_counts_it_uploaded(
    service: Callable[..., Service], s3_env: dict[str, str], s3_server: SeaweedS3,
    s3_bucket: str, r: redis.Redis, frames: Frames, output_dir: Path,
) -> None:
    queue = s3_env["HOSTING_TASKS_QUEUE"]
    ghost = Consumer(r, queue, "returner", "e2e")
    ghost.stream.ensure_group()
    frame = random_frame(SHAPE, seed=4)
    r.rpush(queue, frames.task(frame, "req", "img"))
    [entry] = ghost.fetch(1)
    key = put_as_a_crashed_delivery(s3_server, s3_bucket, entry, frame)
    svc = service(s3_env).start()
    wait_for(lambda: read_results(output_dir), what="the record")
    assert svc.stop() == 0, svc.logs()
    [rec] = read_results(output_dir)
    assert rec["status"] == "completed" and rec["image_url"] == f"s3://{s3_bucket}/{key}"
    assert list(objects(s3_server, s3_bucket)) == [key]


def test_a_frame_given_up_leaves_no_object_an_earlier_delivery_made(
    service: Callable[..., Service], s3_env: dict[str, str], s3_server: SeaweedS3,
    s3_bucket: str, r: redis.Redis, frames: Frames, output_dir: Path,
) -> None:
    queue = s3_env["HOSTING_TASKS_QUEUE"]
    ghost = Consumer(r, queue, "returner", "e2e")
    ghost.stream.ensure_group()
    frame = random_frame(SHAPE, seed=5)
    r.rpush(queue, frames.task(frame, "req", "img"))
    [entry] = ghost.fetch(1)
    put_as_a_crashed_delivery(s3_server, s3_bucket, entry, frame)
    for _ in range(5):  # crashes after the upload, each counted: MAX_DELIVERIES is spent
        ghost.own_pending("0", 1)
    svc = service(s3_env).start()
    wait_for(lambda: read_results(output_dir), what="the record")
    assert svc.stop() == 0, svc.logs()
    [rec] = read_results(output_dir)
    assert rec["status"] == "failed" and "gave up after" in rec["error"]
    assert objects(s3_server, s3_bucket) == {}
    [error] = popped(r, s3_env["ERROR_QUEUE"])
    assert error["image_id"] == "img" and "gave up" in error["error_message"]


def ready(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError):  # not listening yet
        return 0, ""


def metric(port: int, series: str) -> float:
    """The sum of the series that start with `series` (a name, or a name and labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
        text = answer.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(series))


@pytest.mark.parametrize("fault", ["slowdown", "error500", "drop"])
def test_a_failing_store_pauses_without_spending_deliveries(
    service: Callable[..., Service], s3_env: dict[str, str], proxy: FaultProxy, fault: str,
    r: redis.Redis, frames: Frames, output_dir: Path, free_port: int,
) -> None:
    """503 SlowDown, 500 and dropped connections: the worker pauses (readiness says why,
    the metric counts), nothing is acked or dead-lettered, and once the store answers
    every frame completes on its first delivery."""
    env = {**s3_env, "S3_ENDPOINT_URL": proxy.endpoint, "METRICS_PORT": str(free_port)}
    queue = env["HOSTING_TASKS_QUEUE"]
    proxy.mode = fault  # type: ignore[assignment]
    r.rpush(queue, *[frames.task(random_frame(SHAPE, seed=10 + i), "req", f"img_{i}")
                     for i in range(4)])
    svc = service(env).start()
    wait_for(lambda: ready(free_port)[1].startswith("paused: the object store is failing"),
             timeout=30, what="a pause for the object store")
    assert ready(free_port)[0] == 503
    kind = {"slowdown": "throttled", "error500": "refused", "drop": "unreachable"}[fault]
    assert metric(free_port, f'returner_upload_errors_total{{kind="{kind}"') >= 1
    assert read_results(output_dir) == [] and r.xlen(Keys.for_queue(queue).dead) == 0
    proxy.mode = "pass"
    wait_for(lambda: len(read_results(output_dir)) == 4, timeout=60, what="every frame")
    wait_for(lambda: ready(free_port)[0] == 200, what="ready again")
    # The records land before the settle step reports; wait for its four observations.
    wait_for(lambda: metric(free_port, "returner_deliveries_count") == 4, what="four reports")
    assert metric(free_port, 'returner_deliveries_bucket{le="1.0"') == 4  # first deliveries
    assert svc.stop() == 0, svc.logs()
    assert {rec["status"] for rec in read_results(output_dir)} == {"completed"}


@pytest.fixture
def free_port() -> int:
    return embedded.free_port()


def test_a_missing_bucket_and_refused_credentials_stop_start_up_in_one_line(
    s3_env: dict[str, str], s3_server: SeaweedS3, tmp_path: Path,
) -> None:
    started = time.monotonic()
    missing = run_cli("run", env={**s3_env, "OBJECT_STORE_URL": "s3://no-such-bucket/x"},
                      cwd=tmp_path)
    wrong = {**s3_env, "AWS_SECRET_ACCESS_KEY": "not-the-secret-7f3a"}
    refused = run_cli("run", env=wrong, cwd=tmp_path)
    reader = run_cli("run", env={**s3_env, **s3_server.env(READER)}, cwd=tmp_path)
    assert time.monotonic() - started < 30
    for done in (missing, refused, reader):
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "OBJECT_STORE_URL" in missing.stderr and "no-such-bucket" in missing.stderr
    assert "AWS_SECRET_ACCESS_KEY" in refused.stderr
    assert "not-the-secret-7f3a" not in refused.stderr
    assert "OBJECT_STORE_URL" in reader.stderr


def test_status_shows_the_object_store_and_whether_it_answers(
    s3_env: dict[str, str], proxy: FaultProxy, tmp_path: Path,
) -> None:
    env = {**s3_env, "S3_ENDPOINT_URL": proxy.endpoint}
    up = run_cli("status", "--json", env=env, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    store = json.loads(up.stdout)["object_store"]
    assert store == {"url": env["OBJECT_STORE_URL"], "endpoint": proxy.endpoint,
                     "reachable": True, "error": None}
    proxy.mode = "slowdown"
    down = run_cli("status", env=env, cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    assert "object store: s3://" in down.stdout and "failing: " in down.stdout
    assert "503 SlowDown" in down.stdout
    assert env["AWS_SECRET_ACCESS_KEY"] not in up.stdout + down.stdout
