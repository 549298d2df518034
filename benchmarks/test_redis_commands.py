"""Redis commands per task of `returner run` at saturation, from `INFO commandstats`.

A redis-server of its own (nothing else talks to it, so the counts are the service's),
up to 2,000 frames of 1448x1024x3 pushed BEFORE the service starts (fewer if /dev/shm
or memory is short: at most 45% of what is free), `CONFIG RESETSTAT` just before it
starts, and the statistics read as soon as the last task is acknowledged.

Redis counts every command a Lua script runs in commandstats too (fetch.lua's LPOP,
XADD and XREADGROUP, settle.lua's XACK and XDEL, ...), and on Redis 7 in
`total_commands_processed` as well, so neither tells the commands the client issued.
A MONITOR connection tells them apart: it shows script commands as `[0 lua]`. Two
figures come out per task: (a) every call in commandstats, (b) the calls the client
issued (a minus those run inside scripts), plus the break-down per command and the
EVALSHA calls per script (MONITOR shows each script's SHA1). MONITOR is also how the
test knows every task was acknowledged (the IDs in settle.lua's XACK) without sending
Redis a command of its own. Our own commands (MONITOR, CONFIG RESETSTAT, INFO, ECHO)
are left out. Counts depend on the run's length only through the service's timed
calls (queue observation every 2 s, a claim pass every 15 s).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.conftest import Frame, RedisServer, Segments, private_redis, report, wait_until
from tests.conftest import count_records

pytestmark = pytest.mark.bench

FRAMES = 2_000
SHARE_OF_FREE = 0.45
OURS = {"monitor", "config|resetstat", "info", "echo"}
CONTAINERS = {"xinfo", "xgroup", "client", "script", "config", "memory", "object", "command",
              "function", "acl", "slowlog", "latency", "pubsub", "cluster", "debug"}
_LINE = re.compile(rb'^\+[\d.]+ \[\d+ ([^\]]+)\] (.*)$')
_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')


def _name(args: list[bytes]) -> str:
    """commandstats' name of a command: `xinfo|consumers` for container commands."""
    cmd = args[0].decode(errors="replace").lower()
    if cmd in CONTAINERS and len(args) > 1:
        return f"{cmd}|{args[1].decode(errors='replace').lower()}"
    return cmd


class Monitor(threading.Thread):
    """Reads MONITOR on a raw socket: what scripts ran, EVALSHA by SHA1, IDs acked."""

    def __init__(self, host: str, port: int, marker: str) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection((host, port))
        self.sock.sendall(b"MONITOR\r\n")
        self.marker = marker.encode()
        self.scripted: Counter[str] = Counter()
        self.evalsha: Counter[str] = Counter()
        self.acked = 0
        self.error: BaseException | None = None
        self.seen_marker = threading.Event()

    def run(self) -> None:
        buf = b""
        try:
            while not self.seen_marker.is_set():
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return
                buf += chunk
                *lines, buf = buf.split(b"\r\n")
                for line in lines:
                    self._line(line)
        except OSError as exc:
            if not self.seen_marker.is_set():
                self.error = exc

    def _line(self, line: bytes) -> None:
        match = _LINE.match(line)
        if not match:
            return
        source, rest = match.groups()
        args = [a.replace(b'\\"', b'"') for a in _ARG.findall(rest)]
        if not args:
            return
        name = _name(args)
        if source == b"lua":
            self.scripted[name] += 1
            if name == "xack":  # XACK key group id...: settle.lua
                self.acked += len(args) - 3
        elif name == "evalsha" and len(args) > 1:
            self.evalsha[args[1].decode()] += 1
        elif name == "echo" and len(args) > 1 and args[1] == self.marker:
            self.seen_marker.set()

    def close(self) -> None:
        self.seen_marker.set()
        self.sock.close()


def _scripts() -> dict[str, tuple[str, set[str]]]:
    """SHA1 -> (script name, commands it can call), from returner/lua."""
    out = {}
    for res in resources.files("returner").joinpath("lua").iterdir():
        if res.name.endswith(".lua"):
            source = res.read_text()
            calls = {c.lower() for c in re.findall(r"redis\.call\('([A-Za-z]+)'", source)}
            sha = hashlib.sha1(source.encode()).hexdigest()
            out[sha] = (res.name[:-4], calls)
    return out


def _frames_that_fit(frame: Frame) -> int:
    free = shutil.disk_usage("/dev/shm").free
    try:
        import psutil

        free = min(free, psutil.virtual_memory().available)
    except ImportError:
        pass
    return min(FRAMES, int(free * SHARE_OF_FREE) // frame.nbytes)


def _commandstats(client: Any) -> dict[str, dict[str, int]]:
    stats: dict[str, Any] = client.info("commandstats")
    out = {}
    for key, fields in stats.items():
        name = key.removeprefix("cmdstat_")
        out[name] = {k: int(fields.get(k, 0)) for k in ("calls", "rejected_calls", "failed_calls")}
    return out


def _start_service(server: RedisServer, queue: str, tmp: Path, log: Any
                   ) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(REDIS_URL=server.url, HOSTING_TASKS_QUEUE=queue, OUTPUT_DIR=str(tmp / "out"),
               METRICS_PORT="0", LOG_LEVEL="WARNING")
    return subprocess.Popen([sys.executable, "-m", "returner", "run"], env=env, cwd=tmp,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.timeout(900)
def test_redis_commands_per_task(benchmark: Any, tmp_path: Path, page_frame: Frame,
                                 segments: Segments) -> None:
    count = _frames_that_fit(page_frame)
    if count < 100:
        pytest.skip(f"/dev/shm or memory too small for {FRAMES} frames (room for {count})")
    queue = f"bench:commands:{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "returner.log"
    got: dict[str, Any] = {}

    with private_redis(tmp_path / "redis") as server, log_path.open("wb") as log:
        kwargs = server.client.connection_pool.connection_kwargs
        started = time.perf_counter()
        cpu_start = _redis_cpu(server.client)
        for i in range(count):
            segments.push(server.client, queue, page_frame, "bench_commands", f"cmd_{i:05d}")
        report("redis_commands.push_time", time.perf_counter() - started, "s", frames=count)
        got["cpu_pushed"] = _redis_cpu(server.client)
        report("redis_commands.redis_cpu_per_push", (got["cpu_pushed"] - cpu_start) / count * 1e6,
               "us/task", note="Redis CPU (user+sys) per RPUSH of the producer")
        marker = f"bench-marker-{uuid.uuid4().hex}"
        monitor = Monitor(kwargs.get("host", "127.0.0.1"), int(kwargs["port"]), marker)
        monitor.start()
        proc: subprocess.Popen[bytes] | None = None
        try:

            def run() -> None:
                nonlocal proc
                server.client.config_resetstat()
                proc = _start_service(server, queue, tmp_path, log)
                wait_until(lambda: monitor.acked >= count or proc.poll() is not None
                           or monitor.error, 600, "every task to be acknowledged", 0.005)
                got["stats"] = _commandstats(server.client)  # first: nothing else counted
                got["cpu_served"] = _redis_cpu(server.client)

            benchmark.pedantic(run, rounds=1, iterations=1)
            server.client.echo(marker)
            wait_until(monitor.seen_marker.is_set, 30, "MONITOR to catch up")
            assert monitor.error is None, monitor.error
            assert proc is not None and proc.poll() is None, log_path.read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, log_path.read_text()[-3000:]
            stream = f"{{{queue}}}:stream"
            assert server.client.llen(queue) == 0
            assert server.client.xlen(stream) == 0
            assert server.client.xpending(stream, "returner")["pending"] == 0
            assert segments.left() == 0, "the service left segments in /dev/shm"
        finally:
            monitor.close()
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    _report(got["stats"], monitor, count)
    report("redis_commands.redis_cpu_per_task", (got["cpu_served"] - got["cpu_pushed"]) / count
           * 1e6, "us/task", note="Redis CPU (user+sys) per task served, at saturation")


def _redis_cpu(client: Any) -> float:
    """Seconds of CPU the Redis server has used (user + sys, main thread and children)."""
    cpu: dict[str, Any] = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _report(stats: dict[str, dict[str, int]], monitor: Monitor, tasks: int) -> None:
    theirs = {k: v for k, v in stats.items() if k not in OURS}
    total = sum(v["calls"] for v in theirs.values())
    scripted = sum(monitor.scripted.values())
    scripts = _scripts()
    print(f"\n  {'command':<22}{'calls':>8}{'per task':>10}{'in scripts':>12}{'by client':>11}"
          f"{'failed':>8}")
    for name, v in sorted(theirs.items(), key=lambda kv: -kv[1]["calls"]):
        inside = monitor.scripted.get(name, 0)
        by_client = v["calls"] - inside
        print(f"  {name:<22}{v['calls']:>8}{v['calls'] / tasks:>10.3f}{inside:>12}"
              f"{by_client:>11}{v['failed_calls'] + v['rejected_calls']:>8}")
        report(f"redis_commands.per_task.{name}", v["calls"] / tasks, "calls/task",
               calls=v["calls"], in_scripts=inside, by_client=by_client,
               failed=v["failed_calls"], rejected=v["rejected_calls"])
    for sha, calls in sorted(monitor.evalsha.items(), key=lambda kv: -kv[1]):
        name, _ = scripts.get(sha, (sha[:12], set()))
        print(f"  evalsha {name:<14}{calls:>8}{calls / tasks:>10.3f}")
        report(f"redis_commands.evalsha.{name}", calls / tasks, "calls/task", calls=calls)
    unexpected = set(monitor.scripted) - set().union(*(c for _, c in scripts.values()))
    if unexpected:
        print(f"  commands run in scripts but not found in returner/lua: {sorted(unexpected)}")
    report("redis_commands.tasks", tasks, "tasks")
    report("redis_commands.all_per_task", total / tasks, "calls/task", calls=total,
           note="(a) every commandstats call, commands inside scripts included")
    report("redis_commands.client_per_task", (total - scripted) / tasks, "calls/task",
           calls=total - scripted,
           note="(b) commands the client issued: (a) minus those run inside Lua scripts")
    report("redis_commands.scripted_per_task", scripted / tasks, "calls/task", calls=scripted)


SMALL_TASKS = 5_000


@pytest.mark.timeout(600)
def test_redis_cpu_per_task(benchmark: Any, tmp_path: Path, segments: Segments) -> None:
    """Redis CPU per task with small frames (64x64), where the returner runs fastest and
    Redis is most likely to be the limit; no MONITOR attached. The renderer's RPUSH is
    measured apart: segments are made first, then their tasks pushed one by one."""
    from returner.producer import task_message

    frame = np.zeros((64, 64, 3), np.uint8)
    queue = f"bench:cpu:{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out"
    got: dict[str, float] = {}
    with private_redis(tmp_path / "redis") as server, (tmp_path / "log").open("wb") as log:
        client = server.client
        messages = [task_message(segments.put(frame), frame.shape, "bench_cpu", f"cpu_{i:05d}")
                    for i in range(SMALL_TASKS)]
        before = _redis_cpu(client)
        for message in messages:
            client.rpush(queue, message)
        pushed = _redis_cpu(client)
        proc: subprocess.Popen[bytes] | None = None

        def run() -> None:
            nonlocal proc
            got["start"] = time.perf_counter()
            proc = _start_service(server, queue, tmp_path, log)
            wait_until(lambda: count_records(out) >= SMALL_TASKS or proc.poll() is not None, 300,
                       "every task to be recorded", 0.05)
            got["served"] = _redis_cpu(client)
            got["seconds"] = time.perf_counter() - got["start"]

        try:
            benchmark.pedantic(run, rounds=1, iterations=1)
            assert proc is not None and proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        assert client.xlen(f"{{{queue}}}:stream") == 0
    report("redis_cpu.push_per_task", (pushed - before) / SMALL_TASKS * 1e6, "us/task",
           note="Redis CPU (user+sys) per RPUSH of the renderer, one round trip each")
    report("redis_cpu.serve_per_task", (got["served"] - pushed) / SMALL_TASKS * 1e6, "us/task",
           note="Redis CPU (user+sys) per task served, 64x64 frames, start-up included")
    report("redis_cpu.tasks_per_s", SMALL_TASKS / got["seconds"], "tasks/s",
           note="64x64 frames, from process start to the last result")


COST_TASKS, COST_ROUNDS = 4_000, 7  # tasks per measurement; rounds, alternating variants
COST_BATCH = 32  # the service's BATCH_SIZE, and publish_many's batch here


def _cpu_of(client: Any, action: Any) -> float:
    """Redis CPU seconds that `action` costs (the server does nothing else)."""
    before = _redis_cpu(client)
    action()
    return _redis_cpu(client) - before


def _settle_all(stream: Any, ack_only: Any) -> None:
    """Fetch and settle every task in batches: with settle.lua (events on) or with a
    script that only acks and deletes, as settling did before events."""
    from returner.store import timestamp
    from returner.task import Decision, Kind, Outcome

    while entries := stream.fetch(COST_BATCH):
        if ack_only is None:
            stamp = timestamp()
            stream.settle([Decision(Outcome(e, Kind.COMPLETED, "bench", e.id), Kind.COMPLETED,
                                    stamp, Path(f"/out/{e.id}.jpg")) for e in entries])
        else:
            ack_only(keys=[stream.keys.stream], args=[stream.group, *[e.id for e in entries]],
                     client=stream.stream.client)


@pytest.mark.timeout(600)
def test_redis_cpu_of_events_and_of_batched_pushes(benchmark: Any, tmp_path: Path) -> None:
    """Two costs on Redis's side, each against its baseline in the same run, on one
    redis-server doing nothing else, in COST_ROUNDS rounds that alternate the variants
    (Redis's CPU per task varies by a third from one measurement to the next on this VM,
    so the figures are medians, and the extra cost the median of per-round differences):

    - events: fetch + settle of COST_TASKS tasks with settle.lua (one XADD to {L}:events
      per task, MAXLEN ~) against a script that only XACKs and XDELs, as before events;
    - pushes: COST_TASKS tasks pushed by one RPUSH each (the upstream renderer) against
      Producer.publish_many's one RPUSH per batch of COST_BATCH.
    """
    from redis.commands.core import Script

    from returner.producer import task_message
    from returner.stream import Consumer

    ack_only = Script(None, b"redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2)) "  # type: ignore[arg-type]
                            b"redis.call('XDEL', KEYS[1], unpack(ARGV, 2)) return 1")
    messages = [task_message(f"img_shm_{i:032x}", (1448, 1024, 3), "bench", f"img_{i:05d}")
                for i in range(COST_TASKS)]
    rounds: list[dict[str, float]] = []
    with private_redis(tmp_path / "redis") as server:
        client = server.client

        def one_round(flip: bool) -> dict[str, float]:
            got: dict[str, float] = {}
            for name, script in (("ack_only", ack_only), ("settle", None))[:: -1 if flip else 1]:
                queue = f"bench:cost:{name}:{uuid.uuid4().hex[:8]}"
                stream = Consumer(client, queue, "returner", "bench")
                stream.stream.ensure_group()
                got[f"push_one[{name}]"] = _cpu_of(
                    client, lambda q=queue: [client.rpush(q, m) for m in messages])
                got[name] = _cpu_of(client, lambda s=stream, a=script: _settle_all(s, a))
                assert (client.xlen(stream.keys.events) > 0) == (script is None)
            queue = f"bench:cost:batched:{uuid.uuid4().hex[:8]}"
            got["push_batched"] = _cpu_of(client, lambda: [
                client.rpush(queue, *messages[i : i + COST_BATCH])
                for i in range(0, COST_TASKS, COST_BATCH)])
            client.flushall()
            return {k: v / COST_TASKS * 1e6 for k, v in got.items()}

        def measure() -> None:
            rounds.extend(one_round(flip=bool(k % 2)) for k in range(COST_ROUNDS))

        benchmark.pedantic(measure, rounds=1, iterations=1)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    extra = statistics.median(r["settle"] - r["ack_only"] for r in rounds)
    push_one = statistics.median((r["push_one[ack_only]"] + r["push_one[settle]"]) / 2
                                 for r in rounds)
    report("redis_cpu.serve_without_events", median("ack_only"), "us/task",
           note="fetch.lua + a script that only XACKs and XDELs, batches of 32 (median)")
    report("redis_cpu.serve_with_events", median("settle"), "us/task",
           note="fetch.lua + settle.lua (XACK, XADD event MAXLEN ~, XDEL), batches of 32")
    report("redis_cpu.events_extra", extra, "us/task",
           note="Redis CPU the events add per task, median of per-round differences "
                "(target: at most 10)",
           each=[round(r["settle"] - r["ack_only"], 2) for r in rounds])
    report("redis_cpu.push_one_rpush", push_one, "us/task", note="one RPUSH a task")
    report("redis_cpu.push_publish_many", median("push_batched"), "us/task",
           note=f"one RPUSH per {COST_BATCH} tasks, as Producer.publish_many sends them")
    per_task = median("settle") + median("push_batched")
    report("redis_cpu.tasks_per_core_s", 1e6 / per_task, "tasks/s",
           note="one Redis core, serving with events and fed by publish_many")
    report("redis_cpu.tasks_per_core_s_rpush_each", 1e6 / (median("settle") + push_one),
           "tasks/s", note="one Redis core, serving with events and fed one RPUSH a task")
