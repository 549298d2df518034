"""Operator commands end to end: `replay --pending`, `replay --dead-letter`, `status`
and the help texts, through the real CLI subprocess against the real Redis, with real
shared memory segments made the way the renderer makes them."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from returner.producer import task_message
from returner.stream import Consumer, Keys
from returner.task import Entry
from tests.conftest import Frames, dead_lettered, random_frame, read_results, wait_for
from tests.e2e.conftest import Service, run_cli
from tests.e2e.test_recovery import strand
from tests.e2e.test_run import results_count

GROUP = "returner"
UNREACHABLE = "redis://127.0.0.1:1/0"
SUMMARY = re.compile(
    r"claimed (\d+): completed (\d+), duplicate (\d+), failed (\d+), "
    r"dead-lettered (\d+), still pending (\d+)"
)


# -- helpers ------------------------------------------------------------------------------


def keys(queue: str) -> Keys:
    return Keys.for_queue(queue)


def summary(stdout: str) -> dict[str, int]:
    """The figures of `replay --pending`'s summary line."""
    found = SUMMARY.search(stdout)
    assert found, f"no summary line in {stdout!r}"
    names = ("claimed", "completed", "duplicate", "failed", "dead_lettered", "still_pending")
    return dict(zip(names, (int(g) for g in found.groups()), strict=True))


def consumers(r: redis.Redis, queue: str) -> dict[str, int]:
    """Every consumer of the group (XINFO CONSUMERS) with its pending count."""
    infos: list[dict[str, Any]] = r.xinfo_consumers(keys(queue).stream, GROUP)
    return {_text(i["name"]): int(i["pending"]) for i in infos}


def pending_rows(r: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """XPENDING's extended form for the whole group, oldest first."""
    found: list[dict[str, Any]] = r.xpending_range(keys(queue).stream, GROUP, "-", "+", 1000)
    return found


def rows(
    r: redis.Redis, key: str, start: str = "-", end: str = "+"
) -> list[tuple[str, dict[bytes, bytes]]]:
    """XRANGE of a stream as (ID, fields), typed."""
    raw: Any = r.xrange(key, start, end)
    return [(_text(i), dict(f)) for i, f in raw]


def held(r: redis.Redis, queue: str, consumer: str = "ghost") -> list[Entry]:
    """A consumer's pending entries with Redis's delivery counts, read without side effects
    (XPENDING + XRANGE; re-reading the history with XREADGROUP would count a delivery)."""
    entries = []
    stream = keys(queue).stream
    for row in r.xpending_range(stream, GROUP, "-", "+", 1000, consumername=consumer):
        entry_id = _text(row["message_id"])
        [(_, fields)] = rows(r, stream, entry_id, entry_id)
        entries.append(Entry(entry_id, fields[b"task"], int(row["times_delivered"])))
    return entries


def strand_ids(
    r: redis.Redis, queue: str, frames: Frames, ids: Sequence[tuple[str, str]]
) -> tuple[Consumer, list[Entry]]:
    """Like `strand`, with chosen (request_id, image_id) pairs; returns the entries in order."""
    for i, (request_id, image_id) in enumerate(ids):
        r.rpush(queue, frames.task(random_frame((48, 64, 3), seed=100 + i), request_id, image_id))
    ghost = Consumer(r, queue, GROUP, "ghost")
    ghost.stream.ensure_group()
    assert len(ghost.fetch(len(ids))) == len(ids)
    return ghost, held(r, queue)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def one_line_error(result: Any) -> str:
    """The whole of stderr, asserted to be a single `returner: ...` line without a traceback."""
    err: str = result.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, f"expected one line, got:\n{err}"
    assert err.startswith("returner: "), err
    return err


# -- replay --pending -------------------------------------------------------------------


def test_replay_pending_limit_takes_exactly_that_many(
    service_env: dict[str, str],
    r: redis.Redis,
    queue: str,
    output_dir: Path,
    frames: Frames,
    tmp_path: Path,
) -> None:
    strand(r, queue, frames, 5)
    replay_consumer = f"{service_env['CONSUMER_NAME']}-replay"

    first = run_cli(
        "replay", "--pending", "--min-idle", "0", "--limit", "2", env=service_env, cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr
    assert "claimed 2: completed 2" in first.stdout
    assert summary(first.stdout) == {
        "claimed": 2,
        "completed": 2,
        "duplicate": 0,
        "failed": 0,
        "dead_lettered": 0,
        "still_pending": 0,
    }
    assert "replaying: 2 claimed" in first.stderr  # progress, plain lines when not a TTY
    assert results_count(output_dir) == 2
    assert {e["status"] for e in read_results(output_dir)} == {"completed"}
    # the replay consumer leaves no trace; the ghost keeps the three it still holds
    assert consumers(r, queue) == {"ghost": 3}
    assert r.xlen(keys(queue).stream) == 3  # acked entries are deleted

    second = run_cli("replay", "--pending", "--min-idle", "0", env=service_env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert summary(second.stdout) == {
        "claimed": 3,
        "completed": 3,
        "duplicate": 0,
        "failed": 0,
        "dead_lettered": 0,
        "still_pending": 0,
    }
    results = read_results(output_dir)
    assert sorted(e["image_id"] for e in results) == [f"img_{i}" for i in range(5)]
    assert {e["status"] for e in results} == {"completed"}
    assert replay_consumer not in consumers(r, queue)
    assert consumers(r, queue).get("ghost", 0) == 0
    assert r.xpending(keys(queue).stream, GROUP)["pending"] == 0
    assert r.xlen(keys(queue).stream) == 0
    assert not any(frames.exists(n) for n in frames.names)


def test_replay_pending_under_a_chosen_consumer(
    service_env: dict[str, str],
    r: redis.Redis,
    queue: str,
    output_dir: Path,
    frames: Frames,
    tmp_path: Path,
) -> None:
    strand(r, queue, frames, 2)
    r.rpush(queue, b"not json")  # fails; its dead letter names the consumer that settled it
    Consumer(r, queue, GROUP, "ghost").fetch(1)
    assert consumers(r, queue) == {"ghost": 3}

    done = run_cli(
        "replay",
        "--pending",
        "--min-idle",
        "0",
        "--consumer",
        "night-shift",
        "--log-level",
        "INFO",
        env=service_env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert summary(done.stdout)["claimed"] == 3
    assert summary(done.stdout)["completed"] == 2
    assert "consumer night-shift of group" in done.stderr
    [(_, letter)] = rows(r, keys(queue).dead)
    assert letter[b"consumer"] == b"night-shift"
    assert letter[b"task"] == b"not json"
    names = consumers(r, queue)
    assert "night-shift" not in names  # forgotten once it holds nothing
    assert f"{service_env['CONSUMER_NAME']}-replay" not in names
    assert results_count(output_dir) == 3


def test_replay_pending_dry_run_claims_nothing(
    service_env: dict[str, str],
    r: redis.Redis,
    queue: str,
    output_dir: Path,
    frames: Frames,
    tmp_path: Path,
) -> None:
    strand(r, queue, frames, 3)
    before = pending_rows(r, queue)
    assert len(before) == 3

    shown = run_cli(
        "replay", "--pending", "--dry-run", "--min-idle", "0", env=service_env, cwd=tmp_path
    )
    assert shown.returncode == 0, shown.stderr
    for row in before:
        line = next(
            (ln for ln in shown.stdout.splitlines() if ln.startswith(_text(row["message_id"]))),
            None,
        )
        assert line is not None, shown.stdout
        assert "consumer ghost" in line
        assert f"deliveries {row['times_delivered']}" in line
        assert "deliveries 1" in line
    assert "would claim 3" in shown.stdout

    after = pending_rows(r, queue)
    assert [_text(p["consumer"]) for p in after] == ["ghost"] * 3
    assert [p["message_id"] for p in after] == [p["message_id"] for p in before]
    assert [p["times_delivered"] for p in after] == [1, 1, 1]  # not delivered again
    assert consumers(r, queue) == {"ghost": 3}  # no replay consumer was even created
    assert not (output_dir / "results.json").exists()
    assert all(frames.exists(n) for n in frames.names)


def test_replay_pending_default_min_idle_leaves_fresh_entries(
    service_env: dict[str, str],
    r: redis.Redis,
    queue: str,
    output_dir: Path,
    frames: Frames,
    tmp_path: Path,
) -> None:
    strand(r, queue, frames, 3)
    done = run_cli("replay", "--pending", env=service_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "claimed 0" in done.stdout
    assert summary(done.stdout)["claimed"] == 0
    assert consumers(r, queue) == {"ghost": 3}
    assert [p["times_delivered"] for p in pending_rows(r, queue)] == [1, 1, 1]
    assert results_count(output_dir) == 0
    assert all(frames.exists(n) for n in frames.names)


def test_replay_pending_mixed_batch_summary(
    service_env: dict[str, str],
    r: redis.Redis,
    queue: str,
    output_dir: Path,
    frames: Frames,
    tmp_path: Path,
) -> None:
    """completed, duplicate, failed (bad input) and dead-lettered (delivery count over
    MAX_DELIVERIES) in one replayed batch; the failed and given-up ones go to {L}:dead."""
    stream, dead = keys(queue).stream, keys(queue).dead
    # a task completed by an earlier replay, whose message is delivered once more
    strand(r, queue, frames, 1)
    [earlier] = held(r, queue)
    first = run_cli("replay", "--pending", "--min-idle", "0", env=service_env, cwd=tmp_path)
    assert summary(first.stdout)["completed"] == 1, first.stdout + first.stderr

    good = frames.task(random_frame((40, 56, 3), seed=7), "req_mix", "good")
    worn = frames.task(random_frame((40, 56, 3), seed=8), "req_mix", "worn")
    missing = task_message(f"img_shm_{uuid.uuid4().hex}", (40, 56, 3), "req_mix", "missing")
    for message in (good, earlier.payload, b"not json", missing, worn):
        r.rpush(queue, message)
    ghost = Consumer(r, queue, GROUP, "ghost")
    assert len(ghost.fetch(5)) == 5
    worn_id = next(e.id for e in held(r, queue) if e.payload == worn)
    r.xclaim(stream, GROUP, "ghost", 0, [worn_id], retrycount=5)  # delivered 5 times already

    done = run_cli("replay", "--pending", "--min-idle", "0", env=service_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert summary(done.stdout) == {
        "claimed": 5,
        "completed": 1,
        "duplicate": 1,
        "failed": 2,
        "dead_lettered": 1,
        "still_pending": 0,
    }

    letters = {f[b"task"]: f for _, f in rows(r, dead)}
    assert set(letters) == {b"not json", missing, worn}
    assert b"does not exist" in letters[missing][b"error"]
    assert letters[worn][b"image_id"] == b"worn"
    assert int(letters[worn][b"deliveries"]) == 6
    assert r.xpending(stream, GROUP)["pending"] == 0
    assert r.xlen(stream) == 0

    results = read_results(output_dir)
    completed = [e["image_id"] for e in results if e["status"] == "completed"]
    assert sorted(completed) == ["good", "img_0"]  # the duplicate wrote nothing
    failed = {e["image_id"] for e in results if e["status"] == "failed"}
    assert failed == {None, "missing", "worn"}


def test_replay_needs_exactly_one_mode(service_env: dict[str, str], tmp_path: Path) -> None:
    for args in ((), ("--pending", "--dead-letter")):
        result = run_cli("replay", *args, env=service_env, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        err = one_line_error(result)
        assert "--pending" in err and "--dead-letter" in err


def test_unreachable_redis_is_one_clear_line(service_env: dict[str, str], tmp_path: Path) -> None:
    env = {**service_env, "REDIS_URL": UNREACHABLE}
    for args in (
        ("replay", "--pending"),
        ("replay", "--dead-letter"),
        ("status",),
        ("status", "--json"),
    ):
        result = run_cli(*args, env=env, cwd=tmp_path)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        err = one_line_error(result)
        assert "127.0.0.1" in err or "refused" in err.lower() or "connect" in err.lower(), err
        assert result.stdout == "", (args, result.stdout)


# -- replay --dead-letter ---------------------------------------------------------------


def test_replay_dead_letters_by_request_id_and_limit(
    service: Callable[..., Service],
    service_env: dict[str, str],
    r: redis.Redis,
    queue: str,
    output_dir: Path,
    frames: Frames,
    tmp_path: Path,
) -> None:
    ids = [("req_a", "a_0"), ("req_b", "b_0"), ("req_a", "a_1"), ("req_c", "c_0")]
    ghost, entries = strand_ids(r, queue, frames, ids)
    for entry, (request_id, image_id) in zip(entries, ids, strict=True):
        ghost.settle(dead_lettered(entry, f"outage while saving {image_id}", request_id, image_id))
    dead = keys(queue).dead
    assert r.xlen(dead) == 4
    dead_ids = {f[b"image_id"].decode(): _text(i) for i, f in rows(r, dead)}

    dry = run_cli(
        "replay",
        "--dead-letter",
        "--request-id",
        "req_a",
        "--dry-run",
        env=service_env,
        cwd=tmp_path,
    )
    assert dry.returncode == 0, dry.stderr
    assert f"{dead_ids['a_0']}  outage while saving a_0" in dry.stdout
    assert f"{dead_ids['a_1']}  outage while saving a_1" in dry.stdout
    assert dead_ids["b_0"] not in dry.stdout and dead_ids["c_0"] not in dry.stdout
    assert "would move 2" in dry.stdout
    assert r.xlen(dead) == 4
    assert r.xlen(keys(queue).stream) == 0

    one = run_cli(
        "replay",
        "--dead-letter",
        "--request-id",
        "req_a",
        "--limit",
        "1",
        env=service_env,
        cwd=tmp_path,
    )
    assert one.returncode == 0, one.stderr
    assert "moved 1 dead letters" in one.stdout
    assert r.xlen(dead) == 3
    assert r.xlen(keys(queue).stream) == 1

    rest = run_cli(
        "replay", "--dead-letter", "--request-id", "req_a", env=service_env, cwd=tmp_path
    )
    assert rest.returncode == 0, rest.stderr
    assert "moved 1 dead letters" in rest.stdout
    left = {f[b"request_id"] for _, f in rows(r, dead)}
    assert left == {b"req_b", b"req_c"}
    assert sorted(f[b"task"] for _, f in rows(r, keys(queue).stream)) == sorted(
        [entries[0].payload, entries[2].payload]
    )

    svc = service().start()
    wait_for(lambda: results_count(output_dir) == 2, what="revived dead letters completed")
    assert svc.stop() == 0
    results = read_results(output_dir)
    assert {(e["request_id"], e["image_id"], e["status"]) for e in results} == {
        ("req_a", "a_0", "completed"),
        ("req_a", "a_1", "completed"),
    }
    assert r.xlen(dead) == 2  # the service does not touch dead letters
    assert not frames.exists(frames.names[0]) and not frames.exists(frames.names[2])
    assert frames.exists(frames.names[1]) and frames.exists(frames.names[3])


def test_replay_dead_letters_limit_without_filter(
    service: Callable[..., Service],
    service_env: dict[str, str],
    r: redis.Redis,
    queue: str,
    output_dir: Path,
    frames: Frames,
    tmp_path: Path,
) -> None:
    ghost, entries = strand_ids(r, queue, frames, [("req_x", "x_0"), ("req_y", "y_0")])
    for entry, image_id in zip(entries, ("x_0", "y_0"), strict=True):
        ghost.settle(dead_lettered(entry, "disk was full", "req", image_id))

    dry = run_cli("replay", "--dead-letter", "--dry-run", env=service_env, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("disk was full") == 2
    assert "would move 2" in dry.stdout
    assert r.xlen(keys(queue).dead) == 2

    one = run_cli("replay", "--dead-letter", "--limit", "1", env=service_env, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert "moved 1 dead letters" in one.stdout
    [(_, still)] = rows(r, keys(queue).dead)
    assert still[b"image_id"] == b"y_0"  # the oldest one went first

    svc = service().start()
    wait_for(lambda: results_count(output_dir) == 1, what="the revived dead letter completed")
    assert svc.stop() == 0
    [result] = read_results(output_dir)
    assert (result["image_id"], result["status"]) == ("x_0", "completed")


# -- status -----------------------------------------------------------------------------


def complete_with_service(
    service: Callable[..., Service],
    r: redis.Redis,
    queue: str,
    output_dir: Path,
    frames: Frames,
    count: int,
) -> None:
    for i in range(count):
        r.rpush(queue, frames.task(random_frame((32, 48, 3), seed=50 + i), "req_ok", f"ok_{i}"))
    svc = service().start()
    wait_for(lambda: results_count(output_dir) == count, what=f"{count} tasks completed")
    assert svc.stop() == 0


def test_status_json_after_known_work(
    service: Callable[..., Service],
    service_env: dict[str, str],
    r: redis.Redis,
    queue: str,
    output_dir: Path,
    frames: Frames,
    tmp_path: Path,
) -> None:
    complete_with_service(service, r, queue, output_dir, frames, 3)
    ghost, entries = strand_ids(r, queue, frames, [("req_s", "s_0"), ("req_s", "s_1")])
    ghost.settle(dead_lettered(entries[0], "encoder exploded on s_0", "req_s", "s_0"))
    r.rpush(queue, b"waiting one")
    r.rpush(queue, b"waiting two")

    shown = run_cli("status", "--json", env=service_env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    for key in (
        "list_length",
        "stream_length",
        "pending",
        "oldest_pending_s",
        "consumers",
        "dead_letters",
        "last_errors",
        "results",
    ):
        assert key in report, key
    assert report["list_length"] == 2
    assert report["stream_length"] == 1
    assert report["pending"] == 1
    assert isinstance(report["oldest_pending_s"], float) and report["oldest_pending_s"] >= 0
    by_name = {c["name"]: c for c in report["consumers"]}
    assert set(by_name) <= {"ghost", service_env["CONSUMER_NAME"]} and "ghost" in by_name
    ghost_row = by_name["ghost"]
    assert set(ghost_row) >= {"name", "pending", "idle_ms", "oldest_pending_ms"}
    assert ghost_row["pending"] == 1
    assert isinstance(ghost_row["idle_ms"], int) and ghost_row["idle_ms"] >= 0
    assert isinstance(ghost_row["oldest_pending_ms"], int) and ghost_row["oldest_pending_ms"] >= 0
    if service_env["CONSUMER_NAME"] in by_name:  # the stopped service holds nothing
        idle = by_name[service_env["CONSUMER_NAME"]]
        assert idle["pending"] == 0 and idle["oldest_pending_ms"] is None
    assert report["dead_letters"] == 1
    [error] = report["last_errors"]
    assert set(error) >= {"id", "request_id", "image_id", "error", "deliveries"}
    [(dead_id, _)] = rows(r, keys(queue).dead)
    assert error["id"] == dead_id
    assert (error["request_id"], error["image_id"]) == ("req_s", "s_0")
    assert error["error"] == "encoder exploded on s_0"
    assert int(error["deliveries"]) == entries[0].deliveries == 1
    assert report["results"] == {"records": 3}


def test_status_json_counts_are_numbers(
    service_env: dict[str, str],
    r: redis.Redis,
    queue: str,
    frames: Frames,
    tmp_path: Path,
) -> None:
    """Every count in the JSON report is a JSON number, including a dead letter's deliveries."""
    ghost, entries = strand_ids(r, queue, frames, [("req_n", "n_0")])
    ghost.settle(dead_lettered(entries[0], "gave up", "req_n", "n_0"))
    report = json.loads(run_cli("status", "--json", env=service_env, cwd=tmp_path).stdout)
    [error] = report["last_errors"]
    assert error["deliveries"] == 1, f"deliveries is {error['deliveries']!r}, not the number 1"


def test_status_text(
    service_env: dict[str, str],
    r: redis.Redis,
    queue: str,
    output_dir: Path,
    frames: Frames,
    tmp_path: Path,
) -> None:
    strand(r, queue, frames, 2)
    done = run_cli("replay", "--pending", "--min-idle", "0", env=service_env, cwd=tmp_path)
    assert summary(done.stdout)["completed"] == 2, done.stdout + done.stderr
    ghost, entries = strand_ids(
        r, queue, frames, [("req_t", "t_0"), ("req_t", "t_1"), ("req_t", "t_2")]
    )
    ghost.settle(dead_lettered(entries[0], "segment vanished mid-read", "req_t", "t_0"))
    r.rpush(queue, b"waiting")

    shown = run_cli("status", env=service_env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "\x1b[" not in out  # no colour codes when not a terminal
    flat = " ".join(out.split())
    assert f"list {queue}: 1 waiting" in flat
    assert re.search(r"stream: 2 entries, 2 pending, oldest \d+\.\ds", flat), out
    row = re.search(r"^\s*ghost\s+(\d+)\s+(\d+\.\ds)\s+(\d+\.\ds)\s*$", out, re.M)
    assert row, out
    assert row.group(1) == "2"
    assert "oldest pending" in flat
    assert "dead letters: 1" in flat
    assert "segment vanished mid-read" in flat
    assert "req_t/t_0" in flat
    assert "results: 2 records" in flat


# -- help -------------------------------------------------------------------------------


def test_command_help_has_examples(service_env: dict[str, str], tmp_path: Path) -> None:
    for command in ("run", "replay", "status", "demo"):
        shown = run_cli(command, "--help", env=service_env, cwd=tmp_path)
        assert shown.returncode == 0, (command, shown.stderr)
        assert "Example" in shown.stdout, (command, shown.stdout)


def test_top_level_help_lists_commands(service_env: dict[str, str], tmp_path: Path) -> None:
    shown = run_cli("--help", env=service_env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for command in ("run", "replay", "status", "demo"):
        assert re.search(rf"^\W*{command}\b", shown.stdout, re.M), (command, shown.stdout)
