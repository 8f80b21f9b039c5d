"""Which queues a message belongs to, decided the way kombu routes it, without a regex from Redis.

kombu's virtual transport routes ``(exchange, routing_key)`` through the exchange's binding table
(``_kombu.binding.<exchange>``, members ``routing_key + sep + pattern + sep + queue``):

* no exchange: the routing key is the queue;
* direct: every queue bound with exactly that routing key;
* topic: every queue whose binding key matches by kombu's word rules (words split on ``.``;
  ``*`` is one non-empty word, ``#`` is one or more words; other words are literal);
* fanout: every bound queue, whatever the key;
* nothing matched: nowhere (kombu's default dead-letter queue is unset).

The stored ``pattern`` is a regex kombu compiled from the binding key. It comes from a user's
Redis, so it is never compiled here: it only tells a topic exchange from a direct one, and the
binding key itself is matched word by word (:func:`words_match`, no backtracking), and the work
of one poll is bounded by a :class:`RoutingBudget`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

# An AMQP short string: longer exchange names and routing keys are not routed (kombu itself is
# fine with them, but they are rare and they bound the matcher's work).
MAX_NAME_LENGTH: Final = 255


class ExchangeType(StrEnum):
    DIRECT = "direct"
    TOPIC = "topic"
    FANOUT = "fanout"


@dataclass(frozen=True)
class Binding:
    """One member of an exchange's binding table."""

    routing_key: str
    pattern: str
    queue: str


def parse_binding(member: str, sep: str) -> Binding | None:
    parts = member.split(sep)
    if len(parts) != 3 or not parts[2]:
        return None
    return Binding(parts[0], parts[1], parts[2])


def exchange_type(exchange: str, table: Sequence[Binding], fanout_exchanges: Collection[str]) -> ExchangeType:
    """Redis does not store exchange types: fanout ones are named in the spec, topic ones have patterns."""
    if exchange in fanout_exchanges:
        return ExchangeType.FANOUT
    if any(b.pattern for b in table):
        return ExchangeType.TOPIC
    return ExchangeType.DIRECT


def route(
    exchange: str,
    routing_key: str,
    table: Sequence[Binding],
    fanout_exchanges: Collection[str] = (),
) -> frozenset[str]:
    """The queues kombu delivers (and restores) a message of ``(exchange, routing_key)`` to."""
    if not exchange:
        return frozenset((routing_key,)) if routing_key else frozenset()
    kind = exchange_type(exchange, table, fanout_exchanges)
    if kind is ExchangeType.FANOUT:
        return frozenset(b.queue for b in table)
    if kind is ExchangeType.TOPIC:
        return TopicTable.of(table).route(routing_key, RoutingBudget(steps=1 << 62)) or frozenset()
    return frozenset(b.queue for b in table if b.routing_key == routing_key)


def route_table(
    exchange: str, table: Sequence[Binding], fanout_exchanges: Collection[str] = ()
) -> Mapping[str, frozenset[str]] | None:
    """For a direct exchange, routing key -> queues (a dict lookup per message); else None."""
    if exchange and exchange_type(exchange, table, fanout_exchanges) is ExchangeType.DIRECT:
        out: dict[str, set[str]] = {}
        for b in table:
            out.setdefault(b.routing_key, set()).add(b.queue)
        return {k: frozenset(v) for k, v in out.items()}
    return None


def topic_matches(binding_key: str, routing_key: str) -> bool:
    """kombu's topic rule (``TopicExchange.key_to_pattern`` + ``re.match``) on the strings."""
    if len(binding_key) > MAX_NAME_LENGTH or len(routing_key) > MAX_NAME_LENGTH:
        return False
    return words_match(tuple(binding_key.split(".")), tuple(routing_key.split(".")))


def words_match(pattern: Sequence[str], words: Sequence[str]) -> bool:
    """kombu's topic rule on pre-split words, by dynamic programming over word positions.

    kombu joins the words of the binding key with ``\\.``: ``*`` is ``[^.]+`` (one non-empty word),
    ``#`` is ``.*?`` between two separators, i.e. one or more whole words of the key (an empty word
    included); any other word is literal. ``reachable[j]``: the pattern so far can end after ``j``
    words. Costs ``len(pattern) * (len(words) + 1)`` steps at most (:func:`match_cost`).
    """
    n = len(words)
    reachable = [True] + [False] * n
    for word in pattern:
        if word == "#":
            first = reachable.index(True) if True in reachable else n + 1
            reachable = [j > first for j in range(n + 1)]
        elif word == "*":
            reachable = [False] + [reachable[j - 1] and words[j - 1] != "" for j in range(1, n + 1)]
        else:
            reachable = [False] + [reachable[j - 1] and words[j - 1] == word for j in range(1, n + 1)]
        if not any(reachable):
            return False
    return reachable[n]


def match_cost(pattern_words: int, key_words: int) -> int:
    return pattern_words * (key_words + 1)


@dataclass
class RoutingBudget:
    """Match work allowed in one poll (in :func:`match_cost` steps, ~0.1 µs each): what a tenant's
    bindings and routing keys can make the operator compute is bounded; what does not fit is
    counted, not routed."""

    steps: int = 2_000_000  # ~0.2 s of Python at the worst shapes, in a worker thread
    spent: int = 0
    refused: int = 0  # (exchange, routing key) pairs left unrouted

    def take(self, cost: int) -> bool:
        if self.spent + cost > self.steps:
            self.spent = self.steps  # spent: later pairs are refused without work
            return False
        self.spent += cost
        return True


@dataclass(frozen=True)
class TopicTable:
    """A topic exchange's bindings, split once per poll: keys without wildcards are one dict lookup,
    the others are matched word by word, each charged to the poll's budget before it runs."""

    literal: Mapping[str, frozenset[str]]  # binding key -> queues
    wild: tuple[tuple[tuple[str, ...], str], ...]  # (binding key words, queue)

    @classmethod
    def of(cls, table: Sequence[Binding]) -> TopicTable:
        literal: dict[str, set[str]] = {}
        wild: list[tuple[tuple[str, ...], str]] = []
        for b in table:
            if len(b.routing_key) > MAX_NAME_LENGTH:
                continue
            words = tuple(b.routing_key.split("."))
            if "*" in words or "#" in words:
                wild.append((words, b.queue))
            else:
                literal.setdefault(b.routing_key, set()).add(b.queue)
        return cls({k: frozenset(v) for k, v in literal.items()}, tuple(wild))

    def route(self, routing_key: str, budget: RoutingBudget) -> frozenset[str] | None:
        """The queues ``routing_key`` goes to, or None when the budget cannot pay for the matches."""
        if len(routing_key) > MAX_NAME_LENGTH:
            return frozenset()
        words = routing_key.split(".")
        if not budget.take(1 + len(self.wild)):  # the lookup, and a first-word check per wildcard key
            budget.refused += 1
            return None
        queues = set(self.literal.get(routing_key, ()))
        for pattern, queue in self.wild:
            first = pattern[0]
            if first not in ("*", "#") and first != words[0]:
                continue
            if not budget.take(match_cost(len(pattern), len(words))):
                budget.refused += 1
                return None
            if words_match(pattern, words):
                queues.add(queue)
        return frozenset(queues)
