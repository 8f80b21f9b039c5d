"""Celery remote control (kombu's pidbox) spoken directly on redis.asyncio, bounded in bytes.

The wire format, as kombu 5.4-5.7's Redis transport and Celery's mailbox lay it out
(``kombu/pidbox.py``, ``kombu/transport/redis.py``, ``celery/app/control.py``):

* a broadcast is a PUBLISH of a kombu message (JSON: ``body`` base64 of the JSON command
  ``{method, arguments, destination, ticket, reply_to}``, ``headers`` ``clock``/``expires``) on the
  fanout topic ``<global_keyprefix>/<db>.celery.pidbox``; on Sentinel also on kombu < 5.4's literal
  ``/{db}.celery.pidbox`` (``sentinel_fanout_compat``), with one ``delivery_tag`` so workers that
  listen on both deliver it once;
* a worker replies by publishing ``{node: value}`` (headers ``ticket``) to the direct exchange
  ``reply.celery.pidbox``: it looks our routing key up in ``_kombu.binding.reply.celery.pidbox``
  (members ``routing_key + sep + pattern + sep + queue``, split with *its* ``sep``) and LPUSHes
  the message onto the queue's list.

What differs from kombu's Mailbox, and why: each request gets its own reply list and binding,
both deleted when it ends (and deleted again at the next request, for a reply that raced the
delete), so nothing for another ticket is retained; replies are popped by :data:`POP_SCRIPT`,
which sends back only the *length* of an element over the per-reply budget (the element is
dropped unread) and stops at the request's total budget; only JSON is decoded (never pickle),
in a thread, and only replies with one of our tickets from a node we asked count.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import functools
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from redis import exceptions as rexc

from celery_fleet.brokers.redis.connection import BrokerClients

__all__ = [
    "CONTROL_ACL",
    "PIDBOX_EXCHANGE",
    "POP_SCRIPT",
    "REPLY_EXCHANGE",
    "Call",
    "Mailbox",
    "PidboxClient",
    "PidboxError",
    "RequestResult",
    "decode_replies",
    "request_envelope",
    "summarize",
]

PIDBOX_EXCHANGE = "celery.pidbox"  # kombu Mailbox("celery"): exchange "<namespace>.pidbox"
REPLY_EXCHANGE = "reply.celery.pidbox"
KOMBU_SEP = "\x06\x16"
# What the control path needs beyond READER_ACL (scripts.py), for docs/install.md and its test:
# PUBLISH on the pidbox fanout topic, the reply lists and reply bindings (all end in
# ".reply.celery.pidbox"), the pop script (EVAL running MEMORY USAGE, RPOP, UNLINK), SISMEMBER on the
# pidbox table.
# With a globalKeyprefix, prefix the key and channel patterns with it.
CONTROL_ACL: Final = (
    "on resetkeys ~*.reply.celery.pidbox %R~_kombu.binding.celery.pidbox resetchannels &/*.celery.pidbox"
    " -@all +publish +sadd +srem +unlink +eval +rpop +memory|usage +sismember +select"
)
# A reply over this many bytes (as stored in Redis: base64 inside a JSON envelope) is dropped
# unread. 256 KiB holds `reserved` of a worker prefetching ~200 tasks with their argsrepr.
REPLY_BYTES = 256 * 1024
# All replies of one request together; past it the rest are dropped unread.
REQUEST_BYTES = 4 * 1024 * 1024
# Elements popped per script call (each at most REPLY_BYTES): bounds the bytes of one reply to us.
POP_BATCH = 16
# A reply naming more tasks than this is counted as this many (a count is all we keep).
MAX_TASKS_COUNTED = 100_000
MAX_QUEUES_KEPT = 1_000
MAX_QUEUE_NAME = 1_024
# Reply lists of ended requests to delete again (a reply that raced our delete re-creates one).
STALE_KEPT = 64

# KEYS[1] the reply list; ARGV: per-reply bytes, bytes left for the request, elements at most, the
# most a list may hold before it is discarded unread, then our tickets. RPOP copies an element into
# Lua (Redis pays for its length), so a list over the cap (MEMORY USAGE, a walk over its nodes, not
# its bytes) is unlinked unread first (freed in Redis's background thread): a call copies at most
# the cap. Otherwise what is
# over a budget comes back as its length and what names none of our tickets as minus its length (a
# plain substring search over at most the per-reply budget): neither crosses the network, and junk
# pushed onto our list cannot use up the request's budget.
POP_SCRIPT = """
local per, left, n, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local size = redis.call('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', '0')
if size and size > cap then
  redis.call('UNLINK', KEYS[1])
  return {size}
end
local out = {}
for i = 1, n do
  local v = redis.call('RPOP', KEYS[1])
  if not v then break end
  local ours = false
  if #v <= per then
    for t = 5, #ARGV do
      if string.find(v, ARGV[t], 1, true) then ours = true; break end
    end
  end
  if #v > per then
    out[#out + 1] = #v
  elseif not ours then
    out[#out + 1] = -#v
  elseif #v > left then
    out[#out + 1] = #v
  else
    left = left - #v
    out[#out + 1] = v
  end
end
return out
"""
# A reply list holding more than this (replies and junk together) is deleted unread: the most one
# pop call makes Redis copy into Lua, ~9 ms per MiB measured on Redis 7.0 (a 9 MiB element: 80-110 ms
# of stall for every client), so ~18 ms at most. Honest replies come a few KiB at a time and are
# popped every 5-50 ms; a discarded list makes its nodes silent (busy), never idle.
LIST_CAP_BYTES = 2 * 1024 * 1024


class PidboxError(Exception):
    """The broker could not carry a request (unreachable, refused, too slow). Never names a secret."""


@dataclass(frozen=True)
class Mailbox:
    """Where one broker's pidbox lives (the pool's key prefix, kombu ``sep``, database, Sentinel)."""

    keyprefix: str = ""
    sep: str = KOMBU_SEP
    db: int = 0
    sentinel: bool = False

    def fanout_channels(self) -> list[str]:
        topics = [f"/{self.db}.{PIDBOX_EXCHANGE}"]
        if self.sentinel:
            topics.append(f"/{{db}}.{PIDBOX_EXCHANGE}")  # kombu < 5.4 never formatted it on Sentinel
        return [self.keyprefix + t for t in dict.fromkeys(topics)]

    @property
    def node_table(self) -> str:
        return f"{self.keyprefix}_kombu.binding.{PIDBOX_EXCHANGE}"

    def node_member(self, node: str) -> str:
        """A worker's binding in :attr:`node_table` (kombu's fanout bind: empty key and pattern)."""
        return self.sep.join(["", "", f"{node}.{PIDBOX_EXCHANGE}"])

    @property
    def reply_table(self) -> str:
        return f"{self.keyprefix}_kombu.binding.{REPLY_EXCHANGE}"

    @property
    def reply_permanent_table(self) -> str:
        # kombu 5.7 sweeps a binding table whose deadline passed unless this set exists.
        return f"{self.keyprefix}_kombu.binding_permanent.{REPLY_EXCHANGE}"

    def reply_member(self, oid: str) -> str:
        # A direct exchange's binding: routing key, pattern (the same key), queue.
        return self.sep.join([oid, oid, reply_queue(oid)])

    def reply_list(self, oid: str) -> str:
        return self.keyprefix + reply_queue(oid)


def reply_queue(oid: str) -> str:
    return f"{oid}.{REPLY_EXCHANGE}"


@dataclass(frozen=True)
class Call:
    """One remote-control command: ``method`` with ``arguments``."""

    method: str
    arguments: Mapping[str, Any] = field(default_factory=dict)


def request_envelope(
    call: Call, destination: Sequence[str], ticket: str, oid: str, *, clock: int, expires: float, tag: str
) -> bytes:
    """The kombu message a Celery control client publishes (JSON body, base64 as kombu's virtual
    transport encodes it). ``expires`` is wall-clock time, as kombu's mailbox sends it."""
    body = {
        "method": call.method,
        "arguments": dict(call.arguments),
        "destination": list(destination),
        "pattern": None,
        "matcher": None,
        "ticket": ticket,
        "reply_to": {"exchange": REPLY_EXCHANGE, "routing_key": oid},
    }
    envelope = {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"clock": clock, "expires": expires},
        "properties": {
            "delivery_mode": 2,
            "delivery_info": {"exchange": PIDBOX_EXCHANGE, "routing_key": ""},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": tag,
        },
    }
    return json.dumps(envelope).encode()


# -- replies (pure: every byte is the tenant's) ----------------------------------------------------


def _reply(raw: bytes, tickets: Mapping[str, int], nodes: frozenset[str]) -> tuple[int, str, Any] | None:
    """(call index, node, value) of a well-formed JSON reply with one of our tickets from a node
    we asked; None for anything else (other tickets, other nodes, pickle, garbage)."""
    try:
        envelope = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        return None
    if not isinstance(envelope, dict):
        return None
    headers, props = envelope.get("headers"), envelope.get("properties")
    if not isinstance(headers, dict) or not isinstance(props, dict):
        return None
    ticket = headers.get("ticket")
    if not isinstance(ticket, str) or ticket not in tickets:
        return None
    if envelope.get("content-type") != "application/json":
        return None  # a worker serializing with pickle: unread, that node counts as silent
    body = envelope.get("body")
    try:
        if props.get("body_encoding") == "base64":
            data: str | bytes = base64.b64decode(str(body), validate=True)
        elif isinstance(body, str):
            data = body
        else:
            return None
        value = json.loads(data)
    except (ValueError, RecursionError, binascii.Error):
        return None
    if not isinstance(value, dict) or len(value) != 1:
        return None
    ((node, answer),) = value.items()
    if not isinstance(node, str) or node not in nodes:
        return None
    return tickets[ticket], node, answer


def summarize(method: str, answer: Any) -> Any:
    """What we keep of a node's answer: a count, queue names, or whether it said ``ok``.
    None: a malformed answer (the node counts as not having answered)."""
    if method in ("active", "reserved", "scheduled"):
        return min(len(answer), MAX_TASKS_COUNTED) if isinstance(answer, list) else None
    if method == "active_queues":
        if not isinstance(answer, list):
            return None
        names = [q.get("name") for q in answer[:MAX_QUEUES_KEPT] if isinstance(q, dict)]
        return frozenset(n for n in names if isinstance(n, str) and len(n) <= MAX_QUEUE_NAME)
    if method in ("cancel_consumer", "add_consumer"):
        return isinstance(answer, dict) and "ok" in answer
    return None


def decode_replies(
    raws: Sequence[bytes], calls: Sequence[Call], tickets: Mapping[str, int], nodes: Iterable[str]
) -> tuple[dict[tuple[int, str], Any], int]:
    """(call index, node) -> summary of the first reply of each; and how many were not ours."""
    wanted = frozenset(nodes)
    out: dict[tuple[int, str], Any] = {}
    foreign = 0
    for raw in raws:
        parsed = _reply(raw, tickets, wanted)
        if parsed is None:
            foreign += 1
            continue
        index, node, answer = parsed
        summary = summarize(calls[index].method, answer)
        if summary is not None:
            out.setdefault((index, node), summary)
    return out, foreign


# -- the client ---------------------------------------------------------------------------------------


@dataclass
class RequestResult:
    """Answers of one request: (call index, node) -> summary; nodes silent for any call and
    whether each is bound in the pidbox table (has remote control); what was dropped."""

    answers: dict[tuple[int, str], Any] = field(default_factory=dict)
    bound: dict[str, bool] = field(default_factory=dict)  # only for nodes missing an answer
    dropped: int = 0  # replies over a byte budget, dropped unread
    dropped_bytes: int = 0
    foreign: int = 0  # replies for other tickets or nodes, or unreadable
    commands: int = 0  # Redis commands sent


class PidboxClient:
    """Requests to one broker's workers. Concurrency is bounded by the caller (per broker)."""

    def __init__(
        self,
        clients: BrokerClients,
        mailbox: Mailbox,
        *,
        reply_bytes: int = REPLY_BYTES,
        request_bytes: int = REQUEST_BYTES,
        cleanup_seconds: float = 0.25,
    ) -> None:
        self.clients = clients
        self.mailbox = mailbox
        self.reply_bytes = reply_bytes
        self.request_bytes = request_bytes
        self.cleanup_seconds = cleanup_seconds
        self._current = 0
        self._clock = 0
        # (reply list, binding member) of ended requests: deleted again with the next request.
        self._stale: collections.deque[tuple[str, str]] = collections.deque(maxlen=STALE_KEPT)

    async def request(self, calls: Sequence[Call], nodes: Sequence[str], deadline: float) -> RequestResult:
        """Publish every call to ``nodes`` at once and collect replies until each node answered
        each call or ``deadline`` (``time.monotonic()``). Raises :class:`PidboxError`."""
        result = RequestResult()
        oid = str(uuid.uuid4())
        tickets = {str(uuid.uuid4()): i for i in range(len(calls))}
        mb = self.mailbox
        member, reply_list = mb.reply_member(oid), mb.reply_list(oid)
        expected = {(i, n) for i in range(len(calls)) for n in nodes}
        client = self.clients.clients[self._current]
        try:
            client = await self._publish(calls, nodes, oid, tickets, deadline, result)
            left = self.request_bytes
            pause = 0.005
            while expected - result.answers.keys():
                if time.monotonic() >= deadline - self.cleanup_seconds:
                    break  # the deadline: whoever has not answered is silent
                budgets = (self.reply_bytes, max(left, 0), POP_BATCH, LIST_CAP_BYTES, *tickets)
                pop = functools.partial(client.eval, POP_SCRIPT, 1, reply_list, *budgets)
                batch = await self._call(pop, deadline - self.cleanup_seconds / 2, result)
                if batch is None:
                    break
                if not isinstance(batch, list):
                    raise PidboxError(f"unexpected reply to the pop script ({type(batch).__name__})")
                raws = [x for x in batch if isinstance(x, bytes)]
                over = [x for x in batch if isinstance(x, int) and x > 0]
                result.foreign += sum(1 for x in batch if isinstance(x, int) and x <= 0)
                result.dropped += len(over)
                result.dropped_bytes += sum(over)
                left -= sum(len(x) for x in raws)
                if raws:
                    answers, foreign = await asyncio.to_thread(decode_replies, raws, calls, tickets, nodes)
                    result.foreign += foreign
                    for k, v in answers.items():
                        result.answers.setdefault(k, v)
                    pause = 0.005  # replies come in bursts: look again soon
                if len(batch) < POP_BATCH:
                    remaining = deadline - self.cleanup_seconds - time.monotonic()
                    if remaining <= 0:
                        break
                    await asyncio.sleep(min(pause, remaining))
                    pause = min(pause * 2, 0.05)
        except BaseException:  # failed or cancelled: the list and binding go with the next request
            self._stale.append((reply_list, member))
            raise
        silent = sorted({n for (_, n) in expected - result.answers.keys()})
        await self._end(client, reply_list, member, silent, deadline, result)
        return result

    async def _publish(
        self,
        calls: Sequence[Call],
        nodes: Sequence[str],
        oid: str,
        tickets: Mapping[str, int],
        deadline: float,
        result: RequestResult,
    ) -> Any:
        """Bind the reply list, then publish; on a connection failure try the next ``;`` alternate."""
        mb = self.mailbox
        expires = time.time() + max(deadline - time.monotonic(), 0.0)
        tag = str(uuid.uuid4())
        envelopes = []
        for ticket, index in tickets.items():
            self._clock += 1
            envelopes.append(
                request_envelope(calls[index], nodes, ticket, oid, clock=self._clock, expires=expires, tag=tag)
            )
            tag = str(uuid.uuid4())
        stale = list(self._stale)
        self._stale.clear()
        clients = self.clients.clients
        for attempt in range(len(clients)):
            client = clients[self._current]
            pipe = client.pipeline(transaction=False)
            for old_list, old_member in stale:
                pipe.srem(mb.reply_table, old_member)
                pipe.srem(mb.reply_permanent_table, old_member)
                pipe.unlink(old_list)
            pipe.sadd(mb.reply_table, mb.reply_member(oid))
            pipe.sadd(mb.reply_permanent_table, mb.reply_member(oid))
            for envelope in envelopes:
                for channel in mb.fanout_channels():
                    pipe.publish(channel, envelope)
            try:
                send = functools.partial(pipe.execute, raise_on_error=True)
                sent = await self._call(send, deadline, result, len(pipe))
                if sent is None:
                    raise PidboxError("the deadline passed before the request was sent")
                return client
            except PidboxError as err:
                unreachable = isinstance(err.__cause__, rexc.ConnectionError | OSError)
                if not unreachable or attempt == len(clients) - 1:
                    self._stale.extend(stale)
                    raise
                self._current = (self._current + 1) % len(clients)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _end(
        self, client: Any, reply_list: str, member: str, silent: Sequence[str], deadline: float, result: RequestResult
    ) -> None:
        """Unbind and delete the reply list; ask the pidbox table about silent nodes (SISMEMBER
        per node: the table may hold a million members)."""
        mb = self.mailbox
        pipe = client.pipeline(transaction=False)
        pipe.srem(mb.reply_table, member)
        pipe.srem(mb.reply_permanent_table, member)
        pipe.unlink(reply_list)
        for node in silent:
            pipe.sismember(mb.node_table, mb.node_member(node))
        # A reply LPUSHed between a worker's lookup of the binding and our DEL re-creates the list.
        self._stale.append((reply_list, member))
        try:
            send = functools.partial(pipe.execute, raise_on_error=True)
            replies = await self._call(send, deadline, result, len(pipe))
        except PidboxError:
            replies = None
        if replies is None:
            # Unknown whether they are bound: they count as silent with remote control (busy).
            result.bound = {n: True for n in silent}
            return
        result.bound = {n: bool(r) for n, r in zip(silent, replies[3:], strict=True)}

    async def _call(
        self, send: Callable[[], Awaitable[Any]], deadline: float, result: RequestResult, commands: int = 1
    ) -> Any:
        """One Redis round trip by ``deadline``; None when the deadline passed before it was sent.
        A timeout or failure while waiting raises :class:`PidboxError` (unknown, never idle)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        result.commands += commands
        try:
            return await asyncio.wait_for(send(), remaining)
        except TimeoutError as err:
            raise PidboxError("the broker did not answer in time") from err
        except (rexc.RedisError, OSError) as err:
            raise PidboxError(f"remote control failed ({type(err).__name__})") from err
        except Exception as err:  # whatever answers may answer anything: still "unknown", never idle
            raise PidboxError(f"remote control failed ({type(err).__name__})") from err
