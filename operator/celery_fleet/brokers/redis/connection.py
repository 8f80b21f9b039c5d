"""Connecting to a user's Redis on ``redis.asyncio``: TLS from PEM text, kombu's ``;`` failover,
Sentinel discovery; the result is a :class:`~celery_fleet.brokers.redis.source.RedisDepthSource`."""

from __future__ import annotations

import os
import shutil
import tempfile
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


class _ClientFiles:
    """A client certificate and key as files (Python's ssl loads them only from paths): a private
    directory readable by the operator alone, removed when the source closes."""

    def __init__(self, cert_pem: str, key_pem: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="celery-fleet-tls-")
        self.cert = os.path.join(self.dir, "tls.crt")
        self.key = os.path.join(self.dir, "tls.key")
        for path, text in ((self.cert, cert_pem), (self.key, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _tls_kwargs(tls: TlsSettings | None) -> tuple[dict[str, Any], _ClientFiles | None]:
    if tls is None:
        return {}, None
    kwargs: dict[str, Any] = {"ssl_cert_reqs": "none" if tls.insecure_skip_verify else "required"}
    if tls.insecure_skip_verify:
        kwargs["ssl_check_hostname"] = False
    if tls.ca_pem:
        kwargs["ssl_ca_data"] = tls.ca_pem
    files = None
    if tls.cert_pem and tls.key_pem:
        files = _ClientFiles(tls.cert_pem, tls.key_pem)
        kwargs.update(ssl_certfile=files.cert, ssl_keyfile=files.key)
    return kwargs, files


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

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()  # type: ignore[attr-defined]  # types-redis 4.6 predates aclose (redis 5)


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

    No CLIENT SETNAME and no other command the reads do not need, so the smallest ACL user works
    (docs/install.md). redis-py's own retries are off: the
    :class:`~celery_fleet.brokers.poller.BrokerPoller` owns reconnects and their backoff, so a dead
    broker costs one bounded timeout per segment per attempt, not three.
    """
    target = RedisTarget.parse(url)
    if target.sentinels:
        return _connect_sentinel(target, master_name, connect_timeout, read_timeout, scan_limit, inflight_budget)
    tls_kwargs, files = _tls_kwargs(tls if target.tls else None)
    try:
        clients = [
            aioredis.Redis.from_url(
                u,
                **(tls_kwargs if u.startswith("rediss:") else {}),
                socket_connect_timeout=connect_timeout,
                socket_timeout=read_timeout,
                retry=Retry(NoBackoff(), 0),
                retry_on_timeout=False,
                max_connections=4,
                health_check_interval=0,
                driver_info=None,  # no CLIENT SETINFO: the ACL user need not allow it
                **BOUNDED_REPLIES,  # replies bounded in bytes before they are read
            )  # type: ignore[call-overload]  # types-redis 4.6 predates driver_info
            for u in target.urls
        ]
    except Exception as exc:
        if files is not None:
            files.remove()
        raise classify(exc, target) from None
    failover = _Failover(clients)

    async def close() -> None:
        try:
            await failover.aclose()
        finally:
            if files is not None:
                files.remove()

    return RedisDepthSource(
        failover.round_trip,
        target,
        scan_limit=scan_limit,
        inflight_budget=inflight_budget,
        deadline_seconds=(connect_timeout + 2 * read_timeout) * len(clients),
        close=close,
    )


def _connect_sentinel(
    target: RedisTarget,
    master_name: str | None,
    connect_timeout: float,
    read_timeout: float,
    scan_limit: int,
    inflight_budget: float,
) -> RedisDepthSource:
    """Read the master the Sentinels name, as kombu's SentinelChannel does: the first URL's user,
    password and database are the master's; every new connection asks the Sentinels again, so a
    failover is followed once the old master's connection fails."""
    if not master_name:
        raise BrokerError(
            ErrorKind.INVALID_URL, "a sentinel:// broker needs spec.broker.masterName (Celery's master_name)"
        )
    timeouts: dict[str, Any] = {"socket_connect_timeout": connect_timeout, "socket_timeout": read_timeout}
    sentinel = aioredis_sentinel.Sentinel(list(target.sentinels), sentinel_kwargs=dict(timeouts))
    client = sentinel.master_for(
        master_name,
        username=target.username,
        password=target.password,
        db=target.db,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        max_connections=4,
        health_check_interval=0,
        driver_info=None,
        **timeouts,
        **BOUNDED_REPLIES,
    )
    failover = _Failover([client])

    async def close() -> None:
        await failover.aclose()
        for node in sentinel.sentinels:
            await node.aclose()  # type: ignore[attr-defined]  # types-redis 4.6 predates aclose (redis 5)

    return RedisDepthSource(
        failover.round_trip,
        target,
        scan_limit=scan_limit,
        inflight_budget=inflight_budget,
        # Discovery asks the Sentinels first: one more connect and read.
        deadline_seconds=2 * (connect_timeout + 2 * read_timeout),
        close=close,
    )
