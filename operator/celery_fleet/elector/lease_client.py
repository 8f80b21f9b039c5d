"""The Lease endpoints over HTTP/1.1, each request inside a wall-clock budget. (network I/O)

http.client applies its timeout to every single read, so an apiserver (or a proxy) that trickles
a byte at a time keeps a request open indefinitely: one was seen open for 48 s while the leader
believed it was inside its 10 s renew deadline. Here every socket operation gets what is left of
the request's budget, so a request ends by its deadline whatever the peer does (the fence in
`process` covers what no socket timeout can, such as a DNS lookup).
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from celery_fleet.elector.election import Lease, LeaseApiError, LeaseConflict, LeaseRecord, UsageError

USER_AGENT = "celery-fleet-elector/0.1"
LEASES_API = "/apis/coordination.k8s.io/v1"
# A Lease is a few hundred bytes; anything this large is not a reply we asked for.
MAX_REPLY_BYTES = 1 << 20


class DeadlineExceeded(OSError):
    """The request's wall-clock budget ran out."""


@dataclass
class ApiEndpoint:
    """Where the apiserver is and how to prove who we are (files, so keys never sit in argv)."""

    server: str
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    token_file: str | None = None  # re-read on every request: service account tokens rotate
    # In-process callers (`celery-fleet elect`) hand over their client library's token, refreshed
    # by it (exec plugins, OIDC); it returns the bare token or None.
    token_source: Callable[[], str | None] | None = None
    insecure: bool = False
    tls_server_name: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        if self.insecure:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = ssl.create_default_context(cafile=self.ca_file)
        if self.client_cert_file is not None:
            context.load_cert_chain(self.client_cert_file, self.client_key_file)
        return context

    def bearer_token(self) -> str | None:
        if self.token_source is not None:
            try:
                return self.token_source()
            except Exception as exc:  # a client library's refresh may raise anything: one failed request
                raise LeaseApiError(f"cannot get a token: {type(exc).__name__}: {exc}") from exc
        if self.token_file:
            try:
                with open(self.token_file, encoding="utf-8") as handle:
                    return handle.read().strip()
            except OSError as exc:
                raise LeaseApiError(f"cannot read token file {self.token_file}: {exc}") from exc
        return None


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("request deadline exceeded")
    return left


class _Connection:
    """One kept-alive HTTP/1.1 connection; every call takes the request's deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""

    @classmethod
    def open(
        cls, host: str, port: int, context: ssl.SSLContext | None, server_name: str, deadline: float
    ) -> _Connection:
        sock = socket.create_connection((host, port), timeout=_remaining(deadline))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=server_name, do_handshake_on_connect=False)
                sock.settimeout(_remaining(deadline))  # a deadline for the whole handshake, not per read
                sock.do_handshake()
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def exchange(self, request: bytes, deadline: float) -> tuple[int, bytes, bool]:
        """Send one request; (status, body, keep_alive) of its reply."""
        self.sock.settimeout(_remaining(deadline))
        self.sock.sendall(request)  # sendall's timeout is a total, not per chunk
        head = self._read_until(b"\r\n\r\n", deadline)
        lines = head.decode("iso-8859-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise OSError(f"not an HTTP reply: {lines[0][:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        keep_alive = parts[0] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._read_chunked(deadline)
        elif "content-length" in headers:
            body = self._read_exactly(int(headers["content-length"]), deadline)
        else:
            body, keep_alive = self._read_to_end(deadline), False
        return status, body, keep_alive

    def _fill(self, deadline: float) -> None:
        self.sock.settimeout(_remaining(deadline))
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed mid-reply")
        self._buffer += data
        if len(self._buffer) > MAX_REPLY_BYTES:
            raise OSError(f"reply larger than {MAX_REPLY_BYTES} bytes")

    def _read_until(self, marker: bytes, deadline: float) -> bytes:
        while marker not in self._buffer:
            self._fill(deadline)
        found, _, self._buffer = self._buffer.partition(marker)
        return found

    def _read_exactly(self, size: int, deadline: float) -> bytes:
        if size > MAX_REPLY_BYTES:
            raise OSError(f"reply larger than {MAX_REPLY_BYTES} bytes")
        while len(self._buffer) < size:
            self._fill(deadline)
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _read_chunked(self, deadline: float) -> bytes:
        body = b""
        while True:
            size = int(self._read_until(b"\r\n", deadline).split(b";")[0], 16)
            if size == 0:
                self._read_until(b"\r\n", deadline)  # no trailers from the apiserver
                return body
            body += self._read_exactly(size, deadline)
            self._read_exactly(2, deadline)
            if len(body) > MAX_REPLY_BYTES:
                raise OSError(f"reply larger than {MAX_REPLY_BYTES} bytes")

    def _read_to_end(self, deadline: float) -> bytes:
        with contextlib.suppress(ConnectionError):
            while True:
                self._fill(deadline)
        data, self._buffer = self._buffer, b""
        return data


class HttpLeaseApi:
    """The Lease endpoints over one kept-alive connection, rebuilt after any failure."""

    def __init__(self, endpoint: ApiEndpoint, namespace: str, name: str) -> None:
        parts = urllib.parse.urlsplit(endpoint.server)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise UsageError(f"--server {endpoint.server!r}: expected https://HOST[:PORT]")
        self.endpoint = endpoint
        self.namespace = namespace
        self.name = name
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._host_header = parts.netloc.rpartition("@")[2]
        self._context = endpoint.ssl_context() if parts.scheme == "https" else None
        quote = urllib.parse.quote
        self._collection = f"{parts.path.rstrip('/')}{LEASES_API}/namespaces/{quote(namespace, safe='')}/leases"
        self._item = f"{self._collection}/{quote(name, safe='')}"
        self._conn: _Connection | None = None

    def get(self, timeout: float) -> Lease | None:
        status, body = self._request("GET", self._item, None, timeout)
        if status == 404:
            return None
        self._expect(status, body, "GET", (200,))
        return Lease.from_body(body)

    def create(self, record: LeaseRecord, timeout: float) -> Lease:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": record.to_spec(),
        }
        status, reply = self._request("POST", self._collection, body, timeout)
        if status == 409:
            raise LeaseConflict("lease was created by someone else", 409)
        self._expect(status, reply, "POST", (200, 201))
        return Lease.from_body(reply)

    def replace(self, lease: Lease, record: LeaseRecord, timeout: float) -> Lease:
        body = copy.deepcopy(dict(lease.body))
        metadata = body.setdefault("metadata", {})
        metadata["resourceVersion"] = lease.resource_version
        metadata.pop("managedFields", None)  # omitted = kept as they are
        spec = dict(body.get("spec") or {})
        spec.update(record.to_spec())  # keep fields we do not own (preferredHolder, strategy)
        body["spec"] = spec
        status, reply = self._request("PUT", self._item, body, timeout)
        if status in (404, 409):
            raise LeaseConflict("lease changed since it was read" if status == 409 else "lease was deleted", status)
        self._expect(status, reply, "PUT", (200,))
        return Lease.from_body(reply)

    def replace_annotation(self, lease: Lease, key: str, value: str, timeout: float) -> Lease:
        """Set one annotation, compare-and-swap on lease.resource_version; the spec is sent as read.

        Raises LeaseConflict when the lease changed (409) or was deleted (404) since it was read."""
        body = copy.deepcopy(dict(lease.body))
        metadata = body.setdefault("metadata", {})
        metadata["resourceVersion"] = lease.resource_version
        metadata.pop("managedFields", None)
        annotations = dict(metadata.get("annotations") or {})
        annotations[key] = value
        metadata["annotations"] = annotations
        status, reply = self._request("PUT", self._item, body, timeout)
        if status in (404, 409):
            raise LeaseConflict("lease changed since it was read" if status == 409 else "lease was deleted", status)
        self._expect(status, reply, "PUT", (200,))
        return Lease.from_body(reply)

    def _expect(self, status: int, body: Mapping[str, Any], method: str, ok: tuple[int, ...]) -> None:
        if status in ok:
            return
        message = body.get("message") or body.get("reason") or "unexpected reply"
        hint = ""
        if status in (401, 403):
            hint = " (check the credentials and that RBAC allows get/update/create on this lease)"
        raise LeaseApiError(f"{method} lease {self.namespace}/{self.name}: HTTP {status}: {message}{hint}", status)

    def _request(
        self, method: str, path: str, body: Mapping[str, Any] | None, timeout: float
    ) -> tuple[int, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        payload = b"" if body is None else json.dumps(body).encode()
        headers = {"Host": self._host_header, "Accept": "application/json", "User-Agent": USER_AGENT}
        try:
            token = self.endpoint.bearer_token()
            if token:
                headers["Authorization"] = f"Bearer {token}"
            if body is not None:
                headers["Content-Type"] = "application/json"
            headers["Content-Length"] = str(len(payload))
            head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            if self._conn is None:
                self._conn = _Connection.open(
                    self._host, self._port, self._context, self.endpoint.tls_server_name or self._host, deadline
                )
            status, raw, keep_alive = self._conn.exchange(head.encode("latin-1") + b"\r\n" + payload, deadline)
            if not keep_alive:
                self._drop()
        except (OSError, ValueError) as exc:
            # Any failure leaves the stream in an unknown state: never reuse it.
            self._drop()
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, (socket.timeout, DeadlineExceeded)):
                reason = f"no complete reply within the request deadline ({timeout:.2g}s)"
            raise LeaseApiError(f"{method} lease {self.namespace}/{self.name}: {reason}") from exc
        try:
            decoded = json.loads(raw) if raw else {}
        except ValueError:
            decoded = {"message": raw[:200].decode("utf-8", "replace")}
        return status, decoded if isinstance(decoded, dict) else {}

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
