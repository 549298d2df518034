"""A small fault-injecting HTTP proxy in front of a real S3 server.

A test points the client at `proxy.endpoint` and switches `proxy.mode` while it runs:

- `pass`: forward each request to the server and its answer back (Host unchanged, so
  SigV4 signatures still verify);
- `slowdown`: answer 503 SlowDown with S3's XML error body, as a throttling store does;
- `error500`: answer 500 InternalError;
- `stall`: hold each request without answering, until the mode changes or the proxy
  closes, then close the connection;
- `drop`: close the connection (with a reset) without answering.

Every request's method, path and headers are recorded in `proxy.seen`, so a test can
check what the client sent (Content-MD5, no x-amz-checksum-*).
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

Mode = Literal["pass", "slowdown", "error500", "stall", "drop"]

_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "error500": (500, "Internal Server Error", "InternalError",
                 "We encountered an internal error. Please try again."),
}  # fmt: skip
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade", "expect", "content-length"}
)  # fmt: skip


@dataclass(frozen=True)
class Seen:
    """One request as the proxy received it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    mode: Mode


class FaultProxy:
    """The proxy, on a free loopback port, forwarding to 127.0.0.1:`upstream_port`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.seen: list[Seen] = []
        self._mode: Mode = "pass"
        self._changed = threading.Condition()
        self._closed = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        with self._changed:
            self._mode = mode
            self._changed.notify_all()

    def requests(self, method: str | None = None) -> list[Seen]:
        """What was seen so far, of one method if given."""
        return [s for s in list(self.seen) if method is None or s.method == method]

    def hold(self) -> None:
        """Block a stalled request until the mode is no longer `stall` or the proxy closes."""
        with self._changed:
            self._changed.wait_for(lambda: self._mode != "stall" or self._closed)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and `100 Continue` for an Expect header
    upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: pytest shows the tests' own output

    def do_GET(self) -> None:
        self.handle_request()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

    def handle_request(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        mode = proxy.mode
        headers = {k.lower(): v for k, v in self.headers.items()}
        proxy.seen.append(Seen(self.command, self.path, headers, mode))
        if mode == "stall":
            proxy.hold()
            self.close_connection = True
        elif mode == "drop":
            self.reset()
        elif mode in _ERRORS:
            self.error(*_ERRORS[mode])
        else:
            self.forward(body)

    def reset(self) -> None:
        """Close with a TCP reset, as a crashing server or a load balancer does."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def error(self, status: int, reason: str, code: str, message: str) -> None:
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{self.path.split('?')[0]}</Resource>"
            "<RequestId>fault-proxy</RequestId></Error>"
        ).encode()
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    def forward(self, body: bytes) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        if self.upstream is None:
            self.upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
        conn = self.upstream
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in _HOP_BY_HOP:
                conn.putheader(name, value)
        if body or "Content-Length" in self.headers:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        answer = conn.getresponse()
        data = answer.read()
        self.send_response_only(answer.status, answer.reason)
        for name, value in answer.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        length = answer.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
