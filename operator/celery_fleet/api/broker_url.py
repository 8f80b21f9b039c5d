"""The broker URL as kombu reads it, parsed once for the models, the reconciler and the poller (no I/O).

kombu splits a URL on ``;`` into alternates and tries them in turn (``redis://a;redis://b``);
``sentinel://h1:26379;sentinel://h2:26379`` lists Sentinels (the master comes from
``master_name``). Every segment is checked the same way: a known scheme, a numeric database, and
only the query options the operator supports (a ``host=``, a timeout or a file path in the query
would make redis-py connect or behave otherwise than the spec and status say).

Messages never echo the URL: it may hold a password.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

REDIS_SCHEMES: Final = ("redis", "rediss")
SENTINEL_SCHEME: Final = "sentinel"
DEFAULT_PORTS: Final = {"redis": 6379, "rediss": 6379, "sentinel": 26379}
MAX_SEGMENTS: Final = 8
# Query options accepted in a broker URL, with the values accepted. Celery users write
# `?ssl_cert_reqs=CERT_REQUIRED` on rediss:// URLs; anything weaker belongs in spec.broker.tls
# (insecureSkipVerify), where it is explicit.
ALLOWED_QUERY: Final = {"ssl_cert_reqs": ("required", "CERT_REQUIRED")}
QUERY_HINT: Final = (
    "the only query option supported in a broker URL is ssl_cert_reqs=required; "
    "set CA, client certificate and insecureSkipVerify in spec.broker.tls"
)


class BrokerUrlError(ValueError):
    """A broker URL that cannot be used; the message names the rule, never the URL."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Endpoint:
    """One ``;`` segment of a broker URL."""

    scheme: str
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    url: str  # the segment as given (may hold the password: never show it)

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    @property
    def display(self) -> str:
        # Not URL-shaped on purpose: Events and status drop anything that looks like a URL.
        return f"{self.host}:{self.port}/{self.db}{' (TLS)' if self.tls else ''}"


@dataclass(frozen=True)
class BrokerUrl:
    kind: Literal["redis", "sentinel"]
    endpoints: tuple[Endpoint, ...]

    @property
    def secrets(self) -> tuple[str, ...]:
        out: set[str] = set()
        for e in self.endpoints:
            for s in (e.password, unquote(e.password or "")):
                if s:
                    out.add(s)
        return tuple(out)

    @property
    def display(self) -> str:
        first = self.endpoints[0]
        if self.kind == SENTINEL_SCHEME:
            return f"sentinel {first.host}:{first.port}" + (
                f" (+{len(self.endpoints) - 1} more)" if len(self.endpoints) > 1 else ""
            )
        more = f" (+{len(self.endpoints) - 1} failover)" if len(self.endpoints) > 1 else ""
        return first.display + more


def parse_broker_url(url: str) -> BrokerUrl:
    """Parse and check a broker URL (a ``;`` list of them); raises :class:`BrokerUrlError`."""
    segments = [s.strip() for s in url.strip().split(";")]
    if not url.strip() or any(not s for s in segments):
        raise BrokerUrlError("the broker URL is empty or has an empty ';' segment")
    if len(segments) > MAX_SEGMENTS:
        raise BrokerUrlError(f"at most {MAX_SEGMENTS} ';'-separated broker URLs are supported")
    endpoints = tuple(_endpoint(s, i, len(segments)) for i, s in enumerate(segments))
    kinds = {SENTINEL_SCHEME if e.scheme == SENTINEL_SCHEME else "redis" for e in endpoints}
    if len(kinds) > 1:
        raise BrokerUrlError("do not mix sentinel:// with redis:// or rediss:// in one broker URL")
    kind: Literal["redis", "sentinel"] = "sentinel" if kinds == {SENTINEL_SCHEME} else "redis"
    return BrokerUrl(kind, endpoints)


def _endpoint(segment: str, index: int, count: int) -> Endpoint:
    where = f"segment {index + 1} of the broker URL" if count > 1 else "the broker URL"
    try:
        parts = urlsplit(segment)
        port = parts.port
    except ValueError:
        raise BrokerUrlError(f"{where} cannot be parsed") from None
    if parts.scheme not in (*REDIS_SCHEMES, SENTINEL_SCHEME):
        raise BrokerUrlError(
            f"{where} has an unsupported scheme: use redis://, rediss:// or sentinel:// "
            "(Sentinel: sentinel://host:26379;sentinel://host2:26379 plus spec.broker.masterName)"
        )
    path = parts.path.lstrip("/") or "0"
    if not path.isdigit():
        # redis-py would quietly read db 0 while kombu refuses to start the workers.
        raise BrokerUrlError(f"the database in the path of {where} must be a number (e.g. /0)")
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in ALLOWED_QUERY or value not in ALLOWED_QUERY[key]:
            name = key if key.isidentifier() and len(key) <= 40 else "?"
            raise BrokerUrlError(f"{where} has the query option {name!r}: {QUERY_HINT}")
    if parts.fragment:
        raise BrokerUrlError(f"{where} must not have a #fragment")
    return Endpoint(
        scheme=parts.scheme,
        host=parts.hostname or "localhost",
        port=port or DEFAULT_PORTS[parts.scheme],
        db=int(path),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        url=segment,
    )
