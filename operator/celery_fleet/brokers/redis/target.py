"""The broker URL: safe to show, safe to connect with; and failures named without a secret in them."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import SplitResult, parse_qsl, quote, urlencode, urlsplit

from redis import exceptions as rexc

from celery_fleet.api.broker_url import BrokerUrlError, parse_broker_url
from celery_fleet.brokers.source import BrokerError, ErrorKind
from celery_fleet.planning.redact import redact_urls


@dataclass(frozen=True)
class RedisTarget:
    """A parsed broker URL (a ``;`` list of them). ``display`` is what may be shown.

    ``urls`` are the segments as redis-py takes them, tried in turn as kombu does; for a
    Sentinel URL ``sentinels`` lists the Sentinels and ``urls`` is empty.
    """

    urls: tuple[str, ...] = ()
    display: str = ""
    secrets: tuple[str, ...] = ()  # strings that must never appear in a message
    sentinels: tuple[tuple[str, int], ...] = ()
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    def __repr__(self) -> str:  # never print the URL, even in a traceback
        return f"RedisTarget({self.display})"

    __str__ = __repr__

    @property
    def url(self) -> str:
        return self.urls[0] if self.urls else ""

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        try:
            parsed = parse_broker_url(url)
        except BrokerUrlError as err:
            raise BrokerError(ErrorKind.INVALID_URL, err.message) from None
        first = parsed.endpoints[0]
        common = {"display": parsed.display, "secrets": parsed.secrets, "db": first.db}
        if parsed.kind == "sentinel":
            # kombu: every sentinel:// segment is a Sentinel; the first one's userinfo and database
            # are the master's.
            sentinels = tuple((e.host, e.port) for e in parsed.endpoints)
            return cls(sentinels=sentinels, username=first.username, password=first.password, **common)  # type: ignore[arg-type]
        urls = tuple(_normalize_query(urlsplit(e.url)) for e in parsed.endpoints)
        return cls(urls=urls, tls=first.tls, username=first.username, password=first.password, **common)  # type: ignore[arg-type]

    def scrub(self, text: str) -> str:
        for s in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(s, "***").replace(quote(s, safe=""), "***")
        return redact_urls(text)


def _normalize_query(parts: SplitResult) -> str:
    # Celery writes ssl_cert_reqs=CERT_REQUIRED; redis-py wants required/optional/none.
    query = parse_qsl(parts.query, keep_blank_values=True)
    fixed = [
        (k, v[len("CERT_") :].lower() if k == "ssl_cert_reqs" and v.upper().startswith("CERT_") else v)
        for k, v in query
    ]
    return parts._replace(query=urlencode(fixed)).geturl() if fixed else parts.geturl()


# -- errors -----------------------------------------------------------------------------------------------


def classify(exc: BaseException, target: RedisTarget) -> BrokerError:
    """Name the failure; the message shows the broker as host:port/db and never a password."""
    where = target.display

    def error(kind: ErrorKind, what: str) -> BrokerError:
        detail = target.scrub(first_line(exc))
        return BrokerError(kind, f"{what} {where}: {detail}" if detail else f"{what} {where}")

    if isinstance(exc, BrokerError):
        return BrokerError(exc.kind, target.scrub(exc.message))
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthenticationWrongNumberOfArgsError | rexc.NoPermissionError):
        return error(ErrorKind.AUTH_FAILED, "authentication failed on")
    if isinstance(exc, rexc.ResponseError) and str(exc).startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
        return error(ErrorKind.AUTH_FAILED, "authentication failed on")
    if isinstance(exc, rexc.TimeoutError | asyncio.TimeoutError | TimeoutError):
        return error(ErrorKind.TIMEOUT, "no answer in time from")
    if isinstance(exc, ssl.SSLError):
        return error(ErrorKind.UNREACHABLE, "TLS handshake failed with")
    if isinstance(exc, rexc.ConnectionError | OSError):
        return error(ErrorKind.UNREACHABLE, "cannot reach")
    if isinstance(exc, rexc.ResponseError):
        return error(ErrorKind.RESPONSE_ERROR, "error reply from")
    if isinstance(exc, rexc.InvalidResponse | UnicodeDecodeError):
        # Whatever answered is not Redis: what it said (a banner, a page) is not ours to publish.
        return BrokerError(ErrorKind.RESPONSE_ERROR, f"the server at {where} does not answer as Redis does")
    if isinstance(exc, ValueError):
        return error(ErrorKind.INVALID_URL, "cannot use the broker URL for")
    return error(ErrorKind.RESPONSE_ERROR, "unexpected failure reading")


# What of a server's own words may reach a status, an Event or a log line: one line, printable ASCII.
FIRST_LINE_CHARS = 160


def first_line(exc: BaseException) -> str:
    """The error's first line, bounded and with anything unprintable replaced (it may come from the peer)."""
    text = str(exc)[: FIRST_LINE_CHARS * 4].strip().splitlines()
    if not text:
        return type(exc).__name__
    line = "".join(c if " " <= c <= "~" else "?" for c in text[0][:FIRST_LINE_CHARS])
    return line + ("..." if len(text[0]) > FIRST_LINE_CHARS else "")
