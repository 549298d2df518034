"""`returner run --workers N`: N worker processes, restarted when they die.

Each worker is `returner run` itself, in a process of its own, given every setting
through its environment and the consumer name `<CONSUMER_NAME>-<i>`, which stays the
same across restarts so a restarted worker first finishes its own pending entries.

Metrics: workers write theirs to a private PROMETHEUS_MULTIPROC_DIR (prometheus-client's
multiprocess mode); the supervisor serves their sum on METRICS_PORT. Health: every
worker rewrites a small JSON file there each second, and the supervisor's /healthz and
/readyz combine them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, multiprocess

from returner.metrics import LIVE_WITHIN_S, Health
from returner.settings import Settings

log = logging.getLogger(__name__)

REPORT_EVERY_S = 1.0
RESTART_MIN_S, RESTART_MAX_S = 0.5, 30.0
STEADY_AFTER_S = 30.0  # a worker that ran this long restarts without delay
_DIR_PREFIX = "returner-metrics-"


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (ours, or one we may not signal)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_dirs() -> None:
    """Directories of supervisors that are gone (one left at once on a second signal)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*-*"):
        pid = path.name.removeprefix(_DIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def worker_name(consumer_name: str, index: int) -> str:
    return f"{consumer_name}-{index}"


def child_environment(settings: Settings, redis_url: str, metrics_dir: Path) -> dict[str, str]:
    """The environment of a worker: this one, with every setting made explicit."""
    env = dict(os.environ)
    for name, info in Settings.model_fields.items():
        value = getattr(settings, name)
        if value is None:
            value = "auto" if name == "redis_cluster" else ""
        env[info.alias or name] = str(value).lower() if isinstance(value, bool) else str(value)
    env.update(REDIS_URL=redis_url, WORKERS="1", METRICS_PORT="0")
    if "encoder_threads" not in settings.model_fields_set:  # share the cores out
        cores = os.cpu_count() or 1
        env["ENCODER_THREADS"] = str(max(1, -(-cores // settings.workers)))
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return env


@dataclass
class Child:
    index: int
    name: str
    health_file: Path
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    delay: float = RESTART_MIN_S
    due: float = 0.0  # when to start it again after it died


class Supervisor:
    """Starts the workers, restarts those that die, and drains them all on stop."""

    def __init__(self, settings: Settings, redis_url: str, stop: threading.Event) -> None:
        self.settings = settings
        self.stop = stop
        _remove_stale_dirs()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-"))
        self.env = child_environment(settings, redis_url, self.dir)
        self.children = [
            Child(i, worker_name(settings.consumer_name, i), self.dir / f"health-{i}.json")
            for i in range(settings.workers)
        ]
        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, path=str(self.dir))  # type: ignore[no-untyped-call]
        self.alive = Gauge("returner_workers", "Worker processes running.", registry=self.registry)
        self.restarts = Counter(
            "returner_worker_restarts",
            "Worker processes started again after they died.",
            registry=self.registry,
        )
        self.health = WorkersHealth(self)

    def run(self) -> None:
        """Supervise until stopped, then stop the workers and wait for them to drain."""
        for child in self.children:
            self._start(child)
        while not self.stop.wait(0.2):
            now = time.monotonic()
            for child in self.children:
                if child.process is None:
                    if now >= child.due:
                        self._start(child)
                elif child.process.poll() is not None:
                    self._reap(child, now)
            self.alive.set(sum(c.process is not None for c in self.children))
        self._drain()

    def close(self) -> None:
        """Remove the metrics and health directory."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def _start(self, child: Child) -> None:
        command = [
            sys.executable, "-m", "returner", "run",
            "--consumer", child.name,
            "--health-file", str(child.health_file),
            "--supervisor", str(os.getpid()),
        ]  # fmt: skip
        # A session of its own: a terminal's Ctrl-C reaches the supervisor only, which
        # then stops every worker once.
        child.process = subprocess.Popen(command, env=self.env, start_new_session=True)
        child.started = time.monotonic()
        log.info("worker %s started (pid %d)", child.name, child.process.pid)

    def _reap(self, child: Child, now: float) -> None:
        assert child.process is not None
        code, pid = child.process.returncode, child.process.pid
        multiprocess.mark_process_dead(pid, str(self.dir))  # type: ignore[no-untyped-call]
        child.health_file.unlink(missing_ok=True)
        child.process = None
        if now - child.started >= STEADY_AFTER_S:
            child.delay = RESTART_MIN_S
        child.due = now + child.delay
        log.error(
            "worker %s (pid %d) died with %s; restarting in %.1fs",
            child.name,
            pid,
            _exit_text(code),
            child.delay,
        )
        child.delay = min(child.delay * 2, RESTART_MAX_S)
        child.restarts += 1
        self.restarts.inc()

    def _drain(self) -> None:
        running = [c.process for c in self.children if c.process is not None]
        log.info("stopping %d workers; each finishes what it holds", len(running))
        for process in running:
            _signal(process, signal.SIGTERM)
        for process in running:
            process.wait()
        self.alive.set(0)

    def hurry(self) -> None:
        """A second signal: tell every worker again, which makes it leave at once (its
        entries stay pending in Redis). Called from a signal handler: no logging."""
        for child in self.children:
            if child.process is not None:
                _signal(child.process, signal.SIGTERM)


def _signal(process: subprocess.Popen[bytes], signum: int) -> None:
    if process.poll() is None:
        process.send_signal(signum)


def _exit_text(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


class WorkersHealth:
    """The supervisor's /healthz and /readyz: live while every running worker is live,
    ready while all of them run and are ready."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def _reports(self) -> list[tuple[Child, dict[str, list[object]] | None]]:
        out = []
        for child in self.supervisor.children:
            try:
                report = json.loads(child.health_file.read_text())
                fresh = time.time() - float(report["at"]) <= LIVE_WITHIN_S
            except (OSError, ValueError, KeyError, TypeError):
                report, fresh = None, False
            out.append((child, report if fresh else None))
        return out

    def live(self) -> tuple[bool, str]:
        for child, report in self._reports():
            if child.process is None:
                continue  # restarting: its restart is the remedy, not ours
            if report is None:
                if time.monotonic() - child.started > LIVE_WITHIN_S:
                    return False, f"worker {child.name} has not reported for {LIVE_WITHIN_S:.0f}s"
                continue
            ok, why = report["live"]
            if not ok:
                return False, f"worker {child.name}: {why}"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        for child, report in self._reports():
            if child.process is None:
                return False, f"worker {child.name} is restarting"
            if report is None:
                return False, f"worker {child.name} has not reported yet"
            ok, why = report["ready"]
            if not ok:
                return False, f"worker {child.name}: {why}"
        return True, "ok"


def report_health(
    health: Health, path: Path, supervisor: int, stop: threading.Event
) -> threading.Thread:
    """In a worker: rewrite `path` every second with this worker's liveness and
    readiness, and stop the worker once `supervisor` (a pid) is no longer its parent."""

    def loop() -> None:
        temp = path.with_name(f".{path.name}.tmp")
        while True:
            if os.getppid() != supervisor:
                log.error("supervisor is gone; stopping")
                stop.set()
                return
            doc = {"at": time.time(), "live": health.live(), "ready": health.ready()}
            try:
                temp.write_text(json.dumps(doc))
                temp.replace(path)
            except OSError as exc:
                log.warning("cannot write health report %s: %s", path, exc)
            if stop.wait(REPORT_EVERY_S):
                return

    thread = threading.Thread(target=loop, name="health-report", daemon=True)
    thread.start()
    return thread
