"""One poll, pure: the commands (one EVAL of the poll script per key layout), then the reading
built from their replies (kombu's routing applied to the in-flight counts, within a work budget)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from redis import exceptions as rexc

from celery_fleet.brokers import routing
from celery_fleet.brokers.redis.scripts import (
    BINDING_KEY_PREFIX,
    BOUNDS,
    DEFAULT_SCAN_LIMIT,
    MAX_AGES,
    MAX_KEYS_PER_EVAL,
    MAX_TAG,
    POLL_SCRIPT,
    WALK_BUDGET,
    Command,
    Reply,
    ReplyBounds,
    WalkBudget,
)
from celery_fleet.brokers.redis.target import first_line
from celery_fleet.brokers.source import (
    DEFAULT_UNACKED_INDEX_KEY,
    BrokerError,
    DepthReading,
    ErrorKind,
    KeyLayout,
    QueueRef,
    UnackedSummary,
)

# -- keys -----------------------------------------------------------------------------------------------


def priority_key(ref: QueueRef, step: int) -> str:
    """The Redis list holding ``ref``'s messages of one priority step (kombu's ``_q_for_pri``)."""
    name = ref.name if step == 0 else f"{ref.name}{ref.sep}{step}"
    return ref.keyprefix + name


def unacked_key(layout: KeyLayout) -> str:
    return layout.keyprefix + layout.unacked_key


def unacked_index_key(layout: KeyLayout) -> str:
    """kombu's ``unacked_index`` zset (delivery tag -> delivery time), under the key prefix like every key."""
    return layout.keyprefix + DEFAULT_UNACKED_INDEX_KEY


# -- one poll: the commands, then the replies -------------------------------------------------------


@dataclass(frozen=True)
class PollPlan:
    """The commands of one poll (one EVAL per key layout) and which reply answers what."""

    commands: tuple[Command, ...]
    # (layout, ((queue, step), ...), whether this EVAL reads the unacked hash): one per command.
    batches: tuple[tuple[KeyLayout, tuple[tuple[QueueRef, int], ...], bool], ...]

    def starting_at(self, ranks: Mapping[KeyLayout, int]) -> tuple[Command, ...]:
        """The commands with each layout's walk resuming at its rank in ``unacked_index`` (the last
        argument); the plan's own commands object when every walk starts at 0 (it stays cached)."""
        if not any(ranks.values()):
            return self.commands
        return tuple(
            (*c[:-1], ranks.get(layout, 0)) if scans else c
            for c, (layout, _, scans) in zip(self.commands, self.batches, strict=True)
        )


def plan_poll(
    refs: Collection[QueueRef],
    scan_limit: int = DEFAULT_SCAN_LIMIT,
    skip_scan: Collection[KeyLayout] = (),
    bounds: ReplyBounds = BOUNDS,
    max_keys: int = MAX_KEYS_PER_EVAL,
    walk: WalkBudget = WALK_BUDGET,
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
    budget = (walk.max_value_bytes, walk.max_bytes, walk.max_micros, walk.check_every)
    for p, lists, scans in batches:
        keys = [priority_key(r, s) for r, s in lists] + [unacked_key(p), unacked_index_key(p)]
        limit = -1 if not (scans and p.ack_emulation) else 0 if p in skip_scan else scan_limit
        binding_prefix = p.keyprefix + BINDING_KEY_PREFIX
        commands.append(
            ("EVAL", POLL_SCRIPT, len(keys), *keys, limit, binding_prefix, *limits, bounds.max_name_bytes,
             p.visibility_timeout, *budget, 0)
        )  # fmt: skip
    return PollPlan(tuple(commands), tuple(batches))


POLL_REPLY_LENGTH = 14
# A script from before the in-flight ages (issue 25) answers 12: read as whole counts, no ages.
_REPLY_LENGTHS = (12, POLL_REPLY_LENGTH)


def parse_poll(
    plan: PollPlan,
    replies: Sequence[Reply],
    *,
    duration_seconds: float = 0.0,
    budget: routing.RoutingBudget | None = None,
) -> DepthReading:
    """Build the reading from the replies (an exception object stands for a command's error).

    In-flight counts are those of the entries this poll walked (``UnackedSummary.scanned``), not
    scaled up: the source adds walks that cover a big hash over several polls. Routing spends
    ``budget`` (a fresh :class:`~celery_fleet.brokers.routing.RoutingBudget` when None); what does
    not fit is ``unrouted``.
    """
    budget = budget if budget is not None else routing.RoutingBudget()
    if len(replies) != len(plan.commands):
        raise BrokerError(
            ErrorKind.RESPONSE_ERROR, f"expected {len(plan.commands)} replies in the round trip, got {len(replies)}"
        )
    queued: dict[QueueRef, dict[int, int]] = defaultdict(dict)
    queue_errors: dict[QueueRef, str] = {}
    in_flight: Counter[tuple[KeyLayout, str]] = Counter()
    routes: Counter[tuple[KeyLayout, frozenset[str]]] = Counter()
    stale_routes: Counter[tuple[KeyLayout, frozenset[str]]] = Counter()
    unacked: dict[KeyLayout, UnackedSummary] = {}
    ages: dict[KeyLayout, dict[frozenset[str], dict[str, float]]] = {}
    for (layout, lists, scans), reply in zip(plan.batches, replies, strict=True):
        if isinstance(reply, BaseException):
            auth = _auth_error(reply)
            if auth is not None:
                raise auth
            why = first_line(reply)
            queue_errors.update((r, why) for r, _ in lists)
            unacked[layout] = UnackedSummary(0, 0, error=why)
            continue
        if not isinstance(reply, list) or len(reply) not in _REPLY_LENGTHS or not isinstance(reply[0], list):
            raise BrokerError(ErrorKind.RESPONSE_ERROR, "unexpected reply to the poll script")
        lengths = reply[0]
        if len(lengths) != len(lists):
            raise BrokerError(ErrorKind.RESPONSE_ERROR, f"expected {len(lists)} list lengths, got {len(lengths)}")
        for (ref, step), n in zip(lists, lengths, strict=True):
            if isinstance(n, BaseException):
                queue_errors[ref] = first_line(n)
            elif isinstance(n, int):
                queued[ref][step] = n
            else:
                queue_errors[ref] = f"LLEN answered {type(n).__name__}, not an integer"
        if not scans:
            continue  # a later chunk of a big layout: lengths only
        try:
            summary, counts, stale, route_ages = _parse_inflight(reply[1:], layout, budget)
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
        for queues, n in stale.items():
            mine = queues & watched
            if mine:
                stale_routes[(layout, frozenset(mine))] += n
        if route_ages is not None:
            kept = ages.setdefault(layout, {})
            for queues, tags in route_ages.items():
                mine = frozenset(queues & watched)
                if mine:
                    kept.setdefault(mine, {}).update(tags)
    for ref in queue_errors:
        queued.pop(ref, None)
    # Readings are never changed: queues with the same counts share one mapping (an idle fleet's
    # thousands of empty queues, one {0: 0, 3: 0, 6: 0, 9: 0}).
    same: dict[tuple[tuple[int, int], ...], dict[int, int]] = {}
    return DepthReading(
        queued={r: same.setdefault(tuple(s.items()), s) for r, s in queued.items()},
        in_flight=dict(in_flight),
        unacked=unacked,
        duration_seconds=duration_seconds,
        queue_errors=queue_errors,
        in_flight_routes=dict(routes),
        stale_routes=dict(stale_routes),
        in_flight_ages={layout: a for layout, a in ages.items() if layout not in queue_errors_layouts(unacked)},
    )


def queue_errors_layouts(unacked: Mapping[KeyLayout, UnackedSummary]) -> set[KeyLayout]:
    return {p for p, s in unacked.items() if s.error is not None}


def _parse_inflight(
    reply: Sequence[Reply], layout: KeyLayout, budget: routing.RoutingBudget
) -> tuple[
    UnackedSummary, dict[frozenset[str], int], dict[frozenset[str], int], dict[frozenset[str], dict[str, float]] | None
]:
    """Unacked counts per set of queues kombu routes them to (a delivery tag counts once per set):
    those workers hold, and those past the visibility timeout (stale), apart; and the ages (seconds
    since delivery) of the entries held, per set of queues, when the script walked the whole index."""
    size, scanned, unparsed, flat_pairs, flat_bindings, stale_total, next_rank, too_large, _, _, stopped = reply[:11]
    whole, flat_ages = (reply[11], reply[12]) if len(reply) > 11 else (0, [])
    if not isinstance(flat_ages, list) or len(flat_ages) > 3 * MAX_AGES:
        raise ValueError("expected at most MAX_AGES (route, tag, age) triples")
    if not isinstance(flat_pairs, list) or not isinstance(flat_bindings, list):
        raise ValueError("expected lists of pairs and bindings")
    size, scanned, unparsed, stale_total = _int(size), _int(scanned), _int(unparsed), _int(stale_total)
    next_rank, too_large = _int(next_rank), _int(too_large)
    direct: dict[str, Mapping[str, frozenset[str]]] = {}
    topic: dict[str, routing.TopicTable] = {}
    fanout: dict[str, frozenset[str]] = {}
    for i in range(0, len(flat_bindings), 2):
        exchange, members = reply_text(flat_bindings[i]), flat_bindings[i + 1]
        if not isinstance(members, list):
            continue  # too many bindings to read: its messages stay unattributed
        table = [b for b in (routing.parse_binding(reply_text(m), layout.sep) for m in members) if b is not None]
        kind = routing.exchange_type(exchange, table, layout.fanout_exchanges)
        if kind is routing.ExchangeType.FANOUT:
            fanout[exchange] = frozenset(b.queue for b in table)
        elif kind is routing.ExchangeType.TOPIC:
            topic[exchange] = routing.TopicTable.of(table)
        else:
            direct[exchange] = routing.route_table(exchange, table) or {}
    counts: Counter[frozenset[str]] = Counter()
    stale: Counter[frozenset[str]] = Counter()
    unattributed, unrouted = unparsed + too_large, 0
    route_queues: list[frozenset[str] | None] = []  # by the script's route number - 1
    for i in range(0, len(flat_pairs), 4):
        route_queues.append(None)
        # Each (exchange, routing key) comes once per walk (the script counts them): routed once.
        exchange, routing_key = reply_text(flat_pairs[i]), reply_text(flat_pairs[i + 1])
        n, old = _int(flat_pairs[i + 2]), _int(flat_pairs[i + 3])
        if not 0 <= old <= n:
            raise ValueError(f"{old} stale of {n} entries")
        queues: frozenset[str] | None
        if not exchange:
            queues = frozenset((routing_key,)) if routing_key else frozenset()
        elif exchange in fanout:
            queues = fanout[exchange]
        elif exchange in direct:
            queues = direct[exchange].get(routing_key, frozenset())
        elif exchange in topic:
            queues = topic[exchange].route(routing_key, budget)
            if queues is None:
                unrouted += n  # the poll's match budget is spent: counted, not routed
                unattributed += n
                continue
        else:
            unattributed += n  # its binding table was not read (bounds)
            continue
        if not queues:
            unattributed += n  # kombu would deliver (and restore) it nowhere
            continue
        route_queues[-1] = queues
        if n > old:
            counts[queues] += n - old
        if old:
            stale[queues] += old
    summary = UnackedSummary(
        size=size, scanned=scanned, unattributed=unattributed, stale=stale_total, too_large=too_large,
        unrouted=unrouted, walk_stopped=reply_text(stopped), next_rank=next_rank,
    )  # fmt: skip
    ages: dict[frozenset[str], dict[str, float]] | None = None
    if _int(whole) == 1:
        ages = {}
        for i in range(0, len(flat_ages) - 2, 3):
            route, tag, age_ms = _int(flat_ages[i]), reply_text(flat_ages[i + 1]), _int(flat_ages[i + 2])
            if not 1 <= route <= len(route_queues) or len(tag) > MAX_TAG:
                raise ValueError(f"age of route {route} of {len(route_queues)}")
            queues = route_queues[route - 1]
            if queues:  # unrouted entries are no tier's
                ages.setdefault(queues, {})[tag] = max(0, age_ms) / 1000
    return summary, dict(counts), dict(stale), ages


def _int(value: object) -> int:
    if isinstance(value, int):
        return value
    raise ValueError(f"expected an integer, got {type(value).__name__}")


def reply_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _auth_error(exc: BaseException) -> BrokerError | None:
    # Redis refuses a big command (our script) from an unauthenticated client with "Protocol error:
    # unauthenticated multibulk length" before any NOAUTH (we speak RESP2: no HELLO on connect).
    text = str(exc)
    if (
        isinstance(exc, rexc.NoPermissionError)
        or text.startswith(("NOPERM", "NOAUTH", "WRONGPASS"))
        or (text.startswith("Protocol error: unauthenticated"))
    ):
        return BrokerError(ErrorKind.AUTH_FAILED, first_line(exc))
    return None


def queued_by_priority(reading: DepthReading) -> Mapping[tuple[str, int], int]:
    """Depth per (queue, priority step), summed over key prefixes: what the queue-depth metric shows."""
    out: Counter[tuple[str, int]] = Counter()
    for ref, steps in reading.queued.items():
        for step, n in steps.items():
            out[(ref.name, step)] += n
    return dict(out)
