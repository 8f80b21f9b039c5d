"""Routing as kombu routes, without compiling a regex taken from Redis."""

from __future__ import annotations

import itertools
import random
import time

import pytest
from kombu.transport.virtual.exchange import TopicExchange

from celery_fleet.brokers.routing import Binding, parse_binding, route, topic_matches

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
