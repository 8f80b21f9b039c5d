"""What runs inside the user's Redis: the read-only Lua scripts, the bounds on what they send back,
and the smallest ACL they need. Nothing here does I/O."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

BINDING_KEY_PREFIX: Final = "_kombu.binding."
# The smallest Redis ACL the operator's reads need (docs/install.md shows it; a test runs as it):
# read-only keys, no channels, and only the read-only script call plus what the scripts run.
# SELECT is for brokers on a database other than 0. No CLIENT SETNAME / SETINFO, no EVAL.
READER_ACL: Final = (
    "on resetkeys %R~* resetchannels -@all +eval_ro +llen +hlen +hstrlen +hget +hscan +zcard +zrange +scard"
    " +smembers +zcount +time +scan +select"
)
DEFAULT_SCAN_LIMIT: Final = 5_000  # entries per EVAL at most; the WalkBudget usually stops it first


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


@dataclass(frozen=True)
class WalkBudget:
    """What one EVAL may spend walking ``unacked``: Redis serves nobody while it runs, and the cost
    is the bytes copied into Lua, not the number of entries. The walk stops at the first budget
    spent and the next poll goes on from there; what is skipped is counted, never dropped silently.
    """

    # A bigger value is sized (HSTRLEN), never read: "too large", unattributed. Celery messages of
    # 100 KB are ordinary; reading one costs Redis ~0.2-0.6 ms, so the time budget bounds their walk.
    max_value_bytes: int = 1024 * 1024
    max_bytes: int = 8 * 1024 * 1024  # value bytes read per EVAL
    max_micros: int = 5_000  # Redis time per EVAL: TIME is read every `check_every` entries or 128 KiB
    check_every: int = 8


WALK_BUDGET: Final = WalkBudget()

Command = tuple[str | int, ...]
Reply = object
RoundTrip = Callable[[Sequence[Command]], Awaitable[list[Reply]]]

# KEYS[1..n-2] = priority lists, KEYS[n-1] = the unacked hash, KEYS[n] = its index (the zset of
# delivery times). ARGV = entry limit (-1: no unacked hash, kombu's ack_emulation is off; 0: sizes
# only), binding-table key prefix, the ReplyBounds in order, the visibility timeout (seconds), the
# WalkBudget in order, then the rank in the index to start from.
# Returns {{LLEN or error per list}, hlen, walked, unparsed, {exchange, routing_key, count, stale,
# ...}, {exchange, {members} or SCARD when the table is too big, ...}, stale, next rank (0: the
# index was walked to its end), too large, ZCARD, value bytes read, why it stopped ('' | 'bytes' |
# 'time' | 'entries'), whether the ages are whole (1 | 0), {route number, delivery tag, age in ms,
# ...}}. The ages (issue 25: run times for a wait target) come only from a walk of the whole index
# in this EVAL, at most MAX_AGES entries with tags of at most MAX_TAG bytes; else they are not whole
# and the list is empty (a bounded reply: 1024 x ~50 bytes).
# The walk goes by rank through `unacked_index` (delivery tag -> delivery time: small strings whose
# scores tell staleness for free), sizes each value with HSTRLEN and reads it (HGET) only under the
# per-value bound, so a hash of huge values costs Redis a few µs per entry, and it stops at the byte
# and time budgets. `stale` (ZCOUNT) counts index entries older than the visibility timeout by the
# Redis clock: kombu's restore_visible would put them back now, so no live worker holds them.
# The exchange and routing key are the last two JSON strings of each value: they are located by
# walking back from the end, so the payload is never decoded; cjson handles what the walk cannot
# (escapes), for small values only.
MAX_AGES: Final = 1024  # in-flight entries whose age one poll returns (a wait target's run times): ~50 KB
MAX_TAG: Final = 64  # bytes of a delivery tag returned with its age (kombu's are 36-byte uuids)
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
local function micros()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local lists, unacked, index = #KEYS - 2, KEYS[#KEYS - 1], KEYS[#KEYS]
local limit, bprefix = tonumber(ARGV[1]), ARGV[2]
local max_routes, max_exchanges, max_bindings = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local max_member, max_name = tonumber(ARGV[6]), tonumber(ARGV[7])
local max_value, max_bytes, max_micros = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local check_every, rank = tonumber(ARGV[12]), tonumber(ARGV[13])
local started = micros()
local lengths = {}
for i = 1, lists do
  -- pcall: a name taken by a non-list key fails that queue only (the error goes back in place).
  lengths[i] = redis.pcall('LLEN', KEYS[i])
end
if limit < 0 then return {lengths, 0, 0, 0, {}, {}, 0, 0, 0, 0, 0, '', 0, {}} end
local size = redis.call('HLEN', unacked)
local total = redis.call('ZCARD', index)
local ceiling = started / 1000000 - tonumber(ARGV[8])
local stale = redis.call('ZCOUNT', index, '-inf', ceiling)
local counts, stales, order, route_no = {}, {}, {}, {}
local walked, unparsed, too_large, bytes, stopped = 0, 0, 0, 0, ''
local ages, aged, whole = {}, 0, rank == 0
local function take(value, n, score, tag)
  local ex, rk = tail_strings(value)
  if not ex and n <= 8192 then
    local ok, decoded = pcall(cjson.decode, value)
    if ok and type(decoded) == 'table' and type(decoded[2]) == 'string' and type(decoded[3]) == 'string' then
      ex, rk = decoded[2], decoded[3]
    end
  end
  if ex and #ex <= max_name and #rk <= max_name then
    local key = ex .. '\0' .. rk
    if counts[key] == nil and #order < max_routes then
      counts[key], stales[key] = 0, 0
      order[#order + 1] = {ex, rk, key}
      route_no[key] = #order
    end
    if counts[key] == nil then
      unparsed = unparsed + 1
    else
      counts[key] = counts[key] + 1
      if score and score <= ceiling then stales[key] = stales[key] + 1 end
      if whole and score and tag and aged < MAX_AGES and #tag <= MAX_TAG then
        aged = aged + 1
        ages[#ages + 1] = route_no[key]
        ages[#ages + 1] = tag
        ages[#ages + 1] = math.floor(started / 1000 - score * 1000)
      elseif whole then
        whole = false
      end
    end
  else
    unparsed = unparsed + 1
  end
end
local since_check, checked_bytes = 0, 0
local function spent()
  since_check = since_check + 1
  if since_check >= check_every or bytes - checked_bytes >= 131072 then
    since_check, checked_bytes = 0, bytes
    if micros() - started >= max_micros then stopped = 'time' end
  end
  return stopped ~= ''
end
if limit > 0 and total > 0 then
  if rank >= total then rank = 0 end
  while rank < total and stopped == '' do
    local page = redis.call('ZRANGE', index, rank, rank + 127, 'WITHSCORES')
    if #page == 0 then break end
    for i = 1, #page, 2 do
      if walked >= limit then stopped = 'entries'; break end
      local n = redis.call('HSTRLEN', unacked, page[i])
      if n > max_value then
        too_large = too_large + 1
      elseif n > 0 then
        if bytes + n > max_bytes and walked > 0 then stopped = 'bytes'; break end
        bytes = bytes + n
        take(redis.call('HGET', unacked, page[i]), n, tonumber(page[i + 1]), page[i])
      end
      -- n == 0: acked since the index was read (or an empty value): nothing in flight
      walked = walked + 1
      rank = rank + 1
      if spent() then break end
    end
  end
  if rank >= total then rank = 0 end
elseif limit > 0 and size > 0 then
  -- A hash without kombu's index (written by hand, or another app's): a few entries per HSCAN
  -- page, their values unsized until read; the rank is the HSCAN cursor.
  local cursor = tostring(rank)
  repeat
    local page = redis.call('HSCAN', unacked, cursor, 'COUNT', 8)
    cursor = page[1]
    for i = 2, #page[2], 2 do
      local value = page[2][i]
      local n = #value
      bytes = bytes + n
      if n > max_value then too_large = too_large + 1 else take(value, n, nil) end
      walked = walked + 1
      spent()
    end
    if walked >= limit then stopped = 'entries' end
    if bytes >= max_bytes then stopped = 'bytes' end
  until cursor == '0' or stopped ~= ''
  rank = tonumber(cursor)
  whole = false
end
if stopped ~= '' or rank ~= 0 or limit <= 0 then whole = false end
if not whole then ages = {} end
local pairs_out, seen, bindings, tables = {}, {}, {}, 0
for _, item in ipairs(order) do
  pairs_out[#pairs_out + 1] = item[1]
  pairs_out[#pairs_out + 1] = item[2]
  pairs_out[#pairs_out + 1] = counts[item[3]]
  pairs_out[#pairs_out + 1] = stales[item[3]]
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
return {lengths, size, walked, unparsed, pairs_out, bindings, stale, rank, too_large, total, bytes, stopped,
        whole and 1 or 0, ages}
""".replace("MAX_AGES", str(MAX_AGES)).replace("MAX_TAG", str(MAX_TAG))


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
