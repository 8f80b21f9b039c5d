"""An HTTP proxy in front of the apiserver that loses, fails or trickles chosen replies.

The TCP proxy (tcp_proxy.py) cuts links; it cannot see requests inside TLS. This one speaks plain
HTTP to the client (an elector started with `--server http://127.0.0.1:PORT --token-file F`) and
TLS to the apiserver, so a test can script faults per request, by its number (1 = the first):

    proxy = HttpFaultProxy(apiserver_url, ca_file).start()
    proxy.script = {2: "lose-reply", 4: "http-500"}   # the rest pass
    proxy.mode = "trickle"                             # from now on, every unscripted request

Faults:
- "lose-reply": the request reaches the apiserver (a write lands), the reply never comes back:
  the connection stays open and silent until the client gives up;
- "http-500": answered 500 at once, never forwarded (a non-409 failure);
- "trickle": forwarded, and the reply sent back one byte every `trickle_interval` seconds.
Every request is recorded in `requests` (time.time(), method, path, upstream status, fault).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import itertools
import select
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

FAULTS = ("pass", "lose-reply", "http-500", "trickle")


@dataclass(frozen=True)
class ProxiedRequest:
    at: float
    method: str
    path: str
    status: int | None
    fault: str


class HttpFaultProxy:
    def __init__(
        self,
        upstream: str,
        ca_file: str,
        client_cert: str | None = None,
        client_key: str | None = None,
        trickle_interval: float = 0.2,
    ) -> None:
        """`client_cert`/`client_key`: the proxy authenticates upstream itself (else it forwards the
        client's Authorization header)."""
        parts = urllib.parse.urlsplit(upstream)
        assert parts.hostname is not None and parts.port is not None
        self.upstream = (parts.hostname, parts.port)
        self.context = ssl.create_default_context(cafile=ca_file)
        if client_cert:
            self.context.load_cert_chain(client_cert, client_key)
        self.trickle_interval = trickle_interval
        self.script: dict[int, str] = {}
        self.mode = "pass"
        self.requests: list[ProxiedRequest] = []
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the elector expects

            def do_GET(self) -> None:
                proxy._handle(self)

            do_PUT = do_POST = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="http-fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HttpFaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def methods(self) -> list[tuple[str, str]]:
        """(method, fault) of every request so far, in order."""
        with self._lock:
            return [(r.method, r.fault) for r in self.requests]

    # -- one request (a handler thread)

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        with self._lock:
            number = next(self._numbers)
            fault = self.script.get(number, self.mode)
        assert fault in FAULTS, fault
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        if fault == "http-500":
            self._record(handler, None, fault)
            self._reply(handler, 500, b'{"kind":"Status","code":500,"message":"injected by the test proxy"}')
            return
        upstream = http.client.HTTPSConnection(*self.upstream, context=self.context, timeout=10)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() in ("authorization", "content-type")}
            upstream.request(
                handler.command, handler.path, body=body, headers={**headers, "Accept": "application/json"}
            )
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self._record(handler, response.status, fault)
        if fault == "lose-reply":
            handler.close_connection = True
            self._hold_silent(handler)
        elif fault == "trickle":
            handler.close_connection = True
            raw = self._encode(response.status, data)
            for byte in raw:
                if self._stopping.wait(self.trickle_interval):
                    return
                try:
                    handler.wfile.write(bytes([byte]))
                    handler.wfile.flush()
                except OSError:
                    return  # the client gave up: what a deadline is for
        else:
            self._reply(handler, response.status, data)

    def _record(self, handler: http.server.BaseHTTPRequestHandler, status: int | None, fault: str) -> None:
        with self._lock:
            self.requests.append(ProxiedRequest(time.time(), handler.command, handler.path, status, fault))

    def _hold_silent(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        """Say nothing until the client hangs up (or the proxy stops)."""
        sock = handler.connection
        while not self._stopping.is_set():
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                with contextlib.suppress(OSError):
                    if not sock.recv(65536):
                        return

    @staticmethod
    def _encode(status: int, data: bytes) -> bytes:
        head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        return head.encode() + data

    @staticmethod
    def _reply(handler: http.server.BaseHTTPRequestHandler, status: int, data: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
