"""Consumer hygiene against a real redis-server, with in-process Worker and Stream:
a consumer silent for CONSUMER_TIMEOUT_MS that holds nothing leaves the group; one that
holds entries is rescued first and removed only once it holds none; live consumers and
the worker itself are never removed; `status` flags silent consumers as gone.

Consumers fall silent in real time: CONSUMER_TIMEOUT_MS is its minimum, 3000, and the
tests wait on XINFO CONSUMERS until Redis reports them idle that long.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from returner.commit import Committer
from returner.errors import DiskError
from returner.metrics import Metrics
from returner.settings import Settings
from returner.stream import Consumer, ConsumerInfo, Keys, Observation
from returner.worker import Worker
from tests.conftest import Frames, acked, random_frame, read_results, wait_for
from tests.e2e.conftest import base_env, run_cli
from tests.test_worker import assert_drained, running, shm_name

MakeSettings = Callable[..., Settings]
GROUP = "returner"
TIMEOUT_MS = 3000  # the smallest CONSUMER_TIMEOUT_MS allowed


def members(client: redis.Redis, queue: str) -> dict[str, dict[str, int]]:
    """The group's consumers: name -> {"pending", "idle"} (ms)."""
    try:
        infos: Any = client.xinfo_consumers(Keys.for_queue(queue).stream, GROUP)
    except redis.ResponseError:  # no stream or group yet
        return {}
    return {
        i["name"].decode(): {"pending": int(i["pending"]), "idle": int(i["idle"])} for i in infos
    }


def wait_silent(client: redis.Redis, queue: str, names: list[str]) -> None:
    """Until Redis reports every one of `names` idle for TIMEOUT_MS."""

    def silent() -> bool:
        now = members(client, queue)
        assert set(names) <= set(now), f"{set(names) - set(now)} left the group early"
        return all(now[n]["idle"] >= TIMEOUT_MS for n in names)

    wait_for(silent, timeout=15, interval=0.05, what=f"{names} silent for {TIMEOUT_MS} ms")


def member(client: redis.Redis, queue: str, name: str) -> Consumer:
    """A consumer of the group (it joins on its first read)."""
    stream = Consumer(client, queue, GROUP, name)
    stream.stream.ensure_group()
    return stream


def join(client: redis.Redis, queue: str, name: str) -> None:
    """Make `name` a consumer of the group. (An XREADGROUP that finds nothing does not.)"""
    member(client, queue, name)  # the group exists
    assert client.xgroup_createconsumer(Keys.for_queue(queue).stream, GROUP, name) == 1


@contextlib.contextmanager
def observer(settings: Settings, client: redis.Redis) -> Iterator[Worker]:
    """A worker whose loop does not run: the test calls `observe()` itself."""
    stream = Consumer(client, settings.hosting_tasks_queue, GROUP, settings.consumer_name)
    worker = Worker(settings, stream, Metrics(), threading.Event())
    worker.start()
    try:
        yield worker
    finally:
        worker.close()


def tasks(frames: Frames, prefix: str, count: int) -> list[bytes]:
    """Tasks with small frames: request `prefix`, images `<prefix>-<i>`."""
    return [
        frames.task(random_frame((24, 32, 3), seed=i), prefix, f"{prefix}-{i}")
        for i in range(count)
    ]


def removed_in(text: str) -> list[str]:
    return re.findall(r"consumer (\S+) silent for \S+ and holding nothing: removed", text)


@pytest.fixture
def settings(make_settings: MakeSettings) -> Settings:
    return make_settings(CONSUMER_TIMEOUT_MS=TIMEOUT_MS, CONSUMER_NAME="observer")


def test_a_silent_consumer_holding_nothing_is_removed_but_never_the_worker_itself(
    each_redis: redis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    queue = settings.hosting_tasks_queue
    with observer(settings, each_redis) as worker:
        join(each_redis, queue, "ghost")  # joins the group, then falls silent
        join(each_redis, queue, "observer")  # the worker itself, silent too
        assert worker.survey() == []
        assert set(members(each_redis, queue)) == {"ghost", "observer"}, "removed too early"

        wait_silent(each_redis, queue, ["ghost", "observer"])
        with caplog.at_level(logging.INFO, logger="returner.worker"):
            assert worker.survey() == []
        assert set(members(each_redis, queue)) == {"observer"}
        assert removed_in(caplog.text) == ["ghost"]
        assert members(each_redis, queue)["observer"]["idle"] >= TIMEOUT_MS
        assert worker.survey() == []
        assert set(members(each_redis, queue)) == {"observer"}


def test_a_silent_consumer_holding_entries_leaves_only_once_they_are_taken_over(
    each_redis: redis.Redis, settings: Settings, frames: Frames, output_dir: Path
) -> None:
    queue = settings.hosting_tasks_queue
    messages = [
        frames.task(random_frame((32, 40, 3), seed=i), f"req-{i}", f"img-{i}") for i in range(2)
    ]
    each_redis.rpush(queue, *messages)
    taken = member(each_redis, queue, "ghost").fetch(10)
    assert len(taken) == 2

    with observer(settings, each_redis) as worker:
        wait_silent(each_redis, queue, ["ghost"])
        first = worker.survey()  # rescued one at a time: each is a suspect
        assert [(e.id, e.deliveries) for e in first] == [(taken[0].id, 2)]
        assert members(each_redis, queue)["ghost"]["pending"] == 1, "removed while holding one"
        worker.handle(first)

        second = worker.survey()
        assert [(e.id, e.deliveries) for e in second] == [(taken[1].id, 2)]
        ghost = members(each_redis, queue).get("ghost")
        assert ghost is not None and ghost["pending"] == 0
        worker.handle(second)

        assert worker.survey() == []  # silent and empty now: removed
        assert "ghost" not in members(each_redis, queue)

    results = read_results(output_dir)
    assert sorted((e["request_id"], e["status"]) for e in results) == [
        ("req-0", "completed"),
        ("req-1", "completed"),
    ]
    assert not [m for m in messages if frames.exists(shm_name(m))]
    assert_drained(each_redis, settings)


def test_removal_checks_again_that_the_consumer_holds_nothing(
    each_redis: redis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the observation and the removal the consumer may have read entries:
    forget.lua looks again, atomically, since removing it would discard them."""
    queue = settings.hosting_tasks_queue
    each_redis.rpush(queue, b"task")
    ghost = member(each_redis, queue, "ghost")
    [entry] = ghost.fetch(10)
    with observer(settings, each_redis) as worker:
        assert worker.stream.forget("ghost") is False
        stale = Observation(0, 0, 0, None, [ConsumerInfo("ghost", 0, 10 * TIMEOUT_MS)])
        monkeypatch.setattr(worker.stream, "observe", lambda: stale)
        assert worker.survey() == []
        assert members(each_redis, queue)["ghost"]["pending"] == 1
        rows: Any = each_redis.xpending_range(
            Keys.for_queue(queue).stream, GROUP, "-", "+", 10, consumername="ghost"
        )
        assert [row["message_id"].decode() for row in rows] == [entry.id]

        ghost.settle(acked(entry))
        assert worker.stream.forget("ghost") is True
        assert "ghost" not in members(each_redis, queue)


def test_forget_reports_a_consumer_that_is_not_there(
    each_redis: redis.Redis, settings: Settings
) -> None:
    """Fails today: forget.lua promises 0 for a consumer that does not exist, but XGROUP
    DELCONSUMER answers 0 (pending entries it had) for a missing consumer too, and the
    script turns any answer >= 0 into 1. Two workers removing one silent consumer
    therefore both log it as removed."""
    queue = settings.hosting_tasks_queue
    stream = member(each_redis, queue, "observer")
    assert stream.stream.forget("never-joined") is False


def test_a_live_consumer_holding_entries_is_neither_removed_nor_rescued(
    make_settings: MakeSettings,
    settings: Settings,
    r: redis.Redis,
    frames: Frames,
    output_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A running worker keeps entries in hand past CONSUMER_TIMEOUT_MS (its output disk
    fails, so it pauses and touches them); another worker's hygiene must leave it and
    its entries alone, while it does remove a silent consumer meanwhile."""
    disk_down = threading.Event()
    disk_down.set()
    commit = Committer.commit

    def failing_commit(self: Committer, outcomes: Any) -> Any:
        if disk_down.is_set():
            raise DiskError("output disk failing (test)")
        return commit(self, outcomes)

    monkeypatch.setattr(Committer, "commit", failing_commit)
    busy = make_settings(CONSUMER_TIMEOUT_MS=TIMEOUT_MS, CONSUMER_NAME="busy")
    queue = busy.hosting_tasks_queue
    join(r, queue, "ghost")  # silent from now on: the clock of this test
    r.rpush(queue, *tasks(frames, "req", 2))

    with running(busy) as run, observer(settings, r) as other:
        run.wait(lambda: members(r, queue).get("busy", {}).get("pending") == 2, "work in hand")
        looks = 0

        def ghost_removed() -> bool:
            nonlocal looks
            assert other.survey() == [], "entries taken from a live worker"
            looks += 1
            now = members(r, queue)
            assert now.get("busy", {}).get("pending") == 2, (
                f"the live worker lost its entries: {now}"
            )
            return "ghost" not in now

        run.wait(ghost_removed, "the silent consumer removed", timeout=20)
        assert members(r, queue)["busy"]["idle"] < TIMEOUT_MS
        disk_down.clear()
        run.settled(2)

    assert looks > 10, "looked too few times to mean anything"
    assert run.worker.tally.completed == 2
    assert run.metrics.registry.get_sample_value("returner_deliveries_bucket", {"le": "1.0"}) == 2
    assert {e["status"] for e in read_results(output_dir)} == {"completed"}
    assert_drained(r, busy)


def test_an_idle_live_worker_is_not_taken_for_gone(
    make_settings: MakeSettings, r: redis.Redis, queue: str
) -> None:
    """Fails today on Redis 6.2 and 7.0: an XREADGROUP that returns nothing does not reset
    the consumer's idle time in XINFO CONSUMERS (Redis 7.2 changed that), so a worker
    with nothing to do looks silent however often fetch.lua reads. After
    CONSUMER_TIMEOUT_MS the other workers remove it ("... holding nothing: removed") and
    `status` marks it gone, although it talks to Redis every second."""
    a = make_settings(CONSUMER_TIMEOUT_MS=TIMEOUT_MS, CONSUMER_NAME="idle-a")
    b = make_settings(CONSUMER_TIMEOUT_MS=TIMEOUT_MS, CONSUMER_NAME="idle-b")
    with running(a) as run_a, running(b) as run_b:
        run_a.wait(lambda: {"idle-a", "idle-b"} <= set(members(r, queue)), "both joined")
        # Silent from now on: once it is gone, each worker has looked at the other after
        # more than CONSUMER_TIMEOUT_MS. Its name sorts last, so a worker's pass over
        # XINFO CONSUMERS reaches it after the live ones.
        join(r, queue, "zz-silent")

        def silent_one_removed() -> bool:
            now = members(r, queue)
            assert {"idle-a", "idle-b"} <= set(now), f"a live worker was removed: {now}"
            return "zz-silent" not in now

        run_b.wait(silent_one_removed, "the silent consumer removed", timeout=20)
        now = members(r, queue)
        assert {"idle-a", "idle-b"} <= set(now), f"a live worker was removed: {now}"
        assert max(now[n]["idle"] for n in ("idle-a", "idle-b")) < TIMEOUT_MS, now


def test_status_flags_silent_consumers_as_gone(
    r: redis.Redis, redis_url: str, queue: str, tmp_path: Path
) -> None:
    r.rpush(queue, b"held-1", b"held-2")
    assert len(member(r, queue, "ghost-full").fetch(10)) == 2
    join(r, queue, "ghost-empty")
    wait_silent(r, queue, ["ghost-full", "ghost-empty"])
    join(r, queue, "fresh")  # has just talked to Redis
    env = base_env(
        REDIS_URL=redis_url,
        HOSTING_TASKS_QUEUE=queue,
        OUTPUT_DIR=tmp_path / "out",
        CONSUMER_TIMEOUT_MS=TIMEOUT_MS,
    )

    shown = run_cli("status", "--json", env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    rows = {c["name"]: c for c in json.loads(shown.stdout)["consumers"]}
    assert {name: (c["gone"], c["pending"]) for name, c in rows.items()} == {
        "ghost-full": (True, 2),
        "ghost-empty": (True, 0),
        "fresh": (False, 0),
    }
    assert all(isinstance(c["gone"], bool) for c in rows.values())

    text = run_cli("status", env=env, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    lines = {line.split()[0]: line.rstrip() for line in text.stdout.splitlines() if line.split()}
    assert lines["ghost-full"].endswith("gone: entries to be taken over"), text.stdout
    assert lines["ghost-empty"].endswith("gone: to be removed"), text.stdout
    assert "gone" not in lines["fresh"], text.stdout

    # The flag follows CONSUMER_TIMEOUT_MS: at the default 10 s none of them is gone yet.
    default = {k: v for k, v in env.items() if k != "CONSUMER_TIMEOUT_MS"}
    later = run_cli("status", "--json", env=default, cwd=tmp_path)
    assert later.returncode == 0, later.stderr
    assert [c["gone"] for c in json.loads(later.stdout)["consumers"]] == [False] * 3
