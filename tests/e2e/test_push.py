"""`returner push` end to end: JPEG files decoded into segments by the real CLI, saved
again by a real service."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import redis
import simplejpeg

from returner.frames import unlink
from tests.conftest import psnr, random_frame, read_results, wait_for
from tests.e2e.conftest import Service, run_cli


def test_push_decodes_jpegs_and_skips_what_is_not_one(
    service: Callable[..., Service], service_env: dict[str, str], r: redis.Redis, queue: str,
    output_dir: Path, tmp_path: Path,
) -> None:
    pages = {}
    for i in range(3):
        page = random_frame((96, 64, 3), seed=i)
        path = tmp_path / f"page_{i}.jpg"
        path.write_bytes(simplejpeg.encode_jpeg(page, quality=95))
        pages[path.stem] = simplejpeg.decode_jpeg(path.read_bytes(), colorspace="RGB")
    (tmp_path / "notes.jpg").write_text("not a picture")
    files = [str(p) for p in sorted(tmp_path.glob("*.jpg"))]

    pushed = run_cli("push", *files, "--request-id", "req_smoke", env=service_env, cwd=tmp_path)

    assert pushed.returncode == 1
    assert "skipping" in pushed.stderr and "notes.jpg" in pushed.stderr
    assert "pushed 3 frames" in pushed.stdout
    assert r.llen(queue) == 3
    svc = service().start()
    wait_for(lambda: len(read_results(output_dir)) == 3, what="three results")
    assert svc.stop() == 0
    for record in read_results(output_dir):
        assert record["status"] == "completed" and record["request_id"] == "req_smoke"
        saved = simplejpeg.decode_jpeg(Path(record["file_path"]).read_bytes(), colorspace="RGB")
        assert psnr(saved, pages[record["image_id"]]) >= 30


def test_push_names_one_image_and_refuses_a_name_for_many(
    service_env: dict[str, str], r: redis.Redis, queue: str, tmp_path: Path
) -> None:
    path = tmp_path / "one.jpg"
    path.write_bytes(simplejpeg.encode_jpeg(random_frame((16, 16, 3)), quality=90))
    many = run_cli("push", str(path), str(path), "--request-id", "r", "--image-id", "x",
                   env=service_env, cwd=tmp_path)
    assert many.returncode == 2 and "--image-id goes with exactly one file" in many.stderr
    one = run_cli("push", str(path), "--request-id", "r", "--image-id", "cover",
                  env=service_env, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    [message] = r.lrange(queue, 0, -1)
    task = json.loads(message)
    assert task["image_id"] == "cover" and task["request_id"] == "r"
    unlink(task["shm_info"]["shm_name"])
