"""Queue depth and in-flight work from a Redis broker, the way kombu's Redis transport lays them out.

One poll is ONE round trip carrying one ``EVAL`` of :data:`POLL_SCRIPT` per key prefix (almost
always exactly one command), which runs inside Redis:

* ``LLEN`` of every priority list of every queue: step 0 is the bare queue name, step ``s`` is
  ``queue + "\x06\x16" + str(s)``; ``global_keyprefix`` prefixes every key. Done server-side
  because redis-py's asyncio pipeline spends ~50 µs of operator CPU per reply: 1,200 LLEN replies
  (100 pools x 3 tiers x 4 steps) cost ~65 ms per poll as a pipeline, ~2 ms as one array reply.
* the in-flight count: a walk over the prefix's ``unacked`` hash (values are JSON
  ``[payload, exchange, routing_key]``) that returns only counts per (exchange, routing key), plus
  the binding tables (``_kombu.binding.<exchange>``) of the exchanges it saw. Payloads never cross
  the network. The walk stops after ``scan_limit`` entries; beyond that the counts are scaled up
  to the hash size and flagged approximate (``UnackedSummary.exact``). Cost: see
  ``bench/results/redis_depth.md``.

``EVAL`` rather than ``EVALSHA``: Redis caches the compiled script by its SHA anyway, and ``EVALSHA``
would need a NOSCRIPT retry (a second round trip after every Redis restart). The script only reads.

Routing keys map to queues as kombu does on restore (``Channel._lookup``): an empty exchange
means routing key == queue; otherwise the exchange's binding table is searched (exact routing key,
or the stored regex for topic exchanges). Without a binding table the routing key is taken as the
queue name, which is Celery's default (direct exchange named after the queue, routing key == name).

The I/O is a single injected coroutine ``RoundTrip(commands) -> replies``; everything else here is
pure and unit-tested without Redis. :func:`connect` builds the real one on ``redis.asyncio``.
"""

from __future__ import annotations

import asyncio
import math
import re
import ssl
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Final
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlencode, urlsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from celery_fleet.brokers.source import (
    BrokerError,
    DepthReading,
    ErrorKind,
    QueueRef,
    UnackedSummary,
)

SEP: Final = "\x06\x16"  # kombu.transport.redis.Channel.sep
UNACKED_KEY: Final = "unacked"
BINDING_KEY_PREFIX: Final = "_kombu.binding."
DEFAULT_SCAN_LIMIT: Final = 5_000  # ~6 µs of Redis time per 1 KB entry: ~30 ms at the limit

Command = tuple[str | int, ...]
Reply = object
RoundTrip = Callable[[Sequence[Command]], Awaitable[list[Reply]]]

# KEYS[1..n-1] = priority lists, KEYS[n] = the unacked hash; ARGV[1] = scan limit, ARGV[2] = the
# binding-table key prefix. Returns {{LLEN or error per list}, hlen, scanned, unparsed,
# {exchange, routing_key, count, ...}, {exchange, {members}, ...}}.
# The exchange and routing key are the last two JSON strings of each value: they are located by
# walking back from the end, so the payload (often kilobytes) is never decoded or pattern-matched
# (an unanchored string.match costs ~8x more); cjson handles what the walk cannot (escapes).
POLL_SCRIPT: Final = r"""
local function tail_strings(v)
  local j = #v - 1
  if string.byte(v, j + 1) ~= 93 or string.byte(v, j) ~= 34 then return nil end
  local k = j - 1
  while k > 0 and string.byte(v, k) ~= 34 do k = k - 1 end
  local m = k - 1
  while m > 0 and (string.byte(v, m) == 32 or string.byte(v, m) == 44) do m = m - 1 end
  if m < 1 or string.byte(v, m) ~= 34 then return nil end
  local q = m - 1
  while q > 0 and string.byte(v, q) ~= 34 do q = q - 1 end
  if q < 1 or string.byte(v, q - 1) == 92 or string.byte(v, k - 1) == 92 then return nil end
  local ex, rk = string.sub(v, q + 1, m - 1), string.sub(v, k + 1, j - 1)
  if string.find(ex, '\\', 1, true) or string.find(rk, '\\', 1, true) then return nil end
  return ex, rk
end
local lists, unacked = #KEYS - 1, KEYS[#KEYS]
local lengths = {}
for i = 1, lists do
  -- pcall: a name taken by a non-list key fails that queue only (the error goes back in place).
  lengths[i] = redis.pcall('LLEN', KEYS[i])
end
local size = redis.call('HLEN', unacked)
local limit = tonumber(ARGV[1])
local counts, order = {}, {}
local scanned, unparsed = 0, 0
if size > 0 and limit > 0 then
  local cursor = '0'
  repeat
    local page = redis.call('HSCAN', unacked, cursor, 'COUNT', 500)
    cursor = page[1]
    local entries = page[2]
    for i = 2, #entries, 2 do
      local value = entries[i]
      local ex, rk = tail_strings(value)
      if not ex then
        local ok, decoded = pcall(cjson.decode, value)
        if ok and type(decoded) == 'table' and type(decoded[2]) == 'string' and type(decoded[3]) == 'string' then
          ex, rk = decoded[2], decoded[3]
        end
      end
      if ex then
        local key = ex .. '\0' .. rk
        if counts[key] == nil then
          counts[key] = 0
          order[#order + 1] = {ex, rk, key}
        end
        counts[key] = counts[key] + 1
      else
        unparsed = unparsed + 1
      end
      scanned = scanned + 1
    end
  until cursor == '0' or scanned >= limit
end
local pairs_out, seen, bindings = {}, {}, {}
for _, item in ipairs(order) do
  pairs_out[#pairs_out + 1] = item[1]
  pairs_out[#pairs_out + 1] = item[2]
  pairs_out[#pairs_out + 1] = counts[item[3]]
  if item[1] ~= '' and not seen[item[1]] then
    seen[item[1]] = true
    bindings[#bindings + 1] = item[1]
    bindings[#bindings + 1] = redis.call('SMEMBERS', ARGV[2] .. item[1])
  end
end
return {lengths, size, scanned, unparsed, pairs_out, bindings}
"""


# -- keys -----------------------------------------------------------------------------------------------


def priority_key(ref: QueueRef, step: int) -> str:
    """The Redis list holding ``ref``'s messages of one priority step (kombu's ``_q_for_pri``)."""
    name = ref.name if step == 0 else f"{ref.name}{SEP}{step}"
    return ref.keyprefix + name


def unacked_key(keyprefix: str) -> str:
    return keyprefix + UNACKED_KEY


# -- one poll: the commands, then the replies -------------------------------------------------------


@dataclass(frozen=True)
class PollPlan:
    """The commands of one poll (one EVAL per key prefix) and which reply answers what."""

    commands: tuple[Command, ...]
    batches: tuple[tuple[str, tuple[tuple[QueueRef, int], ...]], ...]  # (prefix, ((queue, step), ...))


def plan_poll(
    refs: Collection[QueueRef], scan_limit: int = DEFAULT_SCAN_LIMIT, skip_scan: Collection[str] = ()
) -> PollPlan:
    """One EVAL per key prefix; prefixes in ``skip_scan`` get scan limit 0 (lengths and HLEN only)."""
    ordered = sorted(set(refs))
    prefixes = sorted({r.keyprefix for r in ordered})
    batches = tuple((p, tuple((r, s) for r in ordered if r.keyprefix == p for s in r.priority_steps)) for p in prefixes)
    commands: list[Command] = []
    for p, lists in batches:
        keys = [priority_key(r, s) for r, s in lists] + [unacked_key(p)]
        limit = 0 if p in skip_scan else scan_limit
        commands.append(("EVAL", POLL_SCRIPT, len(keys), *keys, limit, p + BINDING_KEY_PREFIX))
    return PollPlan(tuple(commands), batches)


def parse_poll(plan: PollPlan, replies: Sequence[Reply], *, duration_seconds: float = 0.0) -> DepthReading:
    """Build the reading from the replies (an exception object stands for a command's error)."""
    if len(replies) != len(plan.commands):
        raise BrokerError(
            ErrorKind.RESPONSE_ERROR, f"expected {len(plan.commands)} replies in the round trip, got {len(replies)}"
        )
    queued: dict[QueueRef, dict[int, int]] = defaultdict(dict)
    queue_errors: dict[QueueRef, str] = {}
    in_flight: Counter[tuple[str, str]] = Counter()
    unacked: dict[str, UnackedSummary] = {}
    for (prefix, lists), reply in zip(plan.batches, replies, strict=True):
        if isinstance(reply, BaseException):
            auth = _auth_error(reply)
            if auth is not None:
                raise auth
            why = _first_line(reply)
            queue_errors.update((r, why) for r, _ in lists)
            unacked[prefix] = UnackedSummary(0, 0, error=why)
            continue
        if not isinstance(reply, list) or len(reply) != 6 or not isinstance(reply[0], list):
            raise BrokerError(ErrorKind.RESPONSE_ERROR, "unexpected reply to the poll script")
        lengths = reply[0]
        if len(lengths) != len(lists):
            raise BrokerError(ErrorKind.RESPONSE_ERROR, f"expected {len(lists)} list lengths, got {len(lengths)}")
        for (ref, step), n in zip(lists, lengths, strict=True):
            if isinstance(n, BaseException):
                queue_errors[ref] = _first_line(n)
            elif isinstance(n, int):
                queued[ref][step] = n
            else:
                queue_errors[ref] = f"LLEN answered {type(n).__name__}, not an integer"
        try:
            summary, counts = _parse_inflight(reply[1:])
        except (TypeError, ValueError, IndexError) as exc:
            unacked[prefix] = UnackedSummary(0, 0, error=f"unexpected in-flight reply ({exc})")
            continue
        unacked[prefix] = summary
        watched = {r.name for r, _ in lists}
        for queue, n in counts.items():
            if queue in watched:
                in_flight[(prefix, queue)] += n
    for ref in queue_errors:
        queued.pop(ref, None)
    return DepthReading(
        queued={r: dict(s) for r, s in queued.items()},
        in_flight=dict(in_flight),
        unacked=unacked,
        duration_seconds=duration_seconds,
        queue_errors=queue_errors,
    )


def _parse_inflight(reply: Sequence[Reply]) -> tuple[UnackedSummary, dict[str, int]]:
    size, scanned, unparsed, flat_pairs, flat_bindings = reply
    if not isinstance(flat_pairs, list) or not isinstance(flat_bindings, list):
        raise ValueError("expected lists of pairs and bindings")
    size, scanned, unparsed = _int(size), _int(scanned), _int(unparsed)
    bindings: dict[str, list[tuple[str, str, str]]] = {}
    for i in range(0, len(flat_bindings), 2):
        exchange = _text(flat_bindings[i])
        bindings[exchange] = [m for m in (_binding(raw) for raw in flat_bindings[i + 1]) if m is not None]
    counts: Counter[str] = Counter()
    unattributed = unparsed
    for i in range(0, len(flat_pairs), 3):
        exchange, routing_key, n = _text(flat_pairs[i]), _text(flat_pairs[i + 1]), _int(flat_pairs[i + 2])
        queues = route(exchange, routing_key, bindings.get(exchange, []))
        if not queues:
            unattributed += n
        for q in queues:
            counts[q] += n
    if scanned and scanned < size:
        # Scan limit hit: scale the sample up to the whole hash (HSCAN order is unrelated to queues).
        factor = size / scanned
        counts = Counter({q: math.ceil(n * factor) for q, n in counts.items()})
    return UnackedSummary(size=size, scanned=scanned, unattributed=unattributed), dict(counts)


def route(exchange: str, routing_key: str, table: Sequence[tuple[str, str, str]]) -> list[str]:
    """The queues a message of (exchange, routing key) came from, as kombu would restore it."""
    if not exchange:
        return [routing_key] if routing_key else []
    matched = sorted(
        {
            queue
            for rk, pattern, queue in table
            if (_regex(pattern).match(routing_key) if pattern else rk == routing_key)
        }
    )
    if matched:
        return matched
    # No binding table (or no match): Celery's default is a direct exchange where routing key == queue.
    return [routing_key] if routing_key else []


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error:
        return re.compile(r"(?!)")  # an unreadable binding matches nothing


def _binding(raw: object) -> tuple[str, str, str] | None:
    parts = _text(raw).split(SEP)
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None


def _int(value: object) -> int:
    if isinstance(value, int):
        return value
    raise ValueError(f"expected an integer, got {type(value).__name__}")


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _auth_error(exc: BaseException) -> BrokerError | None:
    if isinstance(exc, rexc.NoPermissionError) or str(exc).startswith(("NOPERM", "NOAUTH", "WRONGPASS")):
        return BrokerError(ErrorKind.AUTH_FAILED, _first_line(exc))
    return None


# -- the broker URL: safe to show, safe to connect with -------------------------------------------------


@dataclass(frozen=True)
class RedisTarget:
    """A parsed broker URL. ``display`` ("host:port/db", " (TLS)" for rediss) is what may be shown."""

    url: str = ""
    display: str = ""
    secrets: tuple[str, ...] = ()  # strings that must never appear in a message

    def __repr__(self) -> str:  # never print the URL, even in a traceback
        return f"RedisTarget({self.display})"

    __str__ = __repr__

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise BrokerError(ErrorKind.INVALID_URL, "the broker URL cannot be parsed") from None
        if parts.scheme not in ("redis", "rediss"):
            raise BrokerError(ErrorKind.INVALID_URL, f"unsupported scheme {parts.scheme!r}: use redis:// or rediss://")
        secrets = tuple(s for s in {parts.password or "", unquote(parts.password or "")} if s)
        query = parse_qsl(parts.query, keep_blank_values=True)
        secrets += tuple(v for k, v in query if k == "password" and v)
        db = parts.path.lstrip("/") or "0"
        if not db.isdigit():
            # redis-py would quietly read db 0 while kombu refuses to start the workers. The path
            # is not echoed: it is user input and may hold anything.
            raise BrokerError(ErrorKind.INVALID_URL, "the database in the broker URL path must be a number (e.g. /0)")
        # Not URL-shaped on purpose: Events and status drop anything that looks like a URL.
        tls = " (TLS)" if parts.scheme == "rediss" else ""
        display = f"{parts.hostname or 'localhost'}:{port or 6379}/{db}{tls}"
        return cls(url=_normalize_query(parts, query), display=display, secrets=secrets)

    def scrub(self, text: str) -> str:
        for s in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(s, "***").replace(quote(s, safe=""), "***")
        return re.sub(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+", "<broker-url>", text)


def _normalize_query(parts: SplitResult, query: list[tuple[str, str]]) -> str:
    # Celery writes ssl_cert_reqs=CERT_REQUIRED; redis-py wants required/optional/none.
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
        detail = target.scrub(_first_line(exc))
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
    if isinstance(exc, ValueError):
        return error(ErrorKind.INVALID_URL, "cannot use the broker URL for")
    return error(ErrorKind.RESPONSE_ERROR, "unexpected failure reading")


# -- the source -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scan:
    """The last in-flight count of one key prefix, reused while the scan budget recovers."""

    summary: UnackedSummary
    counts: Mapping[str, int]  # queue -> in flight, for `watched`
    watched: frozenset[str]
    at: float


class RedisDepthSource:
    """A :class:`~celery_fleet.brokers.source.QueueDepthSource` over one Redis broker.

    Queue lengths are read on every poll. The ``unacked`` walk costs Redis ~10 µs per entry, so it
    is held to ``inflight_budget`` of Redis' time: after a walk that took d seconds the next one
    runs no sooner than d / inflight_budget later; polls in between reuse the last counts (their
    ``UnackedSummary.age_seconds`` says how old). With ~1,000 entries (~10 ms) that is every poll
    at a 1 s interval; at the 5,000-entry scan limit (~55 ms) every ~3 s.
    """

    def __init__(
        self,
        round_trip: RoundTrip,
        target: RedisTarget,
        *,
        scan_limit: int = DEFAULT_SCAN_LIMIT,
        inflight_budget: float = 0.02,
        deadline_seconds: float = 3.0,
        close: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._round_trip = round_trip
        self.target = target
        self.scan_limit = scan_limit
        self.inflight_budget = inflight_budget
        self.deadline_seconds = deadline_seconds
        self._close = close
        self._clock = clock
        self._scans: dict[str, _Scan] = {}
        self._next_scan_at = 0.0
        self._plans: dict[tuple[frozenset[QueueRef], frozenset[str]], PollPlan] = {}

    def __repr__(self) -> str:
        return f"RedisDepthSource({self.target.display})"

    async def read(self, refs: Collection[QueueRef]) -> DepthReading:
        started = self._clock()
        names: dict[str, set[str]] = defaultdict(set)
        for r in refs:
            names[r.keyprefix].add(r.name)
        skip = {
            p
            for p, queues in names.items()
            if started < self._next_scan_at and p in self._scans and queues <= self._scans[p].watched
        }
        plan = self._plan(frozenset(refs), frozenset(skip))
        try:
            # The socket timeouts bound each connect/read; this bounds the whole poll (DNS included).
            replies = await asyncio.wait_for(self._round_trip(plan.commands), self.deadline_seconds)
            reading = parse_poll(plan, replies, duration_seconds=self._clock() - started)
        except Exception as exc:
            raise classify(exc, self.target) from None
        return self._account(reading, names, skip, started)

    def _plan(self, refs: frozenset[QueueRef], skip: frozenset[str]) -> PollPlan:
        # Polls repeat the same queues: keep the plans (building one for 300 queues costs ~3 ms).
        plan = self._plans.get((refs, skip))
        if plan is None:
            if len(self._plans) >= 4:  # queues changed: forget the old ones
                self._plans.clear()
            plan = self._plans[(refs, skip)] = plan_poll(refs, self.scan_limit, skip)
        return plan

    def _account(
        self, reading: DepthReading, names: Mapping[str, set[str]], skip: set[str], started: float
    ) -> DepthReading:
        unacked = dict(reading.unacked)
        in_flight = dict(reading.in_flight)
        for p, queues in names.items():
            if p in skip:
                cached = self._scans[p]
                unacked[p] = replace(cached.summary, age_seconds=started - cached.at)
                in_flight.update({(p, q): n for q, n in cached.counts.items() if q in queues})
            elif unacked[p].error is None:
                counts = {q: n for (pp, q), n in reading.in_flight.items() if pp == p}
                self._scans[p] = _Scan(unacked[p], counts, frozenset(queues), started)
        if len(skip) < len(names) and self.inflight_budget > 0:
            self._next_scan_at = started + reading.duration_seconds / self.inflight_budget
        return replace(reading, unacked=unacked, in_flight=in_flight)

    async def aclose(self) -> None:
        if self._close is not None:
            await self._close()


def connect(
    url: str,
    *,
    connect_timeout: float = 1.0,
    read_timeout: float = 2.0,
    scan_limit: int = DEFAULT_SCAN_LIMIT,
    inflight_budget: float = 0.02,
    client_name: str = "celery-fleet",
) -> RedisDepthSource:
    """A source on ``redis.asyncio`` (Kopf runs on asyncio; a sync client would stall its loop).

    TLS comes from the URL: ``rediss://`` plus redis-py's query options, e.g.
    ``?ssl_cert_reqs=required&ssl_ca_certs=/etc/redis-ca/ca.crt``. redis-py's own retries are off:
    the :class:`~celery_fleet.brokers.poller.BrokerPoller` owns reconnects and their backoff, so a
    dead broker costs one bounded timeout per attempt, not three.
    """
    target = RedisTarget.parse(url)
    try:
        client = aioredis.Redis.from_url(
            target.url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=read_timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            client_name=client_name,
            max_connections=4,
            health_check_interval=0,
        )
    except Exception as exc:
        raise classify(exc, target) from None

    async def round_trip(commands: Sequence[Command]) -> list[Reply]:
        async with client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            replies: list[Reply] = await pipe.execute(raise_on_error=False)
            return replies

    async def close() -> None:
        await client.aclose()  # type: ignore[attr-defined]  # types-redis 4.6 predates aclose (redis 5)

    return RedisDepthSource(
        round_trip,
        target,
        scan_limit=scan_limit,
        inflight_budget=inflight_budget,
        deadline_seconds=connect_timeout + 2 * read_timeout,
        close=close,
    )


def queued_by_priority(reading: DepthReading) -> Mapping[tuple[str, int], int]:
    """Depth per (queue, priority step), summed over key prefixes: what the queue-depth metric shows."""
    out: Counter[tuple[str, int]] = Counter()
    for ref, steps in reading.queued.items():
        for step, n in steps.items():
            out[(ref.name, step)] += n
    return dict(out)
