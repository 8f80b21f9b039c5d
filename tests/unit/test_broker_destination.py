"""brokers.destination: the policy is applied before any connection, with every address resolved off
the event loop in bounded time, and a verdict kept for its TTL."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Collection
from typing import Any

import pytest

from celery_fleet.brokers.destination import (
    DestinationCheck,
    GuardedSource,
    apiserver_addresses,
    destinations,
    guard,
    resolve,
)
from celery_fleet.brokers.source import BrokerError, DepthReading, ErrorKind, KeyLayout, QueueRef, UnackedSummary
from celery_fleet.planning.broker_policy import BrokerPolicy

POLICY = BrokerPolicy.build()


class Inner:
    """A source that records whether anything tried to reach the broker."""

    def __init__(self) -> None:
        self.reads = 0
        self.layout_checks = 0

    async def read(self, refs: Collection[QueueRef]) -> DepthReading:
        self.reads += 1
        return DepthReading(queued={r: {0: 0} for r in refs}, in_flight={}, unacked={KeyLayout(): UnackedSummary(0, 0)})

    async def check_layout(self, refs: Collection[QueueRef]) -> dict[QueueRef, list[str]]:
        self.layout_checks += 1
        return {}

    async def aclose(self) -> None:
        pass


class Resolver:
    def __init__(self, answers: dict[str, tuple[str, ...]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> tuple[str, ...]:
        self.calls.append(host)
        return self.answers[host]


def test_destinations_are_every_alternate_and_every_sentinel() -> None:
    assert destinations("redis://:pw@a:1/0;redis://b/0") == (("a", 1), ("b", 6379))
    assert destinations("sentinel://s1:26379;sentinel://s2") == (("s1", 26379), ("s2", 26379))
    assert destinations("redis://:pw@/0") == (("localhost", 6379),)  # an empty host is the operator's loopback
    with pytest.raises(BrokerError) as err:
        destinations("http://x")
    assert err.value.kind is ErrorKind.INVALID_URL


def test_a_refused_broker_is_never_read_and_the_verdict_names_host_and_flag() -> None:
    inner = Inner()
    resolver = Resolver({"good": ("10.1.2.3",), "evil": ("10.1.2.4", "169.254.169.254")})
    source = GuardedSource(inner, DestinationCheck("redis://:hunter2@good/0;redis://:hunter2@evil/0", POLICY,
                                                   resolver=resolver))  # fmt: skip

    async def main() -> None:
        with pytest.raises(BrokerError) as err:
            await source.read([QueueRef("q")])
        assert err.value.kind is ErrorKind.REFUSED_BY_POLICY
        assert "evil" in err.value.message and "169.254.169.254" in err.value.message
        assert "--broker-allow" in err.value.message and "hunter2" not in str(err.value)
        with pytest.raises(BrokerError):
            await source.check_layout([QueueRef("q")])

    asyncio.run(main())
    assert inner.reads == 0 and inner.layout_checks == 0


def test_an_allowed_broker_reads_and_is_resolved_once_per_ttl() -> None:
    inner, now = Inner(), [0.0]
    resolver = Resolver({"redis.shop": ("10.1.2.3",)})
    check = DestinationCheck("redis://redis.shop/0", POLICY, resolver=resolver, ttl=30, clock=lambda: now[0])
    source = GuardedSource(inner, check)

    async def main() -> None:
        for t in (0.0, 1.0, 29.0):
            now[0] = t
            await source.read([QueueRef("q")])
        assert resolver.calls == ["redis.shop"]
        now[0] = 30.0
        resolver.answers["redis.shop"] = ("127.0.0.1",)  # the name now points home: refused at the next expiry
        with pytest.raises(BrokerError) as err:
            await source.read([QueueRef("q")])
        assert err.value.kind is ErrorKind.REFUSED_BY_POLICY

    asyncio.run(main())
    assert inner.reads == 3 and resolver.calls == ["redis.shop", "redis.shop"]


def test_no_policy_leaves_the_source_as_it_is() -> None:
    inner = Inner()
    assert guard(inner, "redis://127.0.0.1/0", None) is inner  # type: ignore[arg-type]
    assert isinstance(guard(inner, "redis://127.0.0.1/0", POLICY), GuardedSource)  # type: ignore[arg-type]


def test_resolve_literals_and_names_off_the_loop() -> None:
    async def main() -> tuple[tuple[str, ...], tuple[str, ...], str]:
        loop_thread = threading.get_ident()
        seen: list[int] = []
        real = socket.getaddrinfo

        def spy(*args: Any, **kwargs: Any) -> Any:
            seen.append(threading.get_ident())
            return real(*args, **kwargs)

        socket.getaddrinfo = spy  # type: ignore[assignment]
        try:
            literal = await resolve("10.0.0.1", 6379)
            local = await resolve("localhost", 6379)
        finally:
            socket.getaddrinfo = real
        assert seen and loop_thread not in seen
        return literal, local, "ok"

    literal, local, _ = asyncio.run(main())
    assert literal == ("10.0.0.1",)
    assert "127.0.0.1" in local or "::1" in local


def test_resolve_is_bounded_in_time_and_failures_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def hung(*args: Any, **kwargs: Any) -> Any:
        release.wait(5)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    def missing(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def main() -> None:
        monkeypatch.setattr(socket, "getaddrinfo", hung)
        started = time.monotonic()
        with pytest.raises(BrokerError) as err:
            await resolve("slow.example", 6379, timeout=0.2)
        assert time.monotonic() - started < 1.0
        assert err.value.kind is ErrorKind.TIMEOUT and "slow.example" in err.value.message
        release.set()
        monkeypatch.setattr(socket, "getaddrinfo", missing)
        with pytest.raises(BrokerError) as err:
            await resolve("nowhere.example", 6379)
        assert err.value.kind is ErrorKind.UNREACHABLE and "Name or service not known" in err.value.message

    asyncio.run(main())


def test_apiserver_addresses_from_the_url_and_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert apiserver_addresses("https://127.0.0.1:6443") == ("10.96.0.1", "127.0.0.1")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert "127.0.0.1" in apiserver_addresses("https://localhost:6443") or "::1" in apiserver_addresses(
        "https://localhost:6443"
    )
    assert apiserver_addresses("https://[::1]:6443") == ("::1",)


def test_the_refusal_reason_is_one_only_the_user_can_clear() -> None:
    from celery_fleet.planning.conditions import STALLED_REASONS

    assert f"Broker{ErrorKind.REFUSED_BY_POLICY.value}" == "BrokerRefusedByPolicy"
    assert "BrokerRefusedByPolicy" in STALLED_REASONS


def test_a_failed_resolution_is_retried_soon_not_after_the_ttl() -> None:
    now, answers = [0.0], {"flaky": ()}

    async def resolver(host: str, port: int) -> tuple[str, ...]:
        if not answers["flaky"]:
            raise BrokerError(ErrorKind.UNREACHABLE, f"cannot resolve broker host {host}: Temporary failure")
        return answers["flaky"]

    check = DestinationCheck("redis://flaky/0", POLICY, resolver=resolver, ttl=30, clock=lambda: now[0])

    async def main() -> None:
        with pytest.raises(BrokerError) as err:
            await check.check()
        assert err.value.kind is ErrorKind.UNREACHABLE
        answers["flaky"] = ("10.0.0.8",)
        now[0] = 2.0
        await check.check()  # resolved again after 2 s, allowed

    asyncio.run(main())
