"""Which queues a message belongs to, decided the way kombu routes it, without a regex from Redis.

kombu's virtual transport routes ``(exchange, routing_key)`` through the exchange's binding table
(``_kombu.binding.<exchange>``, members ``routing_key + sep + pattern + sep + queue``):

* no exchange: the routing key is the queue;
* direct: every queue bound with exactly that routing key;
* topic: every queue whose binding key matches by kombu's word rules (words split on ``.``;
  ``*`` is one non-empty word, ``#`` is any run of characters, dots included; other words are
  literal);
* fanout: every bound queue, whatever the key;
* nothing matched: nowhere (kombu's default dead-letter queue is unset).

The stored ``pattern`` is a regex kombu compiled from the binding key. It comes from a user's
Redis, so it is never compiled here: it only tells a topic exchange from a direct one, and the
binding key itself is matched by :func:`topic_matches`, whose cost is bounded by the lengths of
the two strings (no backtracking).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
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
        return frozenset(b.queue for b in table if topic_matches(b.routing_key, routing_key))
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


@lru_cache(maxsize=65536)
def topic_matches(binding_key: str, routing_key: str) -> bool:
    """kombu's topic rule (``TopicExchange.key_to_pattern`` + ``re.match``), by dynamic programming.

    ``reachable[i]`` says the part of the binding key handled so far can end at position ``i`` of
    the routing key; each word moves the set forward in one left-to-right pass, so a match costs
    O(len(binding_key) * len(routing_key)) at most, whatever the input.
    """
    if len(binding_key) > MAX_NAME_LENGTH or len(routing_key) > MAX_NAME_LENGTH:
        return False
    n = len(routing_key)
    reachable = [True] + [False] * n
    for index, word in enumerate(binding_key.split(".")):
        if index:
            reachable = _literal(reachable, routing_key, ".")
        if word == "*":
            reachable = _one_word(reachable, routing_key)
        elif word == "#":
            reachable = _anything(reachable)
        else:
            reachable = _literal(reachable, routing_key, word)
        if not any(reachable):
            return False
    return reachable[n]


def _literal(reachable: list[bool], text: str, word: str) -> list[bool]:
    out = [False] * len(reachable)
    size = len(word)
    for i, ok in enumerate(reachable):
        if ok and text.startswith(word, i):
            out[i + size] = True
    return out


def _one_word(reachable: list[bool], text: str) -> list[bool]:
    # `[^.]+`: from a reachable i, every j > i with no dot in text[i:j].
    out = [False] * len(reachable)
    open_word = False
    for j in range(1, len(reachable)):
        if text[j - 1] == ".":
            open_word = False
        elif reachable[j - 1]:
            open_word = True
        out[j] = open_word
    return out


def _anything(reachable: list[bool]) -> list[bool]:
    # `.*?` anchored at both ends: every position from the first reachable one on.
    first = reachable.index(True) if True in reachable else len(reachable)
    return [i >= first for i in range(len(reachable))]
