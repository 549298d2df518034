"""The results store through the real CLI: `results get`, `results export` (filters,
formats, a million records in constant memory), `status --json`, retention while the
service serves frames, and OUTPUT_LAYOUT=daily through `returner run`."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from returner.producer import task_message
from returner.store import FIELDS, STORE, Store
from returner.task import Entry, Kind, Outcome
from tests.conftest import Frames, count_records, open_results, random_frame, read_results, wait_for
from tests.e2e.conftest import Service, base_env, run_cli

BASE = datetime(2026, 1, 1, tzinfo=UTC)
INSERT = f"INSERT INTO records ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})"
MiB = 1024 * 1024


def at(seconds: float) -> str:
    return (BASE + timedelta(seconds=seconds)).isoformat(timespec="microseconds")


def build_store(directory: Path, rows: Iterable[tuple[Any, ...]]) -> None:
    """A store holding `rows` (tuples of FIELDS), written in one transaction, streaming."""
    directory.mkdir(parents=True, exist_ok=True)
    store = Store(directory)
    try:
        with store.transaction("test records") as tx:
            tx.db.executemany(INSERT, rows)
    finally:
        store.close()


def count(directory: Path, where: str, *params: Any) -> int:
    conn = sqlite3.connect(directory / STORE)
    try:
        return int(conn.execute(f"SELECT count(*) FROM records WHERE {where}", params)
                   .fetchone()[0])
    finally:
        conn.close()


def as_doc(row: tuple[Any, ...]) -> dict[str, Any]:
    doc = dict(zip(FIELDS, row, strict=True))
    if doc["status"] == "completed":
        del doc["error"]
    return doc


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    err = result.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_results_get_prints_a_tasks_records_and_status_counts_them(
    service: Callable[..., Service], service_env: dict[str, str], r: redis.Redis, queue: str,
    output_dir: Path, frames: Frames, tmp_path: Path,
) -> None:
    for i, image_id in enumerate(["画像_01", "img_2", "img_3"]):
        r.rpush(queue, frames.task(random_frame((48, 64, 3), seed=i), "req_get", image_id))
    r.rpush(queue, task_message("img_shm_0badf00d", (48, 64, 3), "req_get", "img_gone"))
    r.rpush(queue, frames.task(random_frame((48, 64, 3), seed=9), "req_other", "img_2"))
    svc = service().start()
    wait_for(lambda: count_records(output_dir) == 5, what="five records")

    got = run_cli("results", "get", "req_get", env=service_env, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    records = json.loads(got.stdout)
    assert records == [x for x in read_results(output_dir) if x["request_id"] == "req_get"]
    assert sorted((x["image_id"], x["status"]) for x in records) == [
        ("img_2", "completed"), ("img_3", "completed"), ("img_gone", "failed"),
        ("画像_01", "completed")]

    one = run_cli("results", "get", "req_get", "画像_01", env=service_env, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    [record] = json.loads(one.stdout)
    assert record["status"] == "completed" and Path(record["file_path"]).is_file()
    assert "画像_01" in one.stdout  # readable, not \u-escaped

    for missing in (["req_get", "img_9"], ["nobody"]):
        none = run_cli("results", "get", *missing, env=service_env, cwd=tmp_path)
        assert none.returncode == 1 and json.loads(none.stdout) == []

    status = run_cli("status", "--json", env=service_env, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["results"] == {"records": 5}
    assert svc.stop() == 0


def test_results_commands_without_a_store_say_so(service_env: dict[str, str],
                                                 tmp_path: Path, output_dir: Path) -> None:
    for args in (["results", "get", "req"], ["results", "export"]):
        result = run_cli(*args, env=service_env, cwd=tmp_path)
        assert result.returncode == 1
        assert "no results store" in one_line_error(result)
    status = run_cli("status", "--json", env=service_env, cwd=tmp_path)
    assert status.returncode == 0 and json.loads(status.stdout)["results"] == {"records": None}
    assert not output_dir.exists(), "a reader created the directory or a store"


@pytest.mark.parametrize("name", ["frames #1", "frames?v2"])
def test_results_commands_read_a_directory_whose_name_holds_uri_characters(
    service_env: dict[str, str], tmp_path: Path, name: str
) -> None:
    directory = tmp_path / name
    results = open_results(directory)
    results.commit([Outcome(Entry("1764460800000-0", b"{}", 1), Kind.FAILED, "req", "img",
                            error="bad shape")])
    results.close()
    env = {**service_env, "OUTPUT_DIR": str(directory)}
    before = sorted(os.listdir(tmp_path))
    got = run_cli("results", "get", "req", env=env, cwd=tmp_path)
    assert sorted(os.listdir(tmp_path)) == before, "a reader created a file"
    assert got.returncode == 0, got.stderr
    assert [x["error"] for x in json.loads(got.stdout)] == ["bad shape"]
    status = run_cli("status", "--json", env=env, cwd=tmp_path)
    assert json.loads(status.stdout)["results"] == {"records": 1}


EXPORTED = 2500  # more than one step of the store's reads


def sample_rows() -> list[tuple[Any, ...]]:
    """A record a second from BASE: three requests, every fifth failed, some non-ASCII."""
    rows = []
    for i in range(EXPORTED):
        failing = i % 5 == 0
        rows.append((at(i), f"req_{i % 3}", f"画像_{i}",
                     None if failing else f"/srv/out/img_{i}_20260101_000000.jpg",
                     None if failing else f"https://cdn.example/img_{i}_20260101_000000.jpg",
                     "failed" if failing else "completed", "bad shape" if failing else None,
                     f"{1767225600000 + i * 1000}-0"))
    return rows


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[Any, ...]]]:
    directory = tmp_path_factory.mktemp("export") / "out"
    rows = sample_rows()
    build_store(directory, rows)
    return directory, rows


def export(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("results", "export", *args, env=base_env(OUTPUT_DIR=directory),
                   cwd=directory.parent)


def test_export_writes_every_record_oldest_first_as_json_or_jsonl(
    exported: tuple[Path, list[tuple[Any, ...]]],
) -> None:
    directory, rows = exported
    as_json = export(directory)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == [as_doc(row) for row in rows]
    as_lines = export(directory, "--format", "jsonl")
    assert as_lines.returncode == 0, as_lines.stderr
    lines = as_lines.stdout.splitlines()
    assert [json.loads(line) for line in lines] == [as_doc(row) for row in rows]
    assert "画像_0" in lines[0]


@pytest.mark.parametrize(("args", "wanted"), [
    (["--since", at(1000)], lambda r: r[0] >= at(1000)),
    (["--since", "2026-01-01T09:16:40+09:00"], lambda r: r[0] >= at(1000)),
    (["--until", "2026-01-01T00:16:40"], lambda r: r[0] < at(1000)),
    (["--since", at(300), "--until", at(700.5)], lambda r: at(300) <= r[0] < at(700.5)),
    (["--status", "failed"], lambda r: r[5] == "failed"),
    (["--request-id", "req_2"], lambda r: r[1] == "req_2"),
    (["--request-id", "req_1", "--status", "completed", "--since", at(2000)],
     lambda r: r[1] == "req_1" and r[5] == "completed" and r[0] >= at(2000)),
    (["--request-id", "nobody"], lambda r: False),
], ids=["since", "since-offset", "until-naive", "window", "status", "request", "all",
        "none"])
def test_export_filters(exported: tuple[Path, list[tuple[Any, ...]]], args: list[str],
                        wanted: Callable[[tuple[Any, ...]], bool]) -> None:
    directory, rows = exported
    result = export(directory, "--format", "jsonl", *args)
    assert result.returncode == 0, result.stderr
    expected = [as_doc(row) for row in rows if wanted(row)]
    assert [json.loads(line) for line in result.stdout.splitlines()] == expected
    if not expected:
        as_json = export(directory, *args)
        assert as_json.returncode == 0 and json.loads(as_json.stdout) == []


@pytest.mark.parametrize(("args", "named"), [
    (["--format", "csv"], "--format"),
    (["--status", "done"], "--status"),
    (["--since", "yesterday"], "--since"),
])
def test_export_refuses_bad_options_with_exit_2(
    exported: tuple[Path, list[tuple[Any, ...]]], args: list[str], named: str
) -> None:
    directory, _ = exported
    result = export(directory, *args)
    assert result.returncode == 2 and result.stdout == ""
    assert named in one_line_error(result)


def million(directory: Path) -> Iterator[tuple[Any, ...]]:
    for i in range(1_000_000):
        second, micro = divmod(i, 1_000_000 // 100)
        yield (f"2026-01-01T00:{second // 60:02d}:{second % 60:02d}.{micro * 100:06d}+00:00",
               f"req_{i // 1000}", f"img_{i}", str(directory / f"img_{i}_20260101_000000.jpg"),
               None, "completed", None, f"{1767225600000 + i // 50}-{i % 50}")


# The peak is measured by a small parent of the export: a child forked from this test
# process would count this process's memory (shared until exec) in its own ru_maxrss.
PEAK_OF_CHILD = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def test_a_million_records_export_in_constant_memory(tmp_path: Path) -> None:
    directory = tmp_path / "out"
    build_store(directory, million(directory))
    target = tmp_path / "export.jsonl"
    with open(target, "wb") as out:
        result = subprocess.run(
            [sys.executable, "-c", PEAK_OF_CHILD,
             sys.executable, "-m", "returner", "results", "export", "--format", "jsonl"],
            env=base_env(OUTPUT_DIR=directory), cwd=tmp_path, stdout=out,
            stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    peak_mib = int(result.stderr.split()[-1]) * 1024 / MiB  # ru_maxrss is in KiB on Linux
    assert 20 < peak_mib < 150, f"export peaked at {peak_mib:.0f} MiB"
    with open(target, "rb") as exported_lines:
        first = json.loads(exported_lines.readline())
        lines, last_line = 1, b""
        for line in exported_lines:
            lines, last_line = lines + 1, line
    last = json.loads(last_line)
    assert lines == 1_000_000
    assert (first["image_id"], last["image_id"]) == ("img_0", "img_999999")
    assert first["timestamp"] < last["timestamp"]


def test_retention_deletes_old_records_while_frames_keep_completing(
    service: Callable[..., Service], service_env: dict[str, str], r: redis.Redis, queue: str,
    output_dir: Path, frames: Frames,
) -> None:
    old = 20_000  # 40 steps of PRUNE_STEP, each followed by a pause: several seconds
    stamp = (datetime.now(UTC) - timedelta(days=40)).isoformat(timespec="microseconds")
    build_store(output_dir, ((stamp, "old", f"img_{i}", None, None, "failed", "bad shape", None)
                             for i in range(old)))

    def push_wave(n: int) -> str:
        wave = f"wave_{n}"
        for i in range(3):
            r.rpush(queue, frames.task(random_frame((48, 64, 3), seed=i), wave, f"img_{i}"))
        return wave

    def wait(condition: Callable[[], bool], what: str) -> None:
        try:
            wait_for(condition, timeout=30, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{svc.logs()}") from None

    wave = push_wave(0)  # waiting in the list: taken up as soon as the service starts
    svc = service({**service_env, "RESULTS_RETENTION_DAYS": "30"}).start()
    left_at_each_wave: list[int] = []
    while True:
        wait(lambda wave=wave: count(output_dir, "request_id = ? AND status = 'completed'",
                                     wave) == 3, f"{wave} to complete")
        left = count(output_dir, "request_id = 'old'")
        left_at_each_wave.append(left)
        assert svc.alive(), svc.logs()
        if not left:
            break
        wait(lambda left=left: count(output_dir, "request_id = 'old'") < left,
             "retention to make progress")
        assert len(left_at_each_wave) < 200, "retention never finished"
        wave = push_wave(len(left_at_each_wave))
    assert left_at_each_wave[0] > 0, "retention finished before the first wave: no overlap"
    assert left_at_each_wave == sorted(left_at_each_wave, reverse=True)
    assert len(left_at_each_wave) >= 3
    assert svc.stop() == 0
    records = read_results(output_dir)
    assert len(records) == 3 * len(left_at_each_wave)
    assert {x["status"] for x in records} == {"completed"}
    assert "retention: deleted" in svc.logs(None)


def test_daily_layout_end_to_end(service: Callable[..., Service],
                                 service_env: dict[str, str], r: redis.Redis, queue: str,
                                 output_dir: Path, frames: Frames) -> None:
    for i in range(3):
        r.rpush(queue, frames.task(random_frame((48, 64, 3), seed=i), "req", f"img_{i}"))
    svc = service({**service_env, "OUTPUT_LAYOUT": "daily"}).start()
    wait_for(lambda: count_records(output_dir) == 3, what="three records")
    assert svc.stop() == 0
    for record in read_results(output_dir):
        entry_time = datetime.fromtimestamp(int(record["entry_id"].split("-")[0]) / 1000, UTC)
        path = Path(record["file_path"])
        assert path.parent == output_dir.resolve() / entry_time.strftime("%Y-%m-%d")
        assert path.name == f"{record['image_id']}_{entry_time:%Y%m%d_%H%M%S}.jpg"
        assert path.read_bytes()[:2] == b"\xff\xd8"
    assert list(output_dir.glob("*.jpg")) == []
