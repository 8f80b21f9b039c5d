"""planning.broker_policy: which broker destinations the operator may connect to, as named tables."""

from __future__ import annotations

import subprocess
import sys

import pytest

from celery_fleet.planning.broker_policy import BrokerPolicy, PolicyError, check_destination

DEFAULT = BrokerPolicy.build(own_addresses=["10.244.1.7"], apiserver_addresses=["10.96.0.1"])
DEV = BrokerPolicy.build(["127.0.0.0/8", "::1/128"], apiserver_addresses=["127.0.0.1"])
ONLY_RANGE = BrokerPolicy.build(["10.20.0.0/16"], ["0.0.0.0/0", "::/0"])
NAMES = BrokerPolicy.build(["*.redis.example.com", "broker.internal"], ["bad.redis.example.com"])


@pytest.mark.parametrize(
    ("policy", "host", "addresses", "allowed", "words"),
    [
        pytest.param(DEFAULT, "redis.shop.svc", ["10.0.3.4"], True, (), id="ordinary-service-ip"),
        pytest.param(
            DEFAULT,
            "localhost",
            ["127.0.0.1", "::1"],
            False,
            ("loopback", "--broker-allow=127.0.0.1/32"),
            id="empty-host-is-loopback",
        ),
        pytest.param(DEFAULT, "127.3.2.1", ["127.3.2.1"], False, ("loopback",), id="all-of-127/8"),
        pytest.param(DEFAULT, "::1", ["::1"], False, ("loopback", "::1/128"), id="ipv6-loopback"),
        pytest.param(DEFAULT, "evil", ["::ffff:127.0.0.1"], False, ("127.0.0.1", "loopback"), id="v4-mapped-loopback"),
        pytest.param(DEFAULT, "0.0.0.0", ["0.0.0.0"], False, ("unspecified",), id="unspecified-v4"),
        pytest.param(DEFAULT, "::", ["::"], False, ("unspecified",), id="unspecified-v6"),
        pytest.param(DEFAULT, "meta", ["169.254.169.254"], False, ("link-local",), id="cloud-metadata"),
        pytest.param(DEFAULT, "ll6", ["fe80::1%eth0"], False, ("link-local",), id="ipv6-link-local-with-zone"),
        pytest.param(DEFAULT, "me", ["10.244.1.7"], False, ("own pod",), id="own-pod-ip"),
        pytest.param(DEFAULT, "kubernetes.default", ["10.96.0.1"], False, ("apiserver",), id="apiserver"),
        pytest.param(
            DEFAULT, "split", ["10.0.3.4", "127.0.0.1"], False, ("127.0.0.1",), id="every-resolved-address-checked"
        ),
        pytest.param(DEFAULT, "nowhere", [], False, ("no address",), id="no-address"),
        pytest.param(DEFAULT, "junk", ["not-an-ip"], False, ("not an address",), id="garbage-address"),
        pytest.param(DEV, "127.0.0.1", ["127.0.0.1"], True, (), id="dev-allows-loopback-even-the-apiserver-ip"),
        pytest.param(DEV, "meta", ["169.254.169.254"], False, ("link-local",), id="dev-still-denies-link-local"),
        pytest.param(DEV, "redis.shop.svc", ["10.0.3.4"], True, (), id="allow-is-not-an-allow-list"),
        pytest.param(ONLY_RANGE, "in", ["10.20.5.5"], True, (), id="most-specific-allow-wins"),
        pytest.param(ONLY_RANGE, "out", ["10.21.0.1"], False, ("--broker-deny=0.0.0.0/0",), id="deny-all-else"),
        pytest.param(ONLY_RANGE, "out6", ["2001:db8::1"], False, ("--broker-deny=::/0",), id="deny-all-else-v6"),
        pytest.param(
            BrokerPolicy.build(["10.0.0.0/8"], ["10.0.0.0/8"]),
            "tie",
            ["10.1.1.1"],
            False,
            ("--broker-deny=10.0.0.0/8",),
            id="deny-wins-a-tie",
        ),
        pytest.param(
            BrokerPolicy.build(["10.0.0.0/8"], ["10.1.0.0/16"]),
            "hole",
            ["10.1.1.1"],
            False,
            ("10.1.0.0/16",),
            id="narrower-deny-inside-allow",
        ),
        pytest.param(NAMES, "a.redis.example.com", ["10.0.0.9"], True, (), id="allowed-name-wildcard"),
        pytest.param(NAMES, "Broker.Internal.", ["10.0.0.9"], True, (), id="names-case-and-trailing-dot"),
        pytest.param(
            NAMES,
            "bad.redis.example.com",
            ["10.0.0.9"],
            False,
            ("--broker-deny=bad.redis.example.com",),
            id="denied-name-wins",
        ),
        pytest.param(NAMES, "redis.other.com", ["10.0.0.9"], False, ("not among",), id="names-are-an-allow-list"),
        pytest.param(
            NAMES,
            "x.redis.example.com",
            ["127.0.0.1"],
            False,
            ("loopback",),
            id="allowed-name-still-checked-by-address",
        ),
        pytest.param(NAMES, "redis.example.com", ["10.0.0.9"], False, ("not among",), id="wildcard-needs-a-label"),
    ],
)
def test_check_destination(
    policy: BrokerPolicy, host: str, addresses: list[str], allowed: bool, words: tuple[str, ...]
) -> None:
    verdict = check_destination(host, addresses, policy)
    assert verdict.allowed is allowed, verdict.message
    for word in words:
        assert word in verdict.message
    if not allowed:
        hints = ("--broker-allow", "--broker-deny", "no address", "not an address")
        assert host in verdict.message and any(h in verdict.message for h in hints)


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param("http://x", id="url"),
        pytest.param("a b", id="space"),
        pytest.param("*.", id="bare-wildcard"),
        pytest.param("x" * 64 + ".com", id="label-too-long"),
        pytest.param("10.0.0.0/33", id="bad-prefix"),
    ],
)
def test_bad_entries_are_refused(entry: str) -> None:
    with pytest.raises(PolicyError):
        BrokerPolicy.build([entry])


def test_a_policy_from_no_flags_denies_only_the_builtins() -> None:
    policy = BrokerPolicy.build()
    assert not policy.rules and not policy.allowed_names and not policy.denied_names
    assert check_destination("redis", ["192.168.1.5"], policy).allowed
    assert not check_destination("redis", ["127.0.0.1"], policy).allowed


def test_the_operator_refuses_a_bad_entry_before_connecting() -> None:
    # A subprocess: `run` hides the official client from the importing process (see cli._run).
    proc = subprocess.run(
        [sys.executable, "-m", "celery_fleet.cli", "run", "--kubeconfig", "/nonexistent",
         "--broker-deny", "not a host"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "--broker-allow/--broker-deny" in proc.stderr, proc.stderr
