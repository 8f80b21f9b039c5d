"""Which broker destinations the operator may connect to (pure: host names and addresses in, a verdict out).

The operator reaches every tenant's Redis, so any `host:port` in a pool is a connection the
operator makes on the tenant's behalf, past the NetworkPolicies that keep tenants apart. The policy
refuses what a tenant should never reach through us: by default loopback (an empty host is the
operator's own loopback), link-local (cloud metadata, 169.254.169.254), the unspecified address
(0.0.0.0 reaches loopback on Linux), the operator's own pod and the apiserver.

Rules, in order (`check_destination`):
1. a host name matching a denied name is refused;
2. when allowed host names are listed, a host matching none of them is refused;
3. every address the host resolves to must pass: the most specific allowed or denied CIDR that
   contains it decides (a deny wins a tie); with none, a built-in deny refuses it; else it passes.
So `--broker-allow 127.0.0.0/8` lets a dev operator reach local brokers, and `--broker-deny 0.0.0.0/0
--broker-deny ::/0 --broker-allow 10.20.0.0/16` admits only that range.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOW_FLAG: Final = "--broker-allow"
DENY_FLAG: Final = "--broker-deny"
CHART_ALLOW: Final = "brokerPolicy.allowed"
CHART_DENY: Final = "brokerPolicy.denied"

BUILTIN_DENIED: Final[tuple[tuple[str, str], ...]] = (
    ("127.0.0.0/8", "loopback"),
    ("::1/128", "loopback"),
    ("0.0.0.0/8", "the unspecified address (reaches loopback)"),
    ("::/128", "the unspecified address (reaches loopback)"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("fe80::/10", "link-local"),
)


class PolicyError(ValueError):
    """An allow or deny entry that is neither a CIDR / address nor a host name."""


@dataclass(frozen=True)
class Rule:
    network: Network
    allow: bool
    entry: str  # as the user wrote it, for messages


@dataclass(frozen=True)
class BrokerPolicy:
    """What `celery-fleet run` was told (`--broker-allow`, `--broker-deny`) and what it denies on its own."""

    rules: tuple[Rule, ...] = ()
    allowed_names: tuple[str, ...] = ()
    denied_names: tuple[str, ...] = ()
    builtin: tuple[tuple[Network, str], ...] = field(
        default_factory=lambda: tuple((ipaddress.ip_network(c), what) for c, what in BUILTIN_DENIED)
    )

    @classmethod
    def build(
        cls,
        allowed: Iterable[str] = (),
        denied: Iterable[str] = (),
        *,
        own_addresses: Iterable[str] = (),
        apiserver_addresses: Iterable[str] = (),
    ) -> BrokerPolicy:
        """From flag values; `own_addresses` (the pod's IPs) and `apiserver_addresses` join the built-in denies."""
        rules: list[Rule] = []
        names: dict[bool, list[str]] = {True: [], False: []}
        for allow, entries in ((True, allowed), (False, denied)):
            for entry in entries:
                entry = entry.strip()
                if not entry:
                    continue
                network = _network(entry)
                if network is not None:
                    rules.append(Rule(network, allow, entry))
                else:
                    names[allow].append(_name_pattern(entry))
        builtin = [(ipaddress.ip_network(c), what) for c, what in BUILTIN_DENIED]
        for addresses, what in ((own_addresses, "the operator's own pod"), (apiserver_addresses, "the apiserver")):
            for a in addresses:
                parsed = _address(a)
                if parsed is not None:
                    builtin.append((ipaddress.ip_network(parsed), what))
        return cls(tuple(rules), tuple(names[True]), tuple(names[False]), tuple(builtin))


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    message: str = ""  # why not: names the host, the address and the flag to change; never a URL


def check_destination(host: str, addresses: Sequence[str], policy: BrokerPolicy) -> Verdict:
    """Whether the operator may connect to `host`, which resolved to `addresses` (every one is checked)."""
    name = host.strip().rstrip(".").lower()
    for pattern in policy.denied_names:
        if _name_matches(name, pattern):
            return Verdict(False, f"broker host {host} is denied by {DENY_FLAG}={pattern} ({CHART_DENY})")
    if policy.allowed_names and not any(_name_matches(name, p) for p in policy.allowed_names):
        return Verdict(
            False,
            f"broker host {host} is not among the host names allowed by {ALLOW_FLAG} ({CHART_ALLOW}); "
            "add it there to reach this broker",
        )
    if not addresses:
        return Verdict(False, f"broker host {host} resolved to no address")
    for text in addresses:
        address = _address(text)
        if address is None:
            return Verdict(False, f"broker host {host} resolved to something that is not an address")
        verdict = _check_address(host, address, policy)
        if not verdict.allowed:
            return verdict
    return Verdict(True)


def _check_address(host: str, address: Address, policy: BrokerPolicy) -> Verdict:
    matching = [r for r in policy.rules if address.version == r.network.version and address in r.network]
    if matching:
        # Most specific first; at equal length a deny comes before an allow.
        best = max(matching, key=lambda r: (r.network.prefixlen, not r.allow))
        if best.allow:
            return Verdict(True)
        return Verdict(
            False, f"broker host {host} resolves to {address}, denied by {DENY_FLAG}={best.entry} ({CHART_DENY})"
        )
    for network, what in policy.builtin:
        if address.version == network.version and address in network:
            allow = f"{ALLOW_FLAG}={_suggest(address)} ({CHART_ALLOW})"
            return Verdict(
                False,
                f"broker host {host} resolves to {address}, {what}, which the operator refuses by default; "
                f"if this broker is meant to be reached, allow it with {allow}",
            )
    return Verdict(True)


def _suggest(address: Address) -> str:
    return f"{address}/{address.max_prefixlen}"


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 zone ("fe80::1%eth0") is not the address
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 to the kernel
    return address


def _network(entry: str) -> Network | None:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None


def _name_pattern(entry: str) -> str:
    """A host name (`redis.example.com`) or every name under a domain (`*.example.com`)."""
    name = entry.rstrip(".").lower()
    bare = name[2:] if name.startswith("*.") else name
    labels = bare.split(".")
    if not bare or len(bare) > 253 or not all(_label_ok(label) for label in labels):
        raise PolicyError(f"{entry!r} is neither a CIDR, an IP address nor a host name (a leading '*.' is allowed)")
    return name


def _label_ok(label: str) -> bool:
    return 0 < len(label) <= 63 and label.replace("-", "").replace("_", "").isalnum() and label.isascii()


def _name_matches(name: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern
