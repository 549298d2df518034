"""The console's server limits against real sockets: a client that sends its request
slowly, or not at all, is cut off after the deadline however it trickles, while other
clients are served at once; beyond the connection limit the answer is 503 at once."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from returner.console import server as console_server
from tests.conftest import wait_for

DEADLINE_S = 0.6


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            pass
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"5")]})
    await send({"type": "http.response.body", "body": b"hello"})


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, int]]:
    """The console's protocol and limits around a small app, on a free port."""
    monkeypatch.setattr(console_server, "REQUEST_TIMEOUT_S", DEADLINE_S)
    config = uvicorn.Config(hello, http=console_server.TimedH11Protocol, lifespan="off",
                            log_config=None, access_log=False, limit_concurrency=30,
                            timeout_keep_alive=5)
    server = uvicorn.Server(config)
    sock = console_server.listen("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="the server to start")
    yield sock.getsockname()[:2]
    server.should_exit = True
    thread.join(10)
    sock.close()


def connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=10)


def get(address: tuple[str, int]) -> bytes:
    with connect(address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return b"".join(iter(lambda: sock.recv(4096), b""))


def closed_after(sock: socket.socket, trickle: bytes = b"") -> float:
    """Seconds until the server hangs up, sending `trickle` a byte at a time meanwhile."""
    started = time.monotonic()
    sock.settimeout(0.15)
    for byte in [trickle[i : i + 1] for i in range(len(trickle))] or [b""] * 1000:
        try:
            if byte:
                sock.sendall(byte)
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started
    raise AssertionError("the server never hung up")


def test_a_request_that_never_arrives_whole_is_cut_off(served: tuple[str, int]) -> None:
    silent, started = connect(served), connect(served)
    started.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and then nothing
    with silent, started:
        assert DEADLINE_S * 0.8 < closed_after(silent) < DEADLINE_S + 2
        assert closed_after(started) < DEADLINE_S + 2


def test_trickling_a_byte_at_a_time_does_not_hold_a_connection(served: tuple[str, int]
                                                                ) -> None:
    with connect(served) as sock:
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        assert closed_after(sock, head) < DEADLINE_S + 2


def test_the_next_request_on_a_kept_connection_has_a_deadline_too(served: tuple[str, int]
                                                                   ) -> None:
    with connect(served) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"hello"):
            answer += sock.recv(4096)
        assert closed_after(sock, b"GET / HTTP/1.1\r\nX-Slow: " + b"b" * 200) < DEADLINE_S + 2


def test_others_are_served_while_slow_clients_hold_connections(served: tuple[str, int]
                                                               ) -> None:
    slow = [connect(served) for _ in range(20)]
    try:
        for sock in slow:
            sock.sendall(b"GET / HTTP/1.1\r\n")
        started = time.monotonic()
        assert get(served).startswith(b"HTTP/1.1 200")
        assert time.monotonic() - started < DEADLINE_S  # not after the slow ones
    finally:
        for sock in slow:
            sock.close()


def test_beyond_the_connection_limit_the_answer_is_503_at_once(served: tuple[str, int]
                                                               ) -> None:
    held = [connect(served) for _ in range(30)]
    try:
        wait_for(lambda: get(served).startswith(b"HTTP/1.1 503"), timeout=5,
                 what="a 503 beyond the limit")
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: get(served).startswith(b"HTTP/1.1 200"), timeout=5, what="a 200 again")
