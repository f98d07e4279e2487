"""A small fault-injecting HTTP/1.1 forwarding proxy for S3 tests.

It listens on 127.0.0.1 (an ephemeral port) in front of one loopback HTTP server (moto)
and forwards every request to it, except those a test asked to fail:

- ``"slowdown"``: answer ``503 SlowDown`` with S3's XML error body (throttling);
- ``"error500"``: answer ``500 InternalError``;
- ``"reset"``: close the client's socket with a TCP RST and no response;
- ``"slow"``: wait ``delay_s`` before forwarding (the request is dropped, never forwarded,
  if the client hangs up while waiting, e.g. because its timeout fired);
- ``"truncate"``: forward, then reset the connection after sending the status, the headers
  and half of the body (a response cut off mid-body), or, when the response has no body
  (a PUT), before sending anything (the request took effect but its answer was lost).

Faults are chosen by request number (:meth:`FaultProxy.fail_at`) or for the next N requests
that match a method and/or path fragment (:meth:`FaultProxy.fail_next`). Every request is
recorded (:attr:`FaultProxy.requests`) with its method, path, Range header and the status the
client got, so tests can assert that retries happened.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit

__all__ = ["FaultKind", "FaultProxy", "Seen"]

FaultKind = Literal["slowdown", "error500", "reset", "slow", "truncate"]
_KINDS = ("slowdown", "error500", "reset", "slow", "truncate")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
    }
)
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "error500": (500, "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass(frozen=True)
class Seen:
    """One request the proxy received."""

    number: int
    """1-based, counted since the proxy started or :meth:`FaultProxy.reset_log`."""
    method: str
    path: str
    """Path and query string, as sent by the client."""
    range: str | None
    """The request's ``Range`` header, if any."""
    status: int | None
    """Status the client got; None when it got no (whole) response: reset, truncated, or the
    client gave up while the proxy stalled."""
    fault: FaultKind | None
    """The fault injected into this request, if any."""
    access_key: str | None = None
    """The access key id the request was signed with (from its SigV4 Authorization header)."""


@dataclass
class _Rule:
    kind: FaultKind
    remaining: int
    method: str | None
    path_contains: str | None
    numbers: frozenset[int] | None
    delay_s: float

    def matches(self, number: int, method: str, path: str) -> bool:
        if self.remaining <= 0:
            return False
        if self.numbers is not None and number not in self.numbers:
            return False
        if self.method is not None and method != self.method:
            return False
        return self.path_contains is None or self.path_contains in path


class FaultProxy:
    """Forwarding proxy on 127.0.0.1 in front of ``upstream_url`` that injects faults."""

    def __init__(
        self,
        upstream_url: str,
        *,
        max_body_bytes: int = 256 * 2**20,
        idle_timeout_s: float = 30.0,
    ) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or parts.hostname not in _LOOPBACK or parts.port is None:
            raise ValueError(
                f"upstream {upstream_url!r}: the fault proxy only forwards to http://127.0.0.1:PORT"
            )
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._log: list[Seen] = []
        self._count = 0
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Bind an ephemeral port on 127.0.0.1 and serve in a background thread."""
        if self._server is not None:
            raise RuntimeError("the fault proxy is already started")
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="faultproxy",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop every open connection and join all threads."""
        server = self._server
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()  # joins the handler threads (block_on_close)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start() if self._server is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        if self._server is None:
            raise RuntimeError("the fault proxy is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: use it as the S3 endpoint."""
        return f"http://127.0.0.1:{self.port}"

    # -- faults -----------------------------------------------------------------------------

    def fail_next(
        self,
        kind: FaultKind,
        count: int = 1,
        *,
        method: str | None = None,
        path_contains: str | None = None,
        delay_s: float = 2.0,
    ) -> None:
        """Inject ``kind`` into the next ``count`` requests matching ``method`` / path."""
        self._add(_Rule(kind, count, method, path_contains, None, delay_s))

    def fail_at(self, numbers: Iterable[int], kind: FaultKind, *, delay_s: float = 2.0) -> None:
        """Inject ``kind`` into the requests with these numbers (see :attr:`Seen.number`)."""
        nums = frozenset(numbers)
        self._add(_Rule(kind, len(nums), None, None, nums, delay_s))

    def clear_faults(self) -> None:
        """Forget every pending fault."""
        with self._lock:
            self._rules.clear()

    def reset_log(self) -> None:
        """Forget the recorded requests and restart numbering at 1."""
        with self._lock:
            self._log.clear()
            self._count = 0

    def _add(self, rule: _Rule) -> None:
        if rule.kind not in _KINDS:
            raise ValueError(f"unknown fault {rule.kind!r}; choose one of {_KINDS}")
        if rule.remaining < 1:
            raise ValueError("a fault must apply to at least one request")
        with self._lock:
            self._rules.append(rule)

    # -- what was seen ----------------------------------------------------------------------

    @property
    def requests(self) -> list[Seen]:
        """A copy of the requests seen so far (only those that have been answered or dropped)."""
        with self._lock:
            return list(self._log)

    def seen(self, method: str | None = None, *, path_contains: str | None = None) -> list[Seen]:
        """The recorded requests with this method and path fragment."""
        return [
            s
            for s in self.requests
            if (method is None or s.method == method)
            and (path_contains is None or path_contains in s.path)
        ]

    @property
    def pending_faults(self) -> int:
        """How many injections are still to come."""
        with self._lock:
            return sum(r.remaining for r in self._rules)

    # -- used by the handler ----------------------------------------------------------------

    def _admit(self, method: str, path: str) -> tuple[int, _Rule | None]:
        with self._lock:
            self._count += 1
            number = self._count
            for rule in self._rules:
                if rule.matches(number, method, path):
                    rule.remaining -= 1
                    return number, rule
            return number, None

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self._log.append(seen)

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(
        self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler], proxy: FaultProxy
    ) -> None:
        self.proxy = proxy
        super().__init__(addr, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    _upstream: http.client.HTTPConnection | None = None

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.proxy.idle_timeout_s)
        self.server.proxy._track(self.connection, True)

    def finish(self) -> None:
        self.server.proxy._track(self.connection, False)
        if self._upstream is not None:
            self._upstream.close()
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: tests read :attr:`FaultProxy.requests` instead."""

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self._read_body()
        if body is None:
            return
        number, rule = proxy._admit(self.command, self.path)
        kind = rule.kind if rule is not None else None

        auth = _CREDENTIAL.search(self.headers.get("Authorization", ""))
        access_key = auth.group(1) if auth else None

        def record(status: int | None) -> None:
            proxy._record(
                Seen(
                    number,
                    self.command,
                    self.path,
                    self.headers.get("Range"),
                    status,
                    kind,
                    access_key,
                )
            )

        if kind == "reset":
            record(None)
            self._reset()
            return
        if kind in _ERRORS:
            status, code, message = _ERRORS[kind]
            record(status)
            self._send_s3_error(status, code, message)
            return
        if rule is not None and kind == "slow" and not self._wait(rule.delay_s):
            record(None)  # the client hung up while we stalled: drop the request
            self.close_connection = True
            return
        self._forward(body, record, truncate=kind == "truncate")

    def _read_body(self) -> bytes | None:
        limit = self.server.proxy.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            size = 0
            while True:
                line = self.rfile.readline(1024)
                n = int(line.split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                size += n
                if size > limit:
                    self._too_large()
                    return None
                parts.append(self.rfile.read(n))
                self.rfile.readline(8)
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            self._too_large()
            return None
        return self.rfile.read(length) if length else b""

    def _too_large(self) -> None:
        self._send_s3_error(413, "EntityTooLarge", "The fault proxy's body limit was exceeded.")
        self.close_connection = True

    def _send_s3_error(self, status: int, code: str, message: str) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            "<RequestId>faultproxy</RequestId></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """Close the socket with an RST (SO_LINGER 0) and no response."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _wait(self, delay_s: float) -> bool:
        """Stall for ``delay_s``; False as soon as the client hangs up (or the proxy stops)."""
        deadline = time.monotonic() + delay_s
        stopping = self.server.proxy._stopping
        while not stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
            if readable:
                try:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        return False
                except OSError:
                    return False
                time.sleep(min(left, 0.05))  # data pipelined behind this request: keep waiting
        return False

    def _forward(
        self, body: bytes, record: Callable[[int | None], None], *, truncate: bool = False
    ) -> None:
        """Send the request to moto and relay its answer (recorded before the client sees it)."""
        proxy = self.server.proxy
        try:
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(
                    proxy.upstream_host, proxy.upstream_port, timeout=60
                )
            conn = self._upstream
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            headers = resp.getheaders()
            status, reason = resp.status, resp.reason
            if resp.will_close:
                conn.close()
        except (OSError, http.client.HTTPException):
            if self._upstream is not None:
                self._upstream.close()
                self._upstream = None
            record(502)
            self._send_s3_error(502, "BadGateway", "The fault proxy could not reach moto.")
            self.close_connection = True
            return
        if truncate:
            record(None)
            if self.command == "HEAD" or len(data) < 2:
                self._reset()
                return
        else:
            record(status)
        try:
            self.send_response_only(status, reason)
            for name, value in headers:
                low = name.lower()
                if low in _HOP_BY_HOP and not (low == "content-length" and self.command == "HEAD"):
                    continue
                self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if truncate:
                self.wfile.write(data[: len(data) // 2])
                self._reset()
                return
            if self.command != "HEAD":
                self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
