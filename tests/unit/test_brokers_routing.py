"""Routing as kombu routes, without compiling a regex taken from Redis."""

from __future__ import annotations

import itertools
import random
import time

import pytest
from kombu.transport.virtual.exchange import TopicExchange

from celery_fleet.brokers.routing import Binding, RoutingBudget, TopicTable, parse_binding, route, topic_matches

SEP = "\x06\x16"
WORDS = ["a", "b", "ab", "*", "#", ""]


def kombu_topic(binding_key: str, routing_key: str) -> bool:
    exchange = TopicExchange(channel=None)
    return bool(exchange._match(exchange.key_to_pattern(binding_key), routing_key))


def keys(max_words: int) -> list[str]:
    return [".".join(w) for n in range(1, max_words + 1) for w in itertools.product(WORDS, repeat=n)]


def test_topic_rules_agree_with_kombu_on_every_small_key() -> None:
    routing_keys = [k for k in keys(3) if "*" not in k and "#" not in k]
    for binding_key in keys(3):
        for routing_key in routing_keys:
            assert topic_matches(binding_key, routing_key) == kombu_topic(binding_key, routing_key), (
                binding_key,
                routing_key,
            )


def test_topic_rules_agree_with_kombu_on_random_keys() -> None:
    rng = random.Random(14)
    for _ in range(3000):
        binding_key = ".".join(rng.choice(["x", "y", "*", "#", "xy"]) for _ in range(rng.randint(1, 6)))
        routing_key = ".".join(rng.choice(["x", "y", "xy", ""]) for _ in range(rng.randint(1, 7)))
        assert topic_matches(binding_key, routing_key) == kombu_topic(binding_key, routing_key)


def test_a_hostile_binding_costs_microseconds_not_minutes() -> None:
    # As a regex, (a+)+$-style keys backtrack exponentially; the word rules cannot.
    started = time.perf_counter()
    for i in range(200):
        assert not topic_matches("#." * 60 + "b", "a." * 120 + f"c{i}")
    assert time.perf_counter() - started < 5  # generous: seconds would mean backtracking


@pytest.mark.parametrize(
    ("exchange", "routing_key", "table", "fanout", "queues"),
    [
        pytest.param("", "q1", [], (), {"q1"}, id="anonymous-exchange-routing-key-is-the-queue"),
        pytest.param("x", "q1", [], (), set(), id="no-binding-delivers-nowhere"),
        pytest.param(
            "x", "k", [("k", "", "q1"), ("k", "", "q2"), ("j", "", "q3")], (), {"q1", "q2"}, id="direct-shared-key"
        ),
        pytest.param("x", "a.b", [("a.*", r"^a\.[^.]+$", "q1")], (), {"q1"}, id="topic"),
        pytest.param("x", "a.b", [("a.*", "(((((a+)+)+)+)+$", "q1")], (), {"q1"}, id="stored-regex-is-not-used"),
        pytest.param("x", "anything", [("k", "", "q1"), ("j", "", "q2")], ("x",), {"q1", "q2"}, id="fanout"),
    ],
)
def test_route(
    exchange: str, routing_key: str, table: list[tuple[str, str, str]], fanout: tuple[str, ...], queues: set[str]
) -> None:
    assert route(exchange, routing_key, [Binding(*b) for b in table], fanout) == queues


def test_binding_members_use_the_configured_separator() -> None:
    assert parse_binding(f"k{SEP}{SEP}q", SEP) == Binding("k", "", "q")
    assert parse_binding("k::q", ":") == Binding("k", "", "q")
    assert parse_binding(f"k{SEP}q", SEP) is None


def test_topic_table_agrees_with_kombu_literal_and_wildcard_keys() -> None:
    rng = random.Random(24)
    for _ in range(300):
        table = [
            Binding(".".join(rng.choice(["x", "y", "*", "#"]) for _ in range(rng.randint(1, 4))), "p", f"q{i}")
            for i in range(6)
        ]
        routing_key = ".".join(rng.choice(["x", "y", ""]) for _ in range(rng.randint(1, 5)))
        want = {b.queue for b in table if kombu_topic(b.routing_key, routing_key)}
        assert TopicTable.of(table).route(routing_key, RoutingBudget()) == want


def test_routing_work_is_bounded_per_poll_and_the_overflow_is_counted() -> None:
    # A tenant's worst shapes: 256 wildcard bindings and 255-character keys of 128 one-letter words.
    table = TopicTable.of([Binding("#." * 63 + f"b{i}", "p", f"q{i}") for i in range(256)])
    budget = RoutingBudget()
    started = time.perf_counter()
    routed = [table.route("a." * 125 + f"b{i:03d}", budget) for i in range(436)]  # 254 characters
    took = time.perf_counter() - started
    assert routed.count(None) == budget.refused > 400  # most pairs left unrouted, each counted
    assert budget.spent <= budget.steps
    assert took < 1.0  # unbounded it is 111,616 matches of ~1 ms: minutes


def test_literal_topic_keys_cost_one_lookup_whatever_their_number() -> None:
    table = TopicTable.of([Binding(f"orders.{i}", "p", f"q{i}") for i in range(256)])
    budget = RoutingBudget(steps=436)
    assert [table.route(f"orders.{i}", budget) for i in range(436)][:2] == [{"q0"}, {"q1"}]
    assert budget.refused == 0 and budget.spent == 436
