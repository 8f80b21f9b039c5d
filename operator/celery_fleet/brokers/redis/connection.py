"""Connecting to a user's Redis on ``redis.asyncio``: TLS from PEM text, kombu's ``;`` failover,
Sentinel discovery; the result is a :class:`~celery_fleet.brokers.redis.source.RedisDepthSource`."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.asyncio.sentinel as aioredis_sentinel
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from celery_fleet.brokers.redis.resp import BOUNDED_REPLIES
from celery_fleet.brokers.redis.scripts import DEFAULT_SCAN_LIMIT, Command, Reply
from celery_fleet.brokers.redis.source import RedisDepthSource
from celery_fleet.brokers.redis.target import RedisTarget, classify
from celery_fleet.brokers.source import BrokerError, ErrorKind


@dataclass(frozen=True)
class TlsSettings:
    """spec.broker.tls, resolved: PEM text read from the Secret / ConfigMap (never logged)."""

    ca_pem: str | None = None
    cert_pem: str | None = None
    key_pem: str | None = None
    insecure_skip_verify: bool = False

    def __repr__(self) -> str:
        return f"TlsSettings(ca={self.ca_pem is not None}, client_cert={self.cert_pem is not None})"


@dataclass(frozen=True)
class ConnectOptions:
    """What besides the URL identifies a broker connection (part of the poller's key)."""

    tls: TlsSettings | None = None
    master_name: str | None = None


class _CertificateFiles:
    """Client certificates and keys as files (Python's ssl loads them only from paths), one pair per
    distinct PEM content in one private directory, shared by every client that uses that content and
    removed when the last one closes: 65 pools on one Secret write one pair, not 65."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dir: str | None = None
        self._users: dict[str, int] = {}

    def acquire(self, cert_pem: str, key_pem: str) -> tuple[str, str, str]:
        """(digest, cert path, key path); every acquire is paired with one :meth:`release`."""
        digest = hashlib.sha256(f"{cert_pem}\0{key_pem}".encode()).hexdigest()
        with self._lock:
            if self._dir is None or not os.path.isdir(self._dir):
                self._dir = tempfile.mkdtemp(prefix="celery-fleet-tls-")  # mode 0700
            cert, key = self._paths(digest)
            if digest not in self._users:
                for path, text in ((cert, cert_pem), (key, key_pem)):
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    with os.fdopen(fd, "w") as f:
                        f.write(text)
            self._users[digest] = self._users.get(digest, 0) + 1
            return digest, cert, key

    def release(self, digest: str) -> None:
        with self._lock:
            left = self._users.get(digest, 0) - 1
            if left > 0:
                self._users[digest] = left
                return
            self._users.pop(digest, None)
            for path in self._paths(digest):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)

    def _paths(self, digest: str) -> tuple[str, str]:
        assert self._dir is not None
        return os.path.join(self._dir, f"{digest}.crt"), os.path.join(self._dir, f"{digest}.key")

    def files(self) -> list[str]:
        """What is on disk now (for tests and the cost report)."""
        with self._lock:
            return sorted(os.listdir(self._dir)) if self._dir and os.path.isdir(self._dir) else []


CERTIFICATE_FILES = _CertificateFiles()


def _tls_kwargs(tls: TlsSettings | None) -> tuple[dict[str, Any], str | None]:
    """redis-py's ssl_* arguments, and the certificate digest to release when the clients close."""
    if tls is None:
        return {}, None
    kwargs: dict[str, Any] = {"ssl_cert_reqs": "none" if tls.insecure_skip_verify else "required"}
    if tls.insecure_skip_verify:
        kwargs["ssl_check_hostname"] = False
    if tls.ca_pem:
        kwargs["ssl_ca_data"] = tls.ca_pem
    digest = None
    if tls.cert_pem and tls.key_pem:
        digest, cert, key = CERTIFICATE_FILES.acquire(tls.cert_pem, tls.key_pem)
        kwargs.update(ssl_certfile=cert, ssl_keyfile=key)
    return kwargs, digest


@dataclass
class BrokerClients:
    """The redis.asyncio clients of one broker: one per ``;`` alternate, or the master the
    Sentinels name. Close with :meth:`aclose` (it also releases certificate files)."""

    target: RedisTarget
    clients: list[aioredis.Redis[Any]]
    sentinel: aioredis_sentinel.Sentinel | None = None
    certificate: str | None = None
    closed: bool = False

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            for client in self.clients:
                await client.aclose()  # type: ignore[attr-defined]  # types-redis 4.6 predates aclose (redis 5)
            for node in self.sentinel.sentinels if self.sentinel else ():
                await node.aclose()  # type: ignore[attr-defined]
        finally:
            if self.certificate is not None:
                CERTIFICATE_FILES.release(self.certificate)


def open_clients(
    url: str,
    *,
    tls: TlsSettings | None = None,
    master_name: str | None = None,
    connect_timeout: float = 1.0,
    read_timeout: float = 2.0,
    max_connections: int = 4,
) -> BrokerClients:
    """Every Redis client the operator opens (polls and remote control) is built here, so TLS (CA,
    client certificate, verification), Sentinel and timeouts come from one place.

    No CLIENT SETNAME/SETINFO and no other command the callers do not need, so the smallest ACL
    user works (docs/install.md). redis-py's own retries are off: callers own reconnects.
    Raises :class:`BrokerError` (named, no secret in it) for an unusable URL.
    """
    target = RedisTarget.parse(url)
    common: dict[str, Any] = dict(
        socket_connect_timeout=connect_timeout,
        socket_timeout=read_timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        max_connections=max_connections,
        health_check_interval=0,
        driver_info=None,  # no CLIENT SETINFO: the ACL user need not allow it
        **BOUNDED_REPLIES,  # replies bounded in bytes before they are read (and RESP2: no HELLO 3)
    )
    if target.sentinels:
        if not master_name:
            raise BrokerError(
                ErrorKind.INVALID_URL, "a sentinel:// broker needs spec.broker.masterName (Celery's master_name)"
            )
        # kombu's SentinelChannel: the first URL's user, password and database are the master's;
        # TLS (broker_use_ssl) applies to the master's connections.
        tls_kwargs, digest = _tls_kwargs(tls)
        timeouts = {"socket_connect_timeout": connect_timeout, "socket_timeout": read_timeout}
        # The Sentinels' own clients take Redis() arguments only (no parser_class): their replies
        # (SENTINEL MASTERS) are small and read once per discovery.
        sentinel = aioredis_sentinel.Sentinel(list(target.sentinels), sentinel_kwargs=dict(timeouts))
        client = sentinel.master_for(
            master_name, username=target.username, password=target.password, db=target.db,
            **({"ssl": True, **tls_kwargs} if tls is not None else {}), **common,
        )  # fmt: skip
        return BrokerClients(target, [client], sentinel=sentinel, certificate=digest)
    tls_kwargs, digest = _tls_kwargs(tls if target.tls else None)
    try:
        clients = [
            aioredis.Redis.from_url(u, **(tls_kwargs if u.startswith("rediss:") else {}), **common) for u in target.urls
        ]
    except Exception as exc:
        if digest is not None:
            CERTIFICATE_FILES.release(digest)
        raise classify(exc, target) from None
    return BrokerClients(target, clients, certificate=digest)


class _Failover:
    """One client per ``;`` segment, used as kombu uses alternates: stay on the one that answers,
    move to the next when it cannot be reached (within the same round trip)."""

    def __init__(self, clients: Sequence[aioredis.Redis[Any]]) -> None:
        self.clients = list(clients)
        self.current = 0
        # A poll sends the same commands every second: they are encoded once (by identity, the
        # commands kept alive here), not per poll (redis-py's pipeline packing was 40 % of an idle
        # 1000-pool fleet's poll CPU).
        self._packed: dict[int, tuple[Sequence[Command], list[bytes]]] = {}

    async def round_trip(self, commands: Sequence[Command]) -> list[Reply]:
        for attempt in range(len(self.clients)):
            client = self.clients[self.current]
            try:
                return await self._send(client, commands)
            except (rexc.ConnectionError, rexc.TimeoutError, OSError):
                if attempt == len(self.clients) - 1:
                    raise
                self.current = (self.current + 1) % len(self.clients)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(self, client: aioredis.Redis[Any], commands: Sequence[Command]) -> list[Reply]:
        """The commands in one write, their replies in order; a command's error is its reply."""
        pool = client.connection_pool
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(self._pack(connection, commands), check_health=False)
            replies: list[Reply] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except rexc.ResponseError as err:
                    replies.append(err)
            return replies
        except BaseException:
            await connection.disconnect()  # a half-read reply must not be left for the next poll
            raise
        finally:
            await pool.release(connection)

    def _pack(self, connection: Any, commands: Sequence[Command]) -> list[bytes]:
        kept = self._packed.get(id(commands))
        if kept is not None and kept[0] is commands:
            return kept[1]
        if len(self._packed) >= 8:  # the plans changed: forget the old ones
            self._packed.clear()
        packed: list[bytes] = connection.pack_commands(commands)
        self._packed[id(commands)] = (commands, packed)
        return packed


def connect(
    url: str,
    *,
    connect_timeout: float = 1.0,
    read_timeout: float = 2.0,
    scan_limit: int = DEFAULT_SCAN_LIMIT,
    inflight_budget: float = 0.02,
    tls: TlsSettings | None = None,
    master_name: str | None = None,
) -> RedisDepthSource:
    """A source on ``redis.asyncio`` (Kopf runs on asyncio; a sync client would stall its loop).

    The :class:`~celery_fleet.brokers.poller.BrokerPoller` owns reconnects and their backoff, so a
    dead broker costs one bounded timeout per segment per attempt, not three. On Sentinel every
    new connection asks the Sentinels again, so a failover is followed once the old master's
    connection fails.
    """
    opened = open_clients(
        url, tls=tls, master_name=master_name, connect_timeout=connect_timeout, read_timeout=read_timeout
    )
    failover = _Failover(opened.clients)
    # Sentinel discovery asks the Sentinels first: one more connect and read.
    rounds = 2 if opened.sentinel else len(opened.clients)
    return RedisDepthSource(
        failover.round_trip,
        opened.target,
        scan_limit=scan_limit,
        inflight_budget=inflight_budget,
        deadline_seconds=(connect_timeout + 2 * read_timeout) * rounds,
        close=opened.aclose,
    )
