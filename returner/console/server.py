"""Serving the console: the access rule for CONSOLE_HOST, the listening socket, and
uvicorn with limits, so that a slow or flooding client cannot stall the console, and
the console cannot slow the service.

- At most LIMIT_CONCURRENCY connections and requests at once; beyond that uvicorn
  answers 503 at once. An idle keep-alive connection is closed after KEEP_ALIVE_S.
- A request must arrive whole within REQUEST_TIMEOUT_S of its first byte (or of the
  connection): uvicorn itself times out only idle connections, and a client sending a
  byte now and then would hold its connection, and a slot, for ever.
- The process lowers its own CPU priority (nice NICENESS): beside the service on one
  host, the service's work always comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from returner.console.app import create_app
from returner.errors import SettingsError
from returner.settings import Settings

log = logging.getLogger("returner.console")

LIMIT_CONCURRENCY = 64
KEEP_ALIVE_S = 5
REQUEST_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 16 * 1024
BACKLOG = 128
NICENESS = 10


def loopback(host: str) -> bool:
    """Whether `host` is a loopback address (or `localhost`)."""
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return False


def check_access(settings: Settings) -> None:
    """Raises SettingsError when the console would serve beyond loopback without a token."""
    if settings.console_token is None and not loopback(settings.console_host):
        raise SettingsError(
            f"CONSOLE_HOST: {settings.console_host} is not a loopback address, and without "
            "CONSOLE_TOKEN the console serves on loopback only (set CONSOLE_TOKEN)"
        )


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port. Raises SettingsError naming CONSOLE_PORT (or
    CONSOLE_HOST when the address does not resolve)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise SettingsError(f"CONSOLE_HOST: cannot resolve {host} ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise SettingsError(
            f"CONSOLE_PORT: cannot listen on {host}:{port} ({exc.strerror})"
        ) from None
    sock.set_inheritable(True)
    return sock


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for each request to arrive whole."""

    _deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(REQUEST_TIMEOUT_S, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        # IDLE: no request yet; SEND_BODY: its body still coming. Anything else: it
        # arrived, or the connection is ending.
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # the next request on this connection has its own deadline
        super().on_response_complete()


def config(settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        http=TimedH11Protocol,
        lifespan="on",
        log_config=None,  # the service's own logging, set up by the CLI
        access_log=False,
        server_header=False,
        limit_concurrency=LIMIT_CONCURRENCY,
        timeout_keep_alive=KEEP_ALIVE_S,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_graceful_shutdown=5,
    )


def _exit(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def serve(settings: Settings) -> None:
    """Serve the console until SIGTERM or SIGINT.

    Raises SettingsError: a CONSOLE_HOST beyond loopback without CONSOLE_TOKEN, a port
    it cannot listen on, REDIS_URL not set.
    """
    check_access(settings)
    server = uvicorn.Server(config(settings))
    sock = listen(settings.console_host, settings.console_port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    access = "token required" if settings.console_token else "loopback only, no token"
    log.info("console on http://%s:%d/ (%s)", shown, port, access)
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    # uvicorn stops on SIGTERM or SIGINT, then raises the signal again under the
    # handlers it found: these, so that a clean stop exits 0, as `returner run` does
    # (and a signal before uvicorn listens for them exits at once).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
