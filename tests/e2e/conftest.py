"""The real CLI as a subprocess, with a controlled environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


class Service:
    """One `returner` process; its stderr goes to a log file the test can show."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.env, self.cwd, self.log = env, cwd, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> Service:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "returner", "run", *args],
                                         env=self.env, cwd=self.cwd, stdout=log, stderr=log)
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the worker has joined its group (signal handlers are in place)."""
        from tests.conftest import wait_for

        wait_for(lambda: "encoder threads" in self.logs(None) or not self.alive(), timeout=timeout,
                 what="the service to start")
        assert self.alive(), self.logs()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then the exit code; fails if it takes longer than `timeout`."""
        self.wait_ready()
        self.signal(signal.SIGTERM)
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"no exit {timeout}s after SIGTERM:\n{self.logs()}") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self, tail: int | None = 5000) -> str:
        text = self.log.read_text(errors="replace")
        return text[-tail:] if tail else text


# Put on PYTHONPATH (with RETURNER_TEST_CRASH_ON=<image ids>), the poison-frame seam of
# tests/seams/sitecustomize.py is loaded by the service and its worker processes.
POISON_SEAM = {"PYTHONPATH": str(Path(__file__).parents[1] / "seams")}


def base_env(**settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update({k: str(v) for k, v in settings.items()})
    return env


def run_cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "returner", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def service_env(redis_url: str, queue: str, output_dir: Path) -> dict[str, str]:
    return base_env(REDIS_URL=redis_url, HOSTING_TASKS_QUEUE=queue, OUTPUT_DIR=output_dir,
                    CONSUMER_NAME="e2e", METRICS_PORT=0, ENCODER_THREADS=2)


@pytest.fixture
def service(service_env: dict[str, str], tmp_path: Path
            ) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def make(env: dict[str, str] | None = None) -> Service:
        svc = Service(env or service_env, tmp_path, tmp_path / f"service-{len(started)}.log")
        started.append(svc)
        return svc

    yield make
    for svc in started:
        if svc.alive():
            svc.proc.kill()  # type: ignore[union-attr]
            svc.proc.wait()  # type: ignore[union-attr]
