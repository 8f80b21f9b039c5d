"""The broker destination policy at the door: resolve a broker's hosts (off the event loop, in bounded
time), check every address (`planning.broker_policy`), and only then let the source connect.

A refused broker fails its reads with `ErrorKind.REFUSED_BY_POLICY` and is never sent a byte.
Verdicts are kept `ttl` seconds, so a fleet polling every second does not resolve every second.
redis-py resolves the name again when it opens a connection; a name that changes its answer in
between (DNS rebinding) is checked again at the next expiry, not at that instant (docs/tenancy.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any
from urllib.parse import urlsplit

from celery_fleet.api.broker_url import BrokerUrlError, parse_broker_url
from celery_fleet.brokers.source import BrokerError, DepthReading, ErrorKind, QueueDepthSource, QueueRef
from celery_fleet.planning.broker_policy import BrokerPolicy, check_destination

RESOLVE_TIMEOUT_SECONDS = 2.0
VERDICT_TTL_SECONDS = 30.0
RETRY_RESOLVE_SECONDS = 2.0  # a failed resolution is tried again this soon, not after the whole TTL
MAX_ADDRESSES = 64  # a name with more is refused: every one would have to be checked
# getaddrinfo cannot be cancelled: a few threads of its own, so a hung resolver never holds the
# threads that reconciles and scale calls use.
_RESOLVER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="broker-dns")

Resolve = Callable[[str, int], Awaitable[tuple[str, ...]]]


async def resolve(host: str, port: int, timeout: float = RESOLVE_TIMEOUT_SECONDS) -> tuple[str, ...]:
    """Every address `host` resolves to (an address literal is itself); raises BrokerError."""
    try:
        return (str(ipaddress.ip_address(host)),)
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    call = loop.run_in_executor(_RESOLVER, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    try:
        infos = await asyncio.wait_for(call, timeout)
    except TimeoutError:
        raise BrokerError(ErrorKind.TIMEOUT, f"resolving broker host {host} took over {timeout:g}s") from None
    except (OSError, UnicodeError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise BrokerError(ErrorKind.UNREACHABLE, f"cannot resolve broker host {host}: {why[:100]}") from None
    return tuple(dict.fromkeys(str(info[4][0]) for info in infos))


def destinations(url: str) -> tuple[tuple[str, int], ...]:
    """Every (host, port) the URL makes the operator connect to: each `;` alternate, or each Sentinel."""
    try:
        parsed = parse_broker_url(url)
    except BrokerUrlError as err:
        raise BrokerError(ErrorKind.INVALID_URL, err.message) from None
    return tuple(dict.fromkeys((e.host[:253], e.port) for e in parsed.endpoints))


class DestinationCheck:
    """One broker's verdict, kept `ttl` seconds; `check()` raises BrokerError when refused."""

    def __init__(
        self,
        url: str,
        policy: BrokerPolicy,
        *,
        resolver: Resolve = resolve,
        ttl: float = VERDICT_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hosts = destinations(url)
        self.policy = policy
        self.resolver = resolver
        self.ttl = ttl
        self.clock = clock
        self._verdict: tuple[float, BrokerError | None] | None = None

    async def check(self) -> None:
        now = self.clock()
        if self._verdict is None or now >= self._verdict[0]:
            failure = await self._judge()
            unresolved = failure is not None and failure.kind is not ErrorKind.REFUSED_BY_POLICY
            self._verdict = (now + (min(self.ttl, RETRY_RESOLVE_SECONDS) if unresolved else self.ttl), failure)
        failure = self._verdict[1]
        if failure is not None:
            raise failure

    async def _judge(self) -> BrokerError | None:
        for host, port in self.hosts:
            try:
                addresses = await self.resolver(host, port)
            except BrokerError as err:
                return err
            if len(addresses) > MAX_ADDRESSES:
                too_many = f"broker host {host} resolves to over {MAX_ADDRESSES} addresses"
                return BrokerError(ErrorKind.REFUSED_BY_POLICY, too_many)
            verdict = check_destination(host, addresses, self.policy)
            if not verdict.allowed:
                return BrokerError(ErrorKind.REFUSED_BY_POLICY, f"{verdict.message}; no connection is made")
        return None


class GuardedSource:
    """A QueueDepthSource that reads only while its broker's destinations pass the policy."""

    def __init__(self, inner: QueueDepthSource, check: DestinationCheck) -> None:
        self.inner = inner
        self.destination = check

    def __repr__(self) -> str:
        return f"GuardedSource({self.inner!r})"

    async def read(self, refs: Collection[QueueRef]) -> DepthReading:
        await self.destination.check()
        return await self.inner.read(refs)

    async def check_layout(self, watched: Collection[QueueRef]) -> Mapping[QueueRef, Any]:
        await self.destination.check()
        check: Callable[[Collection[QueueRef]], Awaitable[Mapping[QueueRef, Any]]] = self.inner.check_layout  # type: ignore[attr-defined]  # every Redis source has it
        return await check(watched)

    async def aclose(self) -> None:
        await self.inner.aclose()


def guard(source: QueueDepthSource, url: str, policy: BrokerPolicy | None) -> QueueDepthSource:
    """`source`, reading only while `url`'s destinations pass `policy` (None: no policy)."""
    return source if policy is None else GuardedSource(source, DestinationCheck(url, policy))


def apiserver_addresses(server: str, timeout: float = RESOLVE_TIMEOUT_SECONDS) -> tuple[str, ...]:
    """The apiserver's addresses, to refuse as brokers: its URL's host resolved (at start, bounded) and
    the in-cluster Service address. A name that does not resolve in time adds nothing."""
    found: list[str] = []
    service = os.environ.get("KUBERNETES_SERVICE_HOST")
    if service:
        found.append(service)
    host = urlsplit(server).hostname
    if host:
        try:
            found.append(str(ipaddress.ip_address(host)))
        except ValueError:
            try:
                infos = _RESOLVER.submit(socket.getaddrinfo, host, None, 0, socket.SOCK_STREAM).result(timeout)
                found += [str(info[4][0]) for info in infos]
            except (OSError, UnicodeError, FutureTimeout):
                pass
    return tuple(dict.fromkeys(found))
