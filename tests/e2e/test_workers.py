"""`returner run --workers N` end to end: a supervisor process and its worker processes,
against the suite's redis-server, with real shared memory and real files.

Worker processes are not the test's children: their pids come from the supervisor's
log ("worker <name> started (pid N)") and their state from /proc.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from returner import supervisor as sup
from returner.settings import Settings
from returner.stream import Consumer, Keys
from tests.conftest import Frames, random_frame, read_results, wait_for
from tests.e2e.conftest import POISON_SEAM, Service, run_cli
from tests.e2e.test_run import free_port, results_count

GROUP = "returner"
NAMES = ["e2e-0", "e2e-1"]  # CONSUMER_NAME=e2e (service_env), WORKERS=2
STARTED = re.compile(r"worker (\S+) started \(pid (\d+)\)")


# -- helpers ------------------------------------------------------------------------------


def started(svc: Service) -> list[tuple[str, int]]:
    """Every worker start the supervisor logged, in order: (name, pid)."""
    if svc.proc is None or not svc.log.exists():
        return []
    return [(m[1], int(m[2])) for m in STARTED.finditer(svc.logs(None))]


def worker_pids(svc: Service) -> dict[str, int]:
    """The latest pid of each worker."""
    return dict(started(svc))


def joined(svc: Service, name: str) -> int:
    """How many times worker `name` has joined the group (once per start)."""
    return svc.logs(None).count(f"consumer {name} of group")


def wait_joined(svc: Service, names: list[str], times: int = 1) -> None:
    wait_for(
        lambda: all(joined(svc, n) >= times for n in names) or not svc.alive(),
        timeout=30,
        what=f"workers {names} to join the group",
    )
    assert svc.alive(), svc.logs()


def state(pid: int) -> str | None:
    """The /proc state letter of `pid` (R, S, T, Z, ...), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def process_alive(pid: int) -> bool:
    return state(pid) not in (None, "Z", "X")


def is_worker(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return b"returner" in argv and b"--health-file" in argv


def held(r: redis.Redis, stream: str, consumer: str) -> set[str]:
    """IDs of the entries pending under `consumer` (none before the group exists)."""
    try:
        rows: Any = r.xpending_range(stream, GROUP, "-", "+", 10_000, consumername=consumer)
    except redis.ResponseError:  # NOGROUP: the workers have not created it yet
        return set()
    return {row["message_id"].decode() for row in rows}


def consumer_names(r: redis.Redis, stream: str) -> set[str]:
    return {c["name"].decode() for c in r.xinfo_consumers(stream, GROUP)}


def pending(r: redis.Redis, stream: str) -> int:
    return int(r.xpending(stream, GROUP)["pending"])


def scrape(port: int, path: str) -> tuple[int, str]:
    """(status, body); (0, "") while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics by (name, labels); empty while nothing listens."""
    status, body = scrape(port, "/metrics")
    if status != 200:
        return {}
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def metric(port: int, name: str, **labels: str) -> float | None:
    return samples(port).get((name, frozenset(labels.items())))


def noise_frames(count: int) -> list[np.ndarray]:
    """Frames that compress badly, so a batch takes long enough to be caught in hand."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (1448, 1024, 3), dtype=np.uint8) for _ in range(count)]


def push_noise(r: redis.Redis, queue: str, frames: Frames, count: int) -> None:
    palette = noise_frames(4)
    r.rpush(queue, *[frames.task(palette[i % 4], "req", f"img_{i}") for i in range(count)])


def small_tasks(frames: Frames, start: int, count: int) -> list[bytes]:
    """Tasks img_<start>... img_<start + count - 1> with small frames."""
    ids = range(start, start + count)
    return [frames.task(random_frame((40, 56, 3), i), "req", f"img_{i}") for i in ids]


def assert_completed_once(output_dir: Path, count: int) -> None:
    results = read_results(output_dir)
    ids = Counter(e["image_id"] for e in results if e["status"] == "completed")
    assert sorted(ids) == sorted(f"img_{i}" for i in range(count))
    assert set(ids.values()) == {1}, "a task completed twice"
    assert len(results) == count


def metrics_dirs(env: dict[str, str]) -> list[Path]:
    return sorted(Path(env["TMPDIR"]).glob("returner-metrics-*"))


def freeze(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: state(pid) == "T", timeout=5, interval=0.001, what=f"pid {pid} stopped")


def kill_one_holding_work(svc: Service, r: redis.Redis, stream: str) -> tuple[str, int]:
    """SIGKILL a worker while it holds entries: (its name, its pid).

    A worker seen holding entries is frozen (SIGSTOP), so that what it holds cannot
    change while the test looks, and killed if it still holds some; else it goes on.
    """

    def attempt() -> tuple[str, int] | None:
        for name, pid in worker_pids(svc).items():
            if not held(r, stream, name) or not process_alive(pid):
                continue
            freeze(pid)
            if held(r, stream, name):
                os.kill(pid, signal.SIGKILL)
                return name, pid
            os.kill(pid, signal.SIGCONT)
        return None

    found: tuple[str, int] = wait_for(
        attempt, timeout=30, interval=0.005, what="a worker holding entries"
    )
    return found


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def workers_env(service_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Two workers; ENCODER_THREADS left to the supervisor; a TMPDIR of the test's own,
    so the supervisor's metrics directory can be checked."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in service_env.items() if k != "ENCODER_THREADS"}
    env.update(WORKERS="2", TMPDIR=str(tmp))
    return env


@pytest.fixture
def supervised(
    service: Callable[..., Service], workers_env: dict[str, str]
) -> Iterator[Callable[..., Service]]:
    """`make(**settings)`: a supervisor (not started) with these settings on top of
    workers_env. Afterwards: the supervisor, then any worker still running, are killed."""
    made: list[Service] = []

    def make(**settings: Any) -> Service:
        svc = service({**workers_env, **{k: str(v) for k, v in settings.items()}})
        made.append(svc)
        return svc

    yield make
    for svc in made:
        if svc.alive():
            svc.kill9()
        for _, pid in started(svc):
            if process_alive(pid) and is_worker(pid):
                os.kill(pid, signal.SIGKILL)


# -- names, sessions, threads, log tags -------------------------------------------------


def test_workers_have_distinct_names_that_survive_a_restart(
    supervised: Callable[..., Service], r: redis.Redis, queue: str
) -> None:
    names = [f"e2e-{i}" for i in range(3)]
    expanded = f"{queue}:{socket.gethostname()}"
    stream = Keys.for_queue(expanded).stream
    settings = {"WORKERS": 3, "HOSTING_TASKS_QUEUE": f"{queue}:{{hostname}}"}

    first = supervised(**settings).start()
    wait_joined(first, names)
    assert consumer_names(r, stream) == set(names)
    pids = worker_pids(first)
    assert set(pids) == set(names)
    assert first.proc is not None
    supervisor_session = os.getsid(first.proc.pid)
    for name, pid in pids.items():
        assert os.getsid(pid) == pid != supervisor_session, f"{name} is not in a session of its own"
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--consumer") + 1] == name.encode()
        assert b"--health-file" in argv
    threads = -(-(os.cpu_count() or 1) // 3)  # ceil(cores / WORKERS)
    logs = first.logs(None)
    for name in names:
        # the worker's own lines are tagged with its name; the supervisor's are not
        assert (
            f"[{name}] returner.worker: consumer {name} of group {GROUP} on {stream}, "
            f"{threads} encoder threads"
        ) in logs
        assert re.search(rf"^\S+ \S+ INFO +returner\.supervisor: worker {name} started", logs, re.M)
    assert first.stop(timeout=15) == 0
    assert consumer_names(r, stream) == set(names)

    second = supervised(**settings).start()
    wait_joined(second, names)
    assert consumer_names(r, stream) == set(names), "a restart added or renamed consumers"
    assert set(worker_pids(second)) == set(names)
    assert not set(worker_pids(second).values()) & set(pids.values())
    assert second.stop(timeout=15) == 0


def test_json_logs_of_workers_carry_their_name(
    supervised: Callable[..., Service],
    r: redis.Redis,
    queue: str,
    output_dir: Path,
    frames: Frames,
) -> None:
    svc = supervised(LOG_FORMAT="json").start()
    wait_joined(svc, NAMES)
    r.rpush(
        queue, *[frames.task(random_frame((32, 48, 3), i), "req", f"img_{i}") for i in range(4)]
    )
    wait_for(lambda: results_count(output_dir) == 4, what="four results")
    assert svc.stop(timeout=15) == 0

    docs = [json.loads(line) for line in svc.logs(None).splitlines() if line.strip()]
    for name in NAMES:
        [join] = [d for d in docs if d["msg"].startswith(f"consumer {name} of group")]
        assert join["worker"] == name
        [spawn] = [d for d in docs if re.fullmatch(rf"worker {name} started \(pid \d+\)", d["msg"])]
        assert "worker" not in spawn, "the supervisor's own records carry no worker field"
    settled = [d for d in docs if d.get("outcome") == "completed"]
    assert len(settled) == 4
    assert {d["worker"] for d in settled} <= set(NAMES)
    assert all(
        "worker" in d for d in docs if d["logger"] in ("returner.worker", "returner.pipeline")
    )


# -- metrics and readiness ----------------------------------------------------------------


def test_metrics_are_summed_over_workers_and_ready_when_all_are_up(
    supervised: Callable[..., Service],
    workers_env: dict[str, str],
    r: redis.Redis,
    redis_url: str,
    queue: str,
    output_dir: Path,
    frames: Frames,
) -> None:
    """Each worker starts with entries of its own pending (a restarted consumer finishes
    its own first), so both processes certainly settle tasks and /metrics must add them."""
    port = free_port()
    n = 0
    own: dict[str, set[str]] = {}
    for name in NAMES:
        r.rpush(queue, *small_tasks(frames, n, 4))
        n += 4
        earlier_run = Consumer(redis.Redis.from_url(redis_url), queue, GROUP, name)
        earlier_run.stream.ensure_group()
        own[name] = {e.id for e in earlier_run.fetch(10)}
        assert len(own[name]) == 4
    r.rpush(queue, *small_tasks(frames, n, 12))
    total = n + 12

    svc = supervised(METRICS_PORT=port).start()
    wait_for(
        lambda: metric(port, "returner_tasks_total", outcome="completed") == total,
        timeout=30,
        what=f"returner_tasks_total{{outcome=completed}} == {total}",
    )
    wait_for(lambda: scrape(port, "/readyz")[0] == 200, what="/readyz 200")
    assert scrape(port, "/readyz") == (200, "ok\n")
    assert scrape(port, "/healthz") == (200, "ok\n")
    m = samples(port)

    def value(name: str, **labels: str) -> float | None:
        return m.get((name, frozenset(labels.items())))

    assert value("returner_workers") == 2
    assert value("returner_worker_restarts_total") == 0
    assert value("returner_ready") == 1
    for outcome in ("duplicate", "failed", "dead_lettered"):
        assert value("returner_tasks_total", outcome=outcome) == 0, outcome
    assert value("returner_task_duration_seconds_count") == total
    # own pending entries were read a second time: delivery 2; the rest delivery 1
    assert value("returner_deliveries_bucket", le="1.0") == total - 8
    assert value("returner_deliveries_bucket", le="2.0") == total
    logs = svc.logs(None)
    for name, ids in own.items():
        for entry_id in ids:
            assert re.search(
                rf"\[{name}\] returner\.worker: task \S+ completed .*\(entry {entry_id}\)", logs
            ), f"{name} did not finish its own entry {entry_id}"
    assert_completed_once(output_dir, total)
    assert svc.stop(timeout=15) == 0
    assert metrics_dirs(workers_env) == [], "the supervisor left its metrics directory"


# -- crashes and restarts -----------------------------------------------------------------


def test_a_killed_worker_is_restarted_under_its_name_and_finishes_its_own_entries(
    supervised: Callable[..., Service],
    r: redis.Redis,
    queue: str,
    output_dir: Path,
    frames: Frames,
) -> None:
    port, count = free_port(), 60
    stream = Keys.for_queue(queue).stream
    svc = supervised(METRICS_PORT=port).start()
    wait_for(lambda: scrape(port, "/readyz")[0] == 200, what="/readyz 200 with every worker up")
    push_noise(r, queue, frames, count)

    victim, old_pid = kill_one_holding_work(svc, r, stream)
    wait_for(
        lambda: f"worker {victim} (pid {old_pid}) died with signal SIGKILL" in svc.logs(None),
        timeout=5,
        what="the supervisor to notice the death",
    )
    # Restarted 0.5 s after the death: until then nothing touches the victim's entries.
    orphaned = held(r, stream, victim)
    assert orphaned, "killed while holding nothing"
    status, body = scrape(port, "/readyz")
    assert status == 503 and victim in body, (status, body)

    wait_for(lambda: worker_pids(svc)[victim] != old_pid, timeout=10, what="the restart")
    wait_for(lambda: results_count(output_dir) == count, timeout=60, what="every result")
    wait_for(lambda: scrape(port, "/readyz")[0] == 200, what="/readyz 200 again")
    m = samples(port)
    assert m[("returner_worker_restarts_total", frozenset())] == 1
    assert m[("returner_workers", frozenset())] == 2
    completed = m[("returner_tasks_total", frozenset({("outcome", "completed")}))]
    duplicate = m[("returner_tasks_total", frozenset({("outcome", "duplicate")}))]
    assert completed + duplicate == count

    logs = svc.logs(None)
    assert f"worker {victim} (pid {old_pid}) died with signal SIGKILL; restarting in 0.5s" in logs
    for entry_id in orphaned:
        assert f"[{victim}] returner.worker: recovering entry {entry_id} of an earlier run" in logs
        settled = rf"\[{victim}\] returner\.worker: task \S+ (completed|duplicate)\b.*"
        assert re.search(settled + rf"\(entry {entry_id}\)", logs), (
            f"{victim} did not settle its own entry {entry_id}"
        )
    assert svc.stop(timeout=15) == 0
    assert_completed_once(output_dir, count)
    assert consumer_names(r, stream) == set(NAMES)
    assert (pending(r, stream), r.xlen(stream)) == (0, 0)


def test_a_poison_frame_is_dead_lettered_while_the_supervisor_keeps_restarting(
    supervised: Callable[..., Service],
    r: redis.Redis,
    queue: str,
    output_dir: Path,
    frames: Frames,
) -> None:
    port, max_deliveries = free_port(), 2
    ids = [f"img_{i}" for i in range(6)]
    ids.insert(2, "poison")
    messages = {i: frames.task(random_frame((48, 64, 3), n), "req", i) for n, i in enumerate(ids)}
    r.rpush(queue, *[messages[i] for i in ids])  # one push: one batch
    svc = supervised(
        METRICS_PORT=port, MAX_DELIVERIES=max_deliveries, RETURNER_TEST_CRASH_ON="poison",
        **POISON_SEAM,
    ).start()

    wait_for(lambda: results_count(output_dir) == len(ids), timeout=30, what="every result")
    wait_for(lambda: scrape(port, "/readyz")[0] == 200, what="every worker back up")
    assert svc.alive()
    m = samples(port)
    assert m[("returner_worker_restarts_total", frozenset())] == max_deliveries
    assert m[("returner_workers", frozenset())] == 2
    assert m[("returner_tasks_total", frozenset({("outcome", "completed")}))] == 6
    assert m[("returner_tasks_total", frozenset({("outcome", "dead_lettered")}))] == 1

    deaths = re.findall(
        r"worker (\S+) \(pid \d+\) died with signal SIGKILL; restarting in ([\d.]+)s",
        svc.logs(None),
    )
    assert len(deaths) == max_deliveries
    assert len({name for name, _ in deaths}) == 1, "the poison entry stayed with its consumer"
    assert [delay for _, delay in deaths] == ["0.5", "1.0"], "the restart delay doubles"

    by_id = {e["image_id"]: e for e in read_results(output_dir)}
    assert len(by_id) == len(ids)
    assert by_id["poison"]["status"] == "failed"
    assert by_id["poison"]["error"] == f"gave up after {max_deliveries + 1} deliveries"
    assert all(by_id[i]["status"] == "completed" for i in ids if i != "poison")
    [(_, dead)] = r.xrange(Keys.for_queue(queue).dead)
    assert dead[b"task"] == messages["poison"]
    assert int(dead[b"deliveries"]) == max_deliveries + 1
    assert svc.stop(timeout=15) == 0
    assert r.xlen(Keys.for_queue(queue).stream) == 0


# -- stopping -----------------------------------------------------------------------------


def busy_workers(supervised: Callable[..., Service], r: redis.Redis, queue: str,
                 frames: Frames, count: int) -> tuple[Service, dict[str, int]]:
    """A supervisor whose workers have joined the group and hold some of `count` frames
    just pushed; with the workers' pids by name."""
    svc = supervised().start()
    wait_joined(svc, NAMES)
    pids = worker_pids(svc)
    push_noise(r, queue, frames, count)
    wait_for(lambda: pending(r, Keys.for_queue(queue).stream) > 0, what="work in hand")
    return svc, pids


def test_sigterm_drains_every_worker(
    supervised: Callable[..., Service],
    workers_env: dict[str, str],
    r: redis.Redis,
    queue: str,
    output_dir: Path,
    frames: Frames,
) -> None:
    count = 60
    stream = Keys.for_queue(queue).stream
    svc, pids = busy_workers(supervised, r, queue, frames, count)

    svc.signal(signal.SIGTERM)
    assert svc.proc is not None
    assert svc.proc.wait(timeout=15) == 0, svc.logs()
    assert all(state(pid) is None for pid in pids.values()), "a worker outlived its supervisor"
    assert (pending(r, stream), r.xlen(stream)) == (0, 0), "entries in hand were not finished"
    done = results_count(output_dir)
    assert done + r.llen(queue) == count
    completed = [e for e in read_results(output_dir) if e["status"] == "completed"]
    assert len(completed) == done == len({e["image_id"] for e in completed})
    logs = svc.logs(None)
    for name in NAMES:
        assert f"[{name}] returner.worker: asked to stop" in logs
    assert metrics_dirs(workers_env) == [], "the supervisor left its metrics directory"
    segments = [json.loads(m)["shm_info"]["shm_name"] for m in r.lrange(queue, 0, -1)]
    assert sum(frames.exists(s) for s in frames.names) == len(segments), "segments leaked"


def test_a_second_signal_makes_workers_leave_at_once(
    supervised: Callable[..., Service],
    r: redis.Redis,
    queue: str,
    output_dir: Path,
    frames: Frames,
) -> None:
    """Big batches keep the workers draining for a while after the first signal; they are
    frozen then, so they surely still hold entries when the second signal comes. They
    must leave those pending rather than finish them."""
    count, batch = 512, 128
    stream = Keys.for_queue(queue).stream
    svc = supervised(BATCH_SIZE=batch).start()
    wait_joined(svc, NAMES)
    pids = worker_pids(svc)
    rng = np.random.default_rng(1)
    palette = [rng.integers(0, 256, (360, 480, 3), dtype=np.uint8) for _ in range(4)]
    r.rpush(queue, *[frames.task(palette[i % 4], "req", f"img_{i}") for i in range(count)])
    wait_for(lambda: all(held(r, stream, n) for n in NAMES), what="both workers holding work")

    svc.signal(signal.SIGTERM)
    frozen: set[str] = set()

    def freeze_when_draining() -> bool:
        logs = svc.logs(None)
        for name in set(NAMES) - frozen:
            if f"[{name}] returner.worker: asked to stop" in logs:
                freeze(pids[name])
                frozen.add(name)
        return frozen == set(NAMES)

    wait_for(freeze_when_draining, timeout=10, interval=0.002, what="both workers draining")
    in_hand = {name: held(r, stream, name) for name in NAMES}
    assert any(in_hand.values()), "drained too fast to test a second signal"
    svc.signal(signal.SIGTERM)
    assert svc.proc is not None
    assert svc.proc.wait(timeout=5) == 128 + signal.SIGTERM
    for pid in pids.values():
        os.kill(pid, signal.SIGCONT)  # each finds the supervisor's second SIGTERM waiting
    wait_for(
        lambda: not any(process_alive(pid) for pid in pids.values()),
        timeout=3,
        what="the workers to leave at once",
    )
    for name in NAMES:
        assert held(r, stream, name) == in_hand[name], f"{name} went on after the second signal"
    logs = svc.logs(None)
    assert not any(f"[{n}] returner: stopped:" in logs for n in NAMES), "a worker drained"

    # Nothing is lost: a new supervisor finishes everything, each task once.
    again = supervised(BATCH_SIZE=batch).start()
    wait_for(lambda: results_count(output_dir) == count, timeout=60, what="every result")
    assert again.stop(timeout=15) == 0
    assert_completed_once(output_dir, count)
    assert (pending(r, stream), r.xlen(stream)) == (0, 0)


def test_workers_stop_on_their_own_when_the_supervisor_is_killed(
    supervised: Callable[..., Service],
    r: redis.Redis,
    queue: str,
    output_dir: Path,
    frames: Frames,
) -> None:
    count = 60
    stream = Keys.for_queue(queue).stream
    svc, pids = busy_workers(supervised, r, queue, frames, count)

    svc.kill9()
    wait_for(
        lambda: all(
            f"[{n}] returner.supervisor: supervisor is gone; stopping" in svc.logs(None)
            for n in NAMES
        ),
        timeout=3,  # they look every second
        what="both workers to notice",
    )
    wait_for(
        lambda: not any(process_alive(pid) for pid in pids.values()),
        timeout=15,
        what="the workers to drain and exit",
    )
    logs = svc.logs(None)
    for name in NAMES:
        assert f"[{name}] returner: stopped: Tally(" in logs, f"{name} did not drain"
    assert (pending(r, stream), r.xlen(stream)) == (0, 0), "entries in hand were not finished"
    done = results_count(output_dir)
    assert done + r.llen(queue) == count
    completed = [e for e in read_results(output_dir) if e["status"] == "completed"]
    assert len(completed) == done == len({e["image_id"] for e in completed})


def test_workers_started_just_before_the_supervisor_dies_stop_too(
    supervised: Callable[..., Service],
) -> None:
    """The supervisor is SIGKILLed while its workers are still starting up (as after a
    restart, or an OOM kill of the supervisor). They must still notice and stop.

    Fails today: report_health() records `parent = os.getppid()` only once the worker has
    imported everything and built its settings (~0.3 s after the spawn). A worker whose
    supervisor died before that records its new parent (init or a subreaper), never
    sees it change, and serves on forever as an orphan under a consumer name the next
    supervisor will start again.
    """
    svc = supervised().start()
    wait_for(lambda: len(worker_pids(svc)) == 2, interval=0.001, what="both workers spawned")
    svc.kill9()
    pids = worker_pids(svc)
    wait_for(
        lambda: not any(process_alive(pid) for pid in pids.values()),
        timeout=10,
        what="orphaned workers to stop",
    )


def test_a_busy_metrics_port_leaves_no_temp_dir(
    workers_env: dict[str, str], tmp_path: Path
) -> None:
    """Fails today: Supervisor.__init__ makes its metrics directory before cli.supervise()
    finds METRICS_PORT taken; the exit path never reaches Supervisor.run()'s rmtree."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("run", env={**workers_env, "METRICS_PORT": str(port)}, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "METRICS_PORT" in result.stderr
    assert "started (pid" not in result.stderr
    assert metrics_dirs(workers_env) == []


# -- supervisor internals -----------------------------------------------------------------


def test_restart_delay_doubles_to_a_cap_and_resets_after_steady_running(
    make_settings: Callable[..., Settings], redis_url: str
) -> None:
    supervisor = sup.Supervisor(make_settings(WORKERS=2), redis_url, threading.Event())
    try:
        child, now = supervisor.children[0], 1000.0

        def dies_after(ran: float) -> float:
            nonlocal now
            child.process = SimpleNamespace(pid=4_000_000, returncode=-9)  # type: ignore[assignment]
            child.started = now
            now += ran
            supervisor._reap(child, now)
            assert child.process is None
            delay = round(child.due - now, 6)
            now = child.due
            return delay

        assert [dies_after(0.1) for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
        assert dies_after(sup.STEADY_AFTER_S) == 0.5, "30 s of running resets the delay"
        assert dies_after(0.1) == 1.0
        assert dies_after(sup.STEADY_AFTER_S - 0.5) == 2.0
        assert child.restarts == 12
        assert supervisor.registry.get_sample_value("returner_worker_restarts_total") == 12
    finally:
        shutil.rmtree(supervisor.dir, ignore_errors=True)


def test_child_environment_carries_every_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in [f.alias for f in Settings.model_fields.values() if f.alias]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env
    parent = Settings(
        _env_file=None,  # type: ignore[call-arg]
        REDIS_URL="redis://127.0.0.1:1/0",
        HOSTING_TASKS_QUEUE="q:{hostname}",
        OUTPUT_DIR=tmp_path / "out",
        JPEG_QUALITY=55,
        JPEG_SUBSAMPLING="444",
        CONSUMER_NAME="box",
        CONSUMER_TIMEOUT_MS=3000,
        MAX_DELIVERIES=7,
        LOG_FORMAT="json",
        WORKERS=3,
        METRICS_PORT=9999,
        REDIS_WAIT_REPLICAS=1,
    )
    env = sup.child_environment(parent, "redis://elsewhere:6379/0", tmp_path / "m")
    assert env["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "m")
    assert env["REDIS_CLUSTER"] == "auto"
    assert env["ENCODER_THREADS"] == str(-(-(os.cpu_count() or 1) // 3))
    for key, value in env.items():
        if key != "PROMETHEUS_MULTIPROC_DIR":  # chosen at import: keep it out of this process
            monkeypatch.setenv(key, value)
    child = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (child.workers, child.metrics_port) == (1, 0)
    assert child.redis_url == "redis://elsewhere:6379/0"
    assert child.encoder_threads == -(-(os.cpu_count() or 1) // 3)
    same = set(Settings.model_fields) - {"workers", "metrics_port", "redis_url", "encoder_threads"}
    for field in same:
        assert getattr(child, field) == getattr(parent, field), field

    explicit = Settings(
        _env_file=None,  # type: ignore[call-arg]
        REDIS_URL="redis://127.0.0.1:1/0",
        WORKERS=3,
        ENCODER_THREADS=5,
    )
    assert sup.child_environment(explicit, "redis://x:1/0", tmp_path)["ENCODER_THREADS"] == "5"
