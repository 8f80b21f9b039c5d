# Over 500 lines, half of it the Lua poll script and its notes; script, parser, client could split.
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

Routing keys map to queues as kombu routes them (:mod:`celery_fleet.brokers.routing`: equality for
direct exchanges, kombu's word rules for topic ones, every bound queue for fanout ones, nowhere
without a binding), never with a regex taken from Redis. What the script sends back is bounded
(:class:`ReplyBounds`), and a big reply is parsed in a worker thread, off the event loop.

The I/O is a single injected coroutine ``RoundTrip(commands) -> replies``; everything else here is
pure and unit-tested without Redis. :func:`connect` builds the real one on ``redis.asyncio``.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import ssl
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final
from urllib.parse import SplitResult, parse_qsl, quote, urlencode, urlsplit

import redis.asyncio as aioredis
import redis.asyncio.sentinel as aioredis_sentinel
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from celery_fleet.api.broker_url import BrokerUrlError, parse_broker_url
from celery_fleet.brokers import routing
from celery_fleet.brokers.layout import unconfigured_lists
from celery_fleet.brokers.source import (
    BrokerError,
    DepthReading,
    ErrorKind,
    KeyLayout,
    QueueRef,
    UnackedSummary,
)
from celery_fleet.planning.redact import redact_urls

BINDING_KEY_PREFIX: Final = "_kombu.binding."
# The smallest Redis ACL the operator's reads need (docs/install.md shows it; a test runs as it):
# read-only keys, no channels, and only the read-only script call plus what the scripts run.
# SELECT is for brokers on a database other than 0. No CLIENT SETNAME / SETINFO, no EVAL.
READER_ACL: Final = "on resetkeys %R~* resetchannels -@all +eval_ro +llen +hlen +hscan +scard +smembers +scan +select"
DEFAULT_SCAN_LIMIT: Final = 5_000  # ~6 µs of Redis time per 1 KB entry: ~30 ms at the limit


@dataclass(frozen=True)
class ReplyBounds:
    """What one poll may carry back from a user's Redis, whatever that Redis holds.

    Worst case about ``max_exchanges * max_bindings * max_member_bytes`` (4 MiB) of binding
    members plus ``max_routes`` short strings; in practice a few hundred bytes.
    """

    max_routes: int = 512  # distinct (exchange, routing key) pairs in flight; beyond: unattributed
    max_exchanges: int = 16  # binding tables read; entries of other exchanges are unattributed
    max_bindings: int = 256  # members per binding table; a bigger table is not read
    max_member_bytes: int = 1024  # longer binding members are skipped
    max_name_bytes: int = 255  # longer exchange names / routing keys are unattributed


BOUNDS: Final = ReplyBounds()
# Lists per EVAL: Redis runs a script without serving anyone else, so one poll of a huge fleet is
# cut into several EVALs (still one round trip) instead of one long stall of the user's Redis.
MAX_KEYS_PER_EVAL: Final = 1024
# Replies bigger than this (pairs + binding members) are parsed in a worker thread.
PARSE_OFF_LOOP_ITEMS: Final = 2_000

Command = tuple[str | int, ...]
Reply = object
RoundTrip = Callable[[Sequence[Command]], Awaitable[list[Reply]]]

# KEYS[1..n-1] = priority lists, KEYS[n] = the unacked hash; ARGV = scan limit (-1: no unacked
# hash, kombu's ack_emulation is off), binding-table key prefix, then the ReplyBounds in order.
# Returns {{LLEN or error per list}, hlen, scanned, unparsed, {exchange, routing_key, count, ...},
# {exchange, {members} or SCARD when the table is too big, ...}}.
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
local limit, bprefix = tonumber(ARGV[1]), ARGV[2]
local max_routes, max_exchanges, max_bindings = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local max_member, max_name = tonumber(ARGV[6]), tonumber(ARGV[7])
local lengths = {}
for i = 1, lists do
  -- pcall: a name taken by a non-list key fails that queue only (the error goes back in place).
  lengths[i] = redis.pcall('LLEN', KEYS[i])
end
if limit < 0 then return {lengths, 0, 0, 0, {}, {}} end
local size = redis.call('HLEN', unacked)
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
      if ex and #ex <= max_name and #rk <= max_name then
        local key = ex .. '\0' .. rk
        if counts[key] == nil and #order < max_routes then
          counts[key] = 0
          order[#order + 1] = {ex, rk, key}
        end
        if counts[key] == nil then
          unparsed = unparsed + 1
        else
          counts[key] = counts[key] + 1
        end
      else
        unparsed = unparsed + 1
      end
      scanned = scanned + 1
    end
  until cursor == '0' or scanned >= limit
end
local pairs_out, seen, bindings, tables = {}, {}, {}, 0
for _, item in ipairs(order) do
  pairs_out[#pairs_out + 1] = item[1]
  pairs_out[#pairs_out + 1] = item[2]
  pairs_out[#pairs_out + 1] = counts[item[3]]
  if item[1] ~= '' and not seen[item[1]] and tables < max_exchanges then
    seen[item[1]] = true
    tables = tables + 1
    local key = bprefix .. item[1]
    local n = redis.call('SCARD', key)
    bindings[#bindings + 1] = item[1]
    if n > max_bindings then
      bindings[#bindings + 1] = n
    else
      local kept = {}
      for _, member in ipairs(redis.call('SMEMBERS', key)) do
        if #member <= max_member then kept[#kept + 1] = member end
      end
      bindings[#bindings + 1] = kept
    end
  end
end
return {lengths, size, scanned, unparsed, pairs_out, bindings}
"""


# ARGV = cursor, MATCH pattern ('' for none), COUNT, max key length. Returns {cursor, {keys}}: one
# SCAN page of list keys, names longer than the bound left out (the reply stays bounded).
SCAN_SCRIPT: Final = r"""
local args = {'SCAN', ARGV[1]}
if ARGV[2] ~= '' then args[#args + 1] = 'MATCH'; args[#args + 1] = ARGV[2] end
args[#args + 1] = 'COUNT'; args[#args + 1] = ARGV[3]; args[#args + 1] = 'TYPE'; args[#args + 1] = 'list'
local page = redis.call(unpack(args))
local keys, max = {}, tonumber(ARGV[4])
for _, k in ipairs(page[2]) do
  if #k <= max then keys[#keys + 1] = k end
end
return {page[1], keys}
"""
LAYOUT_SCAN_PAGES: Final = 10  # SCAN pages (COUNT 1000) per check; a bigger keyspace takes several checks


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


# -- keys -----------------------------------------------------------------------------------------------


def priority_key(ref: QueueRef, step: int) -> str:
    """The Redis list holding ``ref``'s messages of one priority step (kombu's ``_q_for_pri``)."""
    name = ref.name if step == 0 else f"{ref.name}{ref.sep}{step}"
    return ref.keyprefix + name


def unacked_key(layout: KeyLayout) -> str:
    return layout.keyprefix + layout.unacked_key


# -- one poll: the commands, then the replies -------------------------------------------------------


@dataclass(frozen=True)
class PollPlan:
    """The commands of one poll (one EVAL per key layout) and which reply answers what."""

    commands: tuple[Command, ...]
    # (layout, ((queue, step), ...), whether this EVAL reads the unacked hash): one per command.
    batches: tuple[tuple[KeyLayout, tuple[tuple[QueueRef, int], ...], bool], ...]


def plan_poll(
    refs: Collection[QueueRef],
    scan_limit: int = DEFAULT_SCAN_LIMIT,
    skip_scan: Collection[KeyLayout] = (),
    bounds: ReplyBounds = BOUNDS,
    max_keys: int = MAX_KEYS_PER_EVAL,
) -> PollPlan:
    """One EVAL per key layout (per ``max_keys`` lists); ``skip_scan`` layouts get scan limit 0 (HLEN only)."""
    ordered = sorted(set(refs))
    batches: list[tuple[KeyLayout, tuple[tuple[QueueRef, int], ...], bool]] = []
    for p in sorted({r.layout for r in ordered}):
        steps = [(r, s) for r in ordered if r.layout == p for s in r.priority_steps]
        for start in range(0, len(steps), max_keys):
            batches.append((p, tuple(steps[start : start + max_keys]), start == 0))
    commands: list[Command] = []
    limits = (bounds.max_routes, bounds.max_exchanges, bounds.max_bindings, bounds.max_member_bytes)
    for p, lists, scans in batches:
        keys = [priority_key(r, s) for r, s in lists] + [unacked_key(p)]
        limit = -1 if not (scans and p.ack_emulation) else 0 if p in skip_scan else scan_limit
        binding_prefix = p.keyprefix + BINDING_KEY_PREFIX
        commands.append(("EVAL", POLL_SCRIPT, len(keys), *keys, limit, binding_prefix, *limits, bounds.max_name_bytes))
    return PollPlan(tuple(commands), tuple(batches))


def reply_items(replies: Sequence[Reply]) -> int:
    """How much parsing a poll's replies need (pairs and binding members), to keep big ones off the loop."""
    items = 0
    for reply in replies:
        if isinstance(reply, list) and len(reply) == 6:
            pairs, bindings = reply[4], reply[5]
            items += len(pairs) if isinstance(pairs, list) else 0
            if isinstance(bindings, list):
                items += sum(len(b) for b in bindings[1::2] if isinstance(b, list))
    return items


def parse_poll(plan: PollPlan, replies: Sequence[Reply], *, duration_seconds: float = 0.0) -> DepthReading:
    """Build the reading from the replies (an exception object stands for a command's error)."""
    if len(replies) != len(plan.commands):
        raise BrokerError(
            ErrorKind.RESPONSE_ERROR, f"expected {len(plan.commands)} replies in the round trip, got {len(replies)}"
        )
    queued: dict[QueueRef, dict[int, int]] = defaultdict(dict)
    queue_errors: dict[QueueRef, str] = {}
    in_flight: Counter[tuple[KeyLayout, str]] = Counter()
    routes: Counter[tuple[KeyLayout, frozenset[str]]] = Counter()
    unacked: dict[KeyLayout, UnackedSummary] = {}
    for (layout, lists, scans), reply in zip(plan.batches, replies, strict=True):
        if isinstance(reply, BaseException):
            auth = _auth_error(reply)
            if auth is not None:
                raise auth
            why = _first_line(reply)
            queue_errors.update((r, why) for r, _ in lists)
            unacked[layout] = UnackedSummary(0, 0, error=why)
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
        if not scans:
            continue  # a later chunk of a big layout: lengths only
        try:
            summary, counts = _parse_inflight(reply[1:], layout)
        except (TypeError, ValueError, IndexError) as exc:
            unacked[layout] = UnackedSummary(0, 0, error=f"unexpected in-flight reply ({exc})")
            continue
        unacked.setdefault(layout, summary)  # an error of another chunk stays
        watched = {r.name for lay, lists_, _ in plan.batches if lay == layout for r, _ in lists_}
        for queues, n in counts.items():
            mine = queues & watched
            if mine:
                routes[(layout, frozenset(mine))] += n
                for queue in mine:
                    in_flight[(layout, queue)] += n
    for ref in queue_errors:
        queued.pop(ref, None)
    return DepthReading(
        queued={r: dict(s) for r, s in queued.items()},
        in_flight=dict(in_flight),
        unacked=unacked,
        duration_seconds=duration_seconds,
        queue_errors=queue_errors,
        in_flight_routes=dict(routes),
    )


def _parse_inflight(reply: Sequence[Reply], layout: KeyLayout) -> tuple[UnackedSummary, dict[frozenset[str], int]]:
    """Unacked counts per set of queues kombu routes them to (a delivery tag counts once per set)."""
    size, scanned, unparsed, flat_pairs, flat_bindings = reply
    if not isinstance(flat_pairs, list) or not isinstance(flat_bindings, list):
        raise ValueError("expected lists of pairs and bindings")
    size, scanned, unparsed = _int(size), _int(scanned), _int(unparsed)
    tables: dict[str, list[routing.Binding]] = {}
    direct: dict[str, Mapping[str, frozenset[str]] | None] = {}
    for i in range(0, len(flat_bindings), 2):
        exchange, members = _text(flat_bindings[i]), flat_bindings[i + 1]
        if not isinstance(members, list):
            continue  # too many bindings to read: its messages stay unattributed
        table = [b for b in (routing.parse_binding(_text(m), layout.sep) for m in members) if b is not None]
        tables[exchange] = table
        direct[exchange] = routing.route_table(exchange, table, layout.fanout_exchanges)
    counts: Counter[frozenset[str]] = Counter()
    unattributed = unparsed
    for i in range(0, len(flat_pairs), 3):
        exchange, routing_key, n = _text(flat_pairs[i]), _text(flat_pairs[i + 1]), _int(flat_pairs[i + 2])
        if exchange and exchange not in tables:
            unattributed += n  # its binding table was not read (bounds)
            continue
        lookup = direct.get(exchange)
        if lookup is not None:
            queues = lookup.get(routing_key, frozenset())
        else:
            queues = routing.route(exchange, routing_key, tables.get(exchange, []), layout.fanout_exchanges)
        if not queues:
            unattributed += n  # kombu would deliver (and restore) it nowhere
            continue
        counts[queues] += n
    if scanned and scanned < size:
        # Scan limit hit: scale the sample up to the whole hash (HSCAN order is unrelated to queues).
        factor = size / scanned
        counts = Counter({q: math.ceil(n * factor) for q, n in counts.items()})
    return UnackedSummary(size=size, scanned=scanned, unattributed=unattributed), dict(counts)


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
    routes: Mapping[frozenset[str], int]  # queues -> in flight (each delivery tag once)
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
        self._scans: dict[KeyLayout, _Scan] = {}
        self._next_scan_at = 0.0
        self._plans: dict[tuple[frozenset[QueueRef], frozenset[KeyLayout]], PollPlan] = {}
        self._layout_cursor = 0
        self._read_only_scripts = True
        self._layout_found: dict[QueueRef, set[str]] = {}
        self._layout_seen: dict[QueueRef, set[str]] = {}

    def __repr__(self) -> str:
        return f"RedisDepthSource({self.target.display})"

    async def read(self, refs: Collection[QueueRef]) -> DepthReading:
        started = self._clock()
        names: dict[KeyLayout, set[str]] = defaultdict(set)
        for r in refs:
            names[r.layout].add(r.name)
        skip = {
            p
            for p, queues in names.items()
            if started < self._next_scan_at and p in self._scans and queues <= self._scans[p].watched
        }
        plan = self._plan(frozenset(refs), frozenset(skip))
        try:
            # The socket timeouts bound each connect/read; this bounds the whole poll (DNS included).
            replies = await self._scripts(plan.commands)
            took = self._clock() - started
            if reply_items(replies) > PARSE_OFF_LOOP_ITEMS:
                # Routing thousands of in-flight pairs is CPU work: keep it off the event loop.
                reading = await asyncio.to_thread(parse_poll, plan, replies, duration_seconds=took)
            else:
                reading = parse_poll(plan, replies, duration_seconds=took)
        except Exception as exc:
            raise classify(exc, self.target) from None
        return self._account(reading, names, skip, started)

    async def _scripts(self, commands: Sequence[Command]) -> list[Reply]:
        """Run the (read-only) scripts as EVAL_RO, so an ACL user needs no EVAL; EVAL on Redis < 7."""
        if self._read_only_scripts:
            ro = [("EVAL_RO", *c[1:]) if c[0] == "EVAL" else c for c in commands]
            replies = await asyncio.wait_for(self._round_trip(ro), self.deadline_seconds)
            unknown = [r for r in replies if isinstance(r, BaseException) and "unknown command" in str(r).lower()]
            if not unknown:
                return replies
            self._read_only_scripts = False  # Redis 6: no EVAL_RO
        return await asyncio.wait_for(self._round_trip(commands), self.deadline_seconds)

    def _plan(self, refs: frozenset[QueueRef], skip: frozenset[KeyLayout]) -> PollPlan:
        # Polls repeat the same queues: keep the plans (building one for 300 queues costs ~3 ms).
        plan = self._plans.get((refs, skip))
        if plan is None:
            if len(self._plans) >= 4:  # queues changed: forget the old ones
                self._plans.clear()
            plan = self._plans[(refs, skip)] = plan_poll(refs, self.scan_limit, skip)
        return plan

    def _account(
        self, reading: DepthReading, names: Mapping[KeyLayout, set[str]], skip: set[KeyLayout], started: float
    ) -> DepthReading:
        unacked = dict(reading.unacked)
        in_flight = dict(reading.in_flight)
        routes = dict(reading.in_flight_routes)
        for p, queues in names.items():
            if p in skip:
                cached = self._scans[p]
                unacked[p] = replace(cached.summary, age_seconds=started - cached.at)
                in_flight.update({(p, q): n for q, n in cached.counts.items() if q in queues})
                for qs, n in cached.routes.items():
                    mine = qs & queues
                    if mine:
                        routes[(p, mine)] = routes.get((p, mine), 0) + n
            elif unacked[p].error is None:
                counts = {q: n for (pp, q), n in reading.in_flight.items() if pp == p}
                mine_routes = {qs: n for (pp, qs), n in reading.in_flight_routes.items() if pp == p}
                self._scans[p] = _Scan(unacked[p], counts, mine_routes, frozenset(queues), started)
        if len(skip) < len(names) and self.inflight_budget > 0:
            self._next_scan_at = started + reading.duration_seconds / self.inflight_budget
        return replace(reading, unacked=unacked, in_flight=in_flight, in_flight_routes=routes)

    async def check_layout(
        self, refs: Collection[QueueRef], *, pages: int = LAYOUT_SCAN_PAGES
    ) -> dict[QueueRef, list[str]]:
        """Unconfigured priority-like lists of ``refs`` (see :mod:`~celery_fleet.brokers.layout`).

        A bounded SCAN (``pages`` pages) continuing where the last check stopped; the answer is what
        the last full pass over the keyspace found, plus anything found since. Raises BrokerError.
        """
        prefixes = {r.keyprefix for r in refs}
        match = glob_escape(next(iter(prefixes))) + "*" if len(prefixes) == 1 and "" not in prefixes else ""
        keys: list[str] = []
        try:
            for _ in range(pages):
                command = ("EVAL", SCAN_SCRIPT, 0, self._layout_cursor, match, 1000, 512)
                (reply,) = await self._scripts([command])
                if isinstance(reply, BaseException):
                    raise reply
                if not isinstance(reply, list) or len(reply) != 2 or not isinstance(reply[1], list):
                    raise BrokerError(ErrorKind.RESPONSE_ERROR, "unexpected reply to the layout scan")
                self._layout_cursor = int(_text(reply[0]))
                keys += [_text(k) for k in reply[1]]
                if self._layout_cursor == 0:
                    break
        except Exception as exc:
            raise classify(exc, self.target) from None
        for ref, names in unconfigured_lists(keys, refs).items():
            self._layout_found.setdefault(ref, set()).update(names)
        answer = {r: sorted(self._layout_seen.get(r, set()) | self._layout_found.get(r, set())) for r in refs}
        if self._layout_cursor == 0:  # a full pass ended: it is the new truth
            self._layout_seen, self._layout_found = self._layout_found, {}
        return {r: names for r, names in answer.items() if names}

    async def aclose(self) -> None:
        if self._close is not None:
            await self._close()


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

    async def round_trip(self, commands: Sequence[Command]) -> list[Reply]:
        for attempt in range(len(self.clients)):
            client = self.clients[self.current]
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for command in commands:
                        pipe.execute_command(*command)
                    replies: list[Reply] = await pipe.execute(raise_on_error=False)
                    return replies
            except (rexc.ConnectionError, rexc.TimeoutError, OSError):
                if attempt == len(self.clients) - 1:
                    raise
                self.current = (self.current + 1) % len(self.clients)
        raise AssertionError("unreachable")  # pragma: no cover

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


def queued_by_priority(reading: DepthReading) -> Mapping[tuple[str, int], int]:
    """Depth per (queue, priority step), summed over key prefixes: what the queue-depth metric shows."""
    out: Counter[tuple[str, int]] = Counter()
    for ref, steps in reading.queued.items():
        for step, n in steps.items():
            out[(ref.name, step)] += n
    return dict(out)
