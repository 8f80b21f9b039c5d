"""The Redis depth reader without Redis: keys, the poll plan, reply parsing, routing, errors, URLs."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Sequence

import pytest
from redis import exceptions as rexc

from celery_fleet.api.models import ReplicaBounds, Tier
from celery_fleet.brokers import BrokerError, DepthReading, ErrorKind, QueueRef, observe_tiers, queue_refs, routing
from celery_fleet.brokers.redis import source as source_module
from celery_fleet.brokers.redis.poll import parse_poll, plan_poll, priority_key, queued_by_priority
from celery_fleet.brokers.redis.resp import BoundedRESP2Parser, ReplyTooLarge
from celery_fleet.brokers.redis.scripts import POLL_SCRIPT, Command, Reply
from celery_fleet.brokers.redis.source import RedisDepthSource
from celery_fleet.brokers.redis.target import RedisTarget, classify
from celery_fleet.brokers.source import KeyLayout
from celery_fleet.planning.scaling import Observation, ReadFailure, Reason, decide

SEP = "\x06\x16"
HIGH = QueueRef("high_priority")
LOW = QueueRef("low_priority")


@pytest.mark.parametrize(
    ("ref", "step", "key"),
    [
        pytest.param(HIGH, 0, "high_priority", id="step-0-is-the-bare-name"),
        pytest.param(HIGH, 3, f"high_priority{SEP}3", id="step-3-is-a-sub-list"),
        pytest.param(QueueRef("q", "app1:"), 0, "app1:q", id="prefix-on-the-bare-name"),
        pytest.param(QueueRef("q", "app1:"), 9, f"app1:q{SEP}9", id="prefix-on-a-sub-list"),
    ],
)
def test_priority_key(ref: QueueRef, step: int, key: str) -> None:
    assert priority_key(ref, step) == key


def test_plan_is_one_eval_per_prefix_reading_every_priority_list() -> None:
    refs = [*queue_refs(["b", "a"]), QueueRef("c", "p:", (0, 5))]
    plan = plan_poll(refs, scan_limit=123)
    assert plan.commands == (
        ("EVAL", POLL_SCRIPT, 10, "a", f"a{SEP}3", f"a{SEP}6", f"a{SEP}9", "b", f"b{SEP}3", f"b{SEP}6", f"b{SEP}9",
         "unacked", "unacked_index", 123, "_kombu.binding.", *BOUND_ARGS, 3600, *WALK_ARGS, 0),
        ("EVAL", POLL_SCRIPT, 4, "p:c", f"p:c{SEP}5", "p:unacked", "p:unacked_index", 123, "p:_kombu.binding.",
         *BOUND_ARGS, 3600, *WALK_ARGS, 0),
    )  # fmt: skip


BOUND_ARGS = (512, 16, 256, 1024, 255)
WALK_ARGS = (1024 * 1024, 8 * 1024 * 1024, 5_000, 8)  # value bound, bytes and µs per EVAL, TIME every 8
# The in-flight part of a reply that walked nothing: hlen, walked, unparsed, pairs, bindings, stale,
# next rank, too large, zcard, bytes read, why it stopped.
NOTHING: list[object] = [0, 0, 0, [], [], 0, 0, 0, 0, 0, b""]


def test_plan_cuts_a_huge_layout_into_bounded_evals_that_scan_once() -> None:
    refs = queue_refs([f"q{i}" for i in range(5)])  # 20 lists
    plan = plan_poll(refs, scan_limit=50, max_keys=8)
    assert [c[2] for c in plan.commands] == [10, 10, 6]  # lists + the unacked hash and its index
    assert [c[c[2] + 3] for c in plan.commands] == [50, -1, -1]  # only the first walks `unacked`
    lengths = [[1] * 8, [1] * 8, [1] * 4]
    replies = [[lengths[0], *script_reply(0, [])], [lengths[1], *NOTHING], [lengths[2], *NOTHING]]
    reading = parse_poll(plan, replies)
    assert reading.observe(refs) == Observation(20, 0)


def test_without_ack_emulation_the_unacked_hash_is_not_read() -> None:
    refs = queue_refs(["q"], layout=KeyLayout(ack_emulation=False))
    (command,) = plan_poll(refs, scan_limit=50).commands
    assert command[command[2] + 3] == -1


def script_reply(
    size: int,
    pairs: Sequence[tuple[str, str, int] | tuple[str, str, int, int]],
    bindings: dict[str, list[str]] | None = None,
    **kw: int,
) -> list[object]:
    """The in-flight part of the poll script's reply (after the list lengths); a pair's 4th item:
    how many of its entries are past the visibility timeout."""
    flat_pairs: list[object] = []
    for ex, rk, n, *old in pairs:
        flat_pairs += [ex.encode(), rk.encode(), n, old[0] if old else 0]
    flat_bindings: list[object] = []
    for ex, members in (bindings or {}).items():
        flat_bindings += [ex.encode(), [m.encode() for m in members]]
    scanned = kw.get("scanned", size)
    tail = [kw.get("next_rank", 0), kw.get("too_large", 0), size, 0, b""]
    stale = kw.get("stale", sum(p[3] for p in pairs if len(p) == 4))
    return [size, scanned, kw.get("unparsed", 0), flat_pairs, flat_bindings, stale, *tail]


def poll(
    refs: Sequence[QueueRef], lengths: Sequence[Reply], inflight: Sequence[Reply] | BaseException = ()
) -> DepthReading:
    """Parse a one-prefix poll whose script answered `lengths` and `inflight` (or failed as a whole)."""
    if isinstance(inflight, BaseException):
        return parse_poll(plan_poll(refs), [inflight])
    return parse_poll(plan_poll(refs), [[list(lengths), *(inflight or script_reply(0, []))]])


def test_depth_sums_every_priority_list() -> None:
    reading = poll([HIGH, LOW], [1, 2, 3, 4, 0, 0, 0, 5])
    assert reading.depth(HIGH) == 10
    assert reading.observe([HIGH, LOW]) == Observation(15, 0)
    assert queued_by_priority(reading) == {
        ("high_priority", 0): 1, ("high_priority", 3): 2, ("high_priority", 6): 3, ("high_priority", 9): 4,
        ("low_priority", 0): 0, ("low_priority", 3): 0, ("low_priority", 6): 0, ("low_priority", 9): 5,
    }  # fmt: skip


def test_prioritised_messages_only_still_scale_the_tier() -> None:
    # What plain `LLEN high_priority` (KEDA, celery-exporter) reads as 0.
    reading = poll([HIGH], [0, 30, 0, 15])
    seen = observe_tiers(reading, {"high": [HIGH]})
    assert seen == {"high": Observation(45, 0)}
    tier = Tier(name="high", queues=["high_priority"], concurrency=4, replicas=ReplicaBounds(min=2, max=8))
    (d,) = decide([tier], seen, {"high": 2}, {}, now=0.0)
    assert (d.desired, d.reason) == (5, Reason.QUEUE_BACKLOG)


@pytest.mark.parametrize(
    ("pairs", "bindings", "expect_high", "expect_low", "unattributed"),
    [
        pytest.param(
            [("high_priority", "high_priority", 7)],
            {"high_priority": [f"high_priority{SEP}{SEP}high_priority"]},
            7,
            0,
            0,
            id="celery-default-direct-exchange",
        ),
        pytest.param([("high_priority", "high_priority", 7)], {}, 0, 0, 7, id="no-binding-delivers-nowhere"),
        pytest.param([("", "low_priority", 2)], {}, 0, 2, 0, id="anonymous-exchange-routing-key-is-queue"),
        pytest.param(
            [("tasks", "urgent", 4)],
            {"tasks": [f"urgent{SEP}{SEP}high_priority", f"bulk{SEP}{SEP}low_priority"]},
            4,
            0,
            0,
            id="direct-binding-table",
        ),
        pytest.param(
            [("events", "user.signup", 3), ("events", "report.daily", 1)],
            {"events": [f"user.*{SEP}^user\\.[^.]+$" + f"{SEP}high_priority", f"#{SEP}^.*$" + f"{SEP}low_priority"]},
            3,
            4,
            0,
            id="topic-binding-patterns",
        ),
        pytest.param([("", "someone_elses_queue", 9)], {}, 0, 0, 0, id="unwatched-queue-ignored"),
        pytest.param([("", "", 2)], {}, 0, 0, 2, id="no-routing-key-unattributed"),
    ],
)
def test_in_flight_routing(
    pairs: list[tuple[str, str, int]],
    bindings: dict[str, list[str]],
    expect_high: int,
    expect_low: int,
    unattributed: int,
) -> None:
    size = sum(n for *_, n in pairs)
    reading = poll([HIGH, LOW], [0] * 8, script_reply(size, pairs, bindings))
    assert reading.observe([HIGH]) == Observation(0, expect_high)
    assert reading.observe([LOW]) == Observation(0, expect_low)
    assert reading.unacked[KeyLayout()].unattributed == unattributed


def test_a_shared_routing_key_counts_once_per_tier_and_once_per_queue() -> None:
    # kombu copies the message into both bound queues; the copies share one delivery tag.
    bindings = {"tasks": [f"k{SEP}{SEP}high_priority", f"k{SEP}{SEP}low_priority"]}
    reading = poll([HIGH, LOW], [0] * 8, script_reply(3, [("tasks", "k", 3)], bindings))
    assert reading.observe([HIGH]) == Observation(0, 3)
    assert reading.observe([LOW]) == Observation(0, 3)
    assert reading.observe([HIGH, LOW]) == Observation(0, 3)


def test_fanout_exchange_named_in_the_layout_reaches_every_bound_queue() -> None:
    layout = KeyLayout(fanout_exchanges=("bcast",))
    refs = queue_refs(["high_priority", "low_priority"], layout=layout)
    bindings = {"bcast": [f"x{SEP}{SEP}high_priority", f"y{SEP}{SEP}low_priority"]}
    reading = parse_poll(plan_poll(refs), [[[0] * 8, *script_reply(2, [("bcast", "whatever", 2)], bindings)]])
    assert reading.observe(refs[:1]) == Observation(0, 2) and reading.observe(refs[1:]) == Observation(0, 2)


def test_a_binding_table_too_big_to_read_leaves_its_messages_unattributed() -> None:
    reply = script_reply(5, [("big", "k", 5)])
    reply[4] = [b"big", 100_000]  # the script answers SCARD instead of the members
    reading = poll([HIGH], [0] * 4, reply)
    assert reading.observe([HIGH]) == Observation(0, 0)
    assert reading.unacked[KeyLayout()].unattributed == 5


def test_an_unfinished_first_walk_extrapolates_and_says_so() -> None:
    reading = poll([HIGH], [0] * 4, script_reply(100_000, [("", "high_priority", 1000)], scanned=10_000))
    assert reading.observe([HIGH]) == Observation(0, 1000, in_flight_exact=False)  # parse_poll: this walk only
    fake = FakeRedis({}, script=script_reply(100_000, [("", "high_priority", 1000)], scanned=10_000, next_rank=10_000))
    reading = asyncio.run(RedisDepthSource(fake, TARGET).read([HIGH]))
    assert reading.observe([HIGH]) == Observation(0, 10_000, in_flight_exact=False)
    assert not reading.unacked[KeyLayout()].exact


def test_queue_with_a_non_list_key_fails_only_its_tier() -> None:
    wrongtype = rexc.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
    reading = poll([HIGH, LOW], [1, 0, 0, 0, wrongtype, 0, 0, 0])
    seen = observe_tiers(reading, {"high": [HIGH], "low": [LOW]})
    assert seen["high"] == Observation(1, 0)
    assert isinstance(seen["low"], ReadFailure) and "WRONGTYPE" in seen["low"].message


def test_failed_script_fails_every_tier_of_the_prefix() -> None:
    reading = poll([HIGH], [], rexc.ResponseError("ERR Error running script (call to f_1234): @user_script:12"))
    seen = reading.observe([HIGH])
    assert isinstance(seen, ReadFailure) and seen.kind == "ResponseError" and "Error running script" in seen.message


def test_unexpected_script_reply_is_an_error() -> None:
    with pytest.raises(BrokerError) as err:
        parse_poll(plan_poll([HIGH]), [[[0, 0], *NOTHING]])  # 2 lengths for 4 lists
    assert err.value.kind is ErrorKind.RESPONSE_ERROR


def test_malformed_in_flight_part_makes_in_flight_unknown() -> None:
    reading = poll([HIGH], [3, 0, 0, 0], [0, 0, 0, b"not-a-list", *NOTHING[4:]])
    assert reading.depth(HIGH) == 3
    seen = reading.observe([HIGH])
    assert isinstance(seen, ReadFailure) and "in-flight count unknown" in seen.message


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(rexc.ResponseError("NOAUTH Authentication required."), id="noauth"),
        pytest.param(rexc.NoPermissionError("NOPERM this user has no permissions to run 'eval'"), id="noperm"),
        pytest.param(rexc.ResponseError("Protocol error: unauthenticated multibulk length"), id="resp2-no-auth"),
    ],
)
def test_auth_error_in_a_reply_fails_the_poll(reply: Exception) -> None:
    with pytest.raises(BrokerError) as err:
        poll([HIGH], [], reply)
    assert err.value.kind is ErrorKind.AUTH_FAILED


def test_wrong_number_of_replies_is_an_error() -> None:
    with pytest.raises(BrokerError) as err:
        parse_poll(plan_poll([HIGH]), [])
    assert err.value.kind is ErrorKind.RESPONSE_ERROR


def test_observe_tiers_on_failure_fails_every_tier() -> None:
    err = BrokerError(ErrorKind.TIMEOUT, "no answer in time from r:6379/0")
    assert observe_tiers(err, {"a": [HIGH], "b": [LOW]}) == {
        "a": ReadFailure("Timeout", err.message),
        "b": ReadFailure("Timeout", err.message),
    }


# -- URLs and errors ----------------------------------------------------------------------------------------

PASSWORD = "s3cr3t/pa:ss"
URL = "rediss://celery:s3cr3t%2Fpa%3Ass@redis.prod.svc:6380/2?ssl_cert_reqs=CERT_REQUIRED"
TARGET = RedisTarget.parse(URL)


def test_target_shows_no_credentials() -> None:
    assert TARGET.display == "redis.prod.svc:6380/2 (TLS)"
    assert PASSWORD not in repr(TARGET) and "s3cr3t" not in str(TARGET)
    assert "ssl_cert_reqs=required" in TARGET.url  # Celery's spelling, translated for redis-py


@pytest.mark.parametrize(
    ("url", "display"),
    [
        pytest.param("redis://localhost", "localhost:6379/0", id="defaults"),
        pytest.param("redis://:pw@10.0.0.1:7000/3", "10.0.0.1:7000/3", id="password-only"),
    ],
)
def test_target_display(url: str, display: str) -> None:
    assert RedisTarget.parse(url).display == display


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("amqp://guest:guest@rabbit//", id="other-scheme"),
        pytest.param("redis://host:notaport/0", id="bad-port"),
    ],
)
def test_target_rejects_unusable_urls_without_echoing_them(url: str) -> None:
    with pytest.raises(BrokerError) as err:
        RedisTarget.parse(url)
    assert err.value.kind is ErrorKind.INVALID_URL
    assert "guest" not in str(err.value) and "notaport" not in str(err.value)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        pytest.param(rexc.AuthenticationError(f"invalid password {PASSWORD}"), ErrorKind.AUTH_FAILED, id="auth"),
        pytest.param(
            rexc.ResponseError("WRONGPASS invalid username-password pair"), ErrorKind.AUTH_FAILED, id="wrongpass"
        ),
        pytest.param(rexc.TimeoutError("Timeout reading from socket"), ErrorKind.TIMEOUT, id="read-timeout"),
        pytest.param(TimeoutError(), ErrorKind.TIMEOUT, id="deadline"),
        pytest.param(
            rexc.ConnectionError(f"Error 111 connecting to {URL}. Connection refused."),
            ErrorKind.UNREACHABLE,
            id="refused",
        ),
        pytest.param(ssl.SSLError(1, "[SSL: CERTIFICATE_VERIFY_FAILED]"), ErrorKind.UNREACHABLE, id="tls"),
        pytest.param(OSError(-2, "Name or service not known"), ErrorKind.UNREACHABLE, id="dns"),
        pytest.param(
            rexc.BusyLoadingError("LOADING Redis is loading the dataset"), ErrorKind.UNREACHABLE, id="loading"
        ),
        pytest.param(rexc.ResponseError("ERR unknown command"), ErrorKind.RESPONSE_ERROR, id="error-reply"),
        pytest.param(ValueError(f"Invalid value for 'db' in {URL}"), ErrorKind.INVALID_URL, id="bad-url-option"),
    ],
)
def test_classify(exc: BaseException, kind: ErrorKind) -> None:
    err = classify(exc, TARGET)
    assert err.kind is kind
    text = str(err)
    assert "redis.prod.svc:6380/2" in text
    for secret in (PASSWORD, "s3cr3t", "s3cr3t%2Fpa%3Ass"):
        assert secret not in text


# -- the source, over a fake round trip ------------------------------------------------------------------------


class FakeRedis:
    """Answers a poll from in-memory lists; records the round trips it served."""

    def __init__(self, lists: dict[str, int], script: list[object] | None = None) -> None:
        self.lists = lists
        self.script = script if script is not None else NOTHING
        self.round_trips: list[Sequence[Command]] = []
        self.fail: BaseException | None = None

    async def __call__(self, commands: Sequence[Command]) -> list[Reply]:
        self.round_trips.append(commands)
        if self.fail is not None:
            raise self.fail
        replies: list[Reply] = []
        for c in commands:
            assert c[0] == "EVAL_RO"  # read-only scripts: the ACL user needs no EVAL
            keys = [str(k) for k in c[3 : 3 + int(c[2])]]
            replies.append([[self.lists.get(k, 0) for k in keys[:-2]], *self.script])
        return replies


def test_source_reads_in_one_round_trip() -> None:
    fake = FakeRedis({"high_priority": 2, f"high_priority{SEP}6": 40, "low_priority": 1})
    source = RedisDepthSource(fake, TARGET)
    reading = asyncio.run(source.read(queue_refs(["high_priority", "low_priority"])))
    assert len(fake.round_trips) == 1
    assert reading.observe([HIGH]) == Observation(42, 0)


def test_redis_without_eval_ro_falls_back_to_eval_once() -> None:
    fake = FakeRedis({"high_priority": 2})
    seen: list[str] = []

    async def redis6(commands: Sequence[Command]) -> list[Reply]:
        seen.append(str(commands[0][0]))
        if commands[0][0] == "EVAL_RO":
            return [rexc.ResponseError("ERR unknown command 'EVAL_RO'") for _ in commands]
        return await fake([("EVAL_RO", *c[1:]) for c in commands])

    source = RedisDepthSource(redis6, TARGET)
    for _ in range(2):
        assert asyncio.run(source.read([HIGH])).observe([HIGH]) == Observation(2, 0)
    assert seen == ["EVAL_RO", "EVAL", "EVAL"]


def test_source_failure_is_classified_and_scrubbed() -> None:
    fake = FakeRedis({})
    fake.fail = rexc.ConnectionError(f"Error connecting with {URL} (password {PASSWORD})")
    with pytest.raises(BrokerError) as err:
        asyncio.run(RedisDepthSource(fake, TARGET).read([HIGH]))
    assert err.value.kind is ErrorKind.UNREACHABLE
    assert PASSWORD not in str(err.value) and "s3cr3t" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no traceback chain with the URL


def test_source_never_shows_its_url() -> None:
    source = RedisDepthSource(FakeRedis({}), TARGET)
    assert "s3cr3t" not in repr(source) and "s3cr3t" not in repr(source.target)


class StepClock:
    """Each call advances 10 ms, so every poll "takes" 10 ms; `now` can be moved on by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.010
        return self.now


def limits(fake: FakeRedis) -> list[int]:
    return [int(c[3 + int(c[2])]) for c in fake.round_trips[-1]]


def test_in_flight_walk_is_held_to_its_budget_of_redis_time() -> None:
    fake = FakeRedis({"high_priority": 1}, script=[50, 50, 0, [b"", b"high_priority", 50, 0], [], 0, 0, 0, 50, 0, b""])
    clock = StepClock()
    source = RedisDepthSource(fake, TARGET, inflight_budget=0.02, clock=clock)  # 10 ms poll -> walk every 0.5 s

    async def main() -> None:
        first = await source.read([HIGH])
        assert limits(fake) == [source.scan_limit] and first.observe([HIGH]) == Observation(1, 50)
        fake.script = [60, *NOTHING[1:]]  # what a skipped walk answers: HLEN only
        second = await source.read([HIGH])
        assert limits(fake) == [0]
        assert second.observe([HIGH]) == Observation(1, 50)  # the last counts, with their age
        assert second.unacked[KeyLayout()].age_seconds == pytest.approx(0.02)
        third = await source.read([HIGH, LOW])  # a queue the last walk did not count: walk now
        assert limits(fake) == [source.scan_limit] and third.unacked[KeyLayout()].age_seconds == 0
        clock.now += 0.5
        await source.read([HIGH, LOW])
        assert limits(fake) == [source.scan_limit]

    asyncio.run(main())


def test_zero_budget_walks_every_poll() -> None:
    fake = FakeRedis({})
    source = RedisDepthSource(fake, TARGET, inflight_budget=0)
    for _ in range(3):
        asyncio.run(source.read([HIGH]))
        assert limits(fake) == [source.scan_limit]


def test_a_classified_failure_reaches_the_event_readable_and_without_secrets() -> None:
    err = classify(rexc.ConnectionError(f"Error 111 connecting to {URL}. Connection refused."), TARGET)
    tier = Tier(name="high", queues=["high_priority"], concurrency=4, replicas=ReplicaBounds(min=2, max=8))
    (d,) = decide([tier], observe_tiers(err, {"high": [HIGH]}), {"high": 3}, {}, now=0.0)
    assert (d.desired, d.reason) == (3, Reason.BROKER_UNREACHABLE)
    assert "broker read failed (Unreachable: cannot reach redis.prod.svc:6380/2 (TLS)" in d.message
    assert "s3cr3t" not in d.message and "://" not in d.message


def test_the_documented_acl_line_is_the_one_the_tests_use() -> None:
    from pathlib import Path

    from celery_fleet.brokers.redis.scripts import READER_ACL

    doc = (Path(__file__).resolve().parents[2] / "docs" / "install.md").read_text()
    assert f"ACL SETUSER celery-fleet on >PASSWORD {READER_ACL.removeprefix('on ')}\n" in doc


def test_the_same_answer_keeps_its_revision_and_a_new_one_gets_another() -> None:
    fake = FakeRedis({"high_priority": 2})
    source = RedisDepthSource(fake, TARGET)

    async def polls() -> list[DepthReading]:
        # The first poll walks `unacked`, the next ones reuse that walk (its budget): same commands.
        readings = [await source.read([HIGH]) for _ in range(3)]
        fake.lists["high_priority"] = 3
        return [*readings[1:], await source.read([HIGH])]

    first, same, changed = asyncio.run(polls())
    assert first.revision is not None and same.revision == first.revision  # an idle broker: nothing to parse
    assert same.observe([HIGH]) == Observation(2, 0)
    assert changed.revision not in (None, first.revision) and changed.observe([HIGH]) == Observation(3, 0)


def test_a_queue_that_did_not_change_keeps_its_revision_when_others_did() -> None:
    low = QueueRef("low_priority")
    fake = FakeRedis({"high_priority": 2, "low_priority": 1})
    source = RedisDepthSource(fake, TARGET)

    async def polls() -> list[DepthReading]:
        first = await source.read([HIGH, low])
        fake.lists["high_priority"] = 7
        return [first, await source.read([HIGH, low])]

    first, second = asyncio.run(polls())
    assert second.revision != first.revision
    assert second.unchanged_since(first.revision or 0, [low])  # its pool need not be observed again
    assert not second.unchanged_since(first.revision or 0, [HIGH])
    assert not second.unchanged_since(first.revision or 0, [QueueRef("never_polled")])


# -- unacked entries past the visibility timeout (stale: kombu would restore them now)


@pytest.mark.parametrize(
    ("pairs", "scanned", "in_flight", "stale"),
    [
        pytest.param([("", "high_priority", 5, 2)], None, 3, 2, id="stale-taken-out-of-in-flight"),
        pytest.param([("", "high_priority", 4, 4)], None, 0, 4, id="all-stale-holds-nothing"),
        pytest.param([("", "high_priority", 3, 0), ("", "low_priority", 2, 2)], None, 3, 0, id="other-queue-stale"),
        pytest.param([("", "high_priority", 10, 5)], 10, 5, 5, id="parse-counts-what-it-walked"),
    ],
)
def test_stale_unacked_is_reported_apart_from_in_flight(
    pairs: list[tuple[str, str, int, int]], scanned: int | None, in_flight: int, stale: int
) -> None:
    size = 100 if scanned else sum(p[2] for p in pairs)
    reading = poll([HIGH, LOW], [0] * 8, script_reply(size, pairs, scanned=scanned or size))
    obs = reading.observe([HIGH])
    assert isinstance(obs, Observation)
    assert (obs.in_flight, obs.stale_unacked) == (in_flight, stale)
    assert reading.unacked[HIGH.layout].stale == sum(p[3] for p in pairs)


def test_stale_counted_beyond_the_entries_makes_in_flight_unknown() -> None:
    # Bytes from a user's Redis: a reply claiming more stale entries than it has is not believed.
    reading = poll([HIGH], [0] * 4, script_reply(3, [("", "high_priority", 3, 4)]))
    assert isinstance(reading.observe([HIGH]), ReadFailure)


def test_visibility_timeout_is_the_scripts_last_argument_and_splits_layouts() -> None:
    short = queue_refs(["a"], layout=KeyLayout(visibility_timeout=30))
    plan = plan_poll([*short, *queue_refs(["b"])])
    assert sorted(c[int(c[2]) + 3 + 7] for c in plan.commands) == [30, 3600]


@pytest.mark.parametrize(
    ("current", "desired", "said"),
    [
        pytest.param(3, 1, "3 past the visibility timeout, not in flight", id="three-held-by-dead-workers-go-to-one"),
        pytest.param(0, 1, "one worker for kombu to restore 3 message(s)", id="a-tier-at-zero-gets-a-restorer"),
        pytest.param(1, 1, "3 past the visibility timeout", id="the-restorer-stays-while-they-are-stale"),
    ],
)
def test_stale_unacked_asks_for_one_worker_never_more(current: int, desired: int, said: str) -> None:
    # Not work anyone holds; but kombu restores them only from a live consumer of the broker.
    tier = Tier(name="high", queues=["high_priority"], concurrency=1, replicas=ReplicaBounds(min=0, max=4),
                autoscaling={"targetDepthPerReplica": 1, "scaleDownStabilizationSeconds": 0,
                             "cooldownSeconds": 0})  # fmt: skip
    reading = poll([HIGH], [0] * 4, script_reply(3, [("", "high_priority", 3, 3)]))
    (d,) = decide([tier], observe_tiers(reading, {"high": [HIGH]}), {"high": current}, {}, now=100.0)
    assert (d.desired, d.stale_unacked, d.in_flight) == (desired, 3, 0), d.message
    assert said in d.message


def test_polls_that_alternate_walking_unacked_keep_their_revisions() -> None:
    source = RedisDepthSource(FakeRedis({"high_priority": 2}), TARGET)

    async def polls() -> list[DepthReading]:
        out = []
        for _ in range(2):
            source._next_scan_at = 0.0  # the walk's budget is back: this poll walks `unacked`
            out.append(await source.read([HIGH]))
            out.append(await source.read([HIGH]))  # and this one reuses that walk
        return out

    walk1, reuse1, walk2, reuse2 = asyncio.run(polls())
    assert (walk2.revision, reuse2.revision) == (walk1.revision, reuse1.revision)


# -- cost budgets: walks over several polls, our own slow script, replies bounded in bytes -----------------


def test_a_walk_cut_by_its_budget_goes_on_next_poll_and_publishes_when_whole() -> None:
    def chunk(walked: int, next_rank: int, n: int, stopped: bytes) -> list[object]:
        return [300, walked, 0, [b"", b"high_priority", n, 0], [], 0, next_rank, 0, 300, 0, stopped]

    fake = FakeRedis({}, script=chunk(100, 100, 10, b"time"))
    source = RedisDepthSource(fake, TARGET, inflight_budget=0)  # walk every poll

    async def main() -> list[DepthReading]:
        readings = [await source.read([HIGH])]
        fake.script = chunk(100, 200, 20, b"bytes")
        readings.append(await source.read([HIGH]))
        fake.script = chunk(100, 0, 30, b"")
        readings.append(await source.read([HIGH]))
        fake.script = chunk(100, 100, 0, b"time")  # a new walk from rank 0: the whole one stands meanwhile
        readings.append(await source.read([HIGH]))
        return readings

    first, second, whole, next_walk = asyncio.run(main())
    ranks = [c[0][-1] for c in fake.round_trips]
    assert ranks == [0, 100, 200, 0]  # each EVAL resumes where the last stopped
    assert first.observe([HIGH]) == Observation(0, 30, in_flight_exact=False)  # 10 of 100 walked, x3
    assert second.observe([HIGH]) == Observation(0, 45, in_flight_exact=False)  # 30 of 200, x1.5
    assert whole.observe([HIGH]) == Observation(0, 60, in_flight_exact=True)
    assert whole.unacked[KeyLayout()].scanned == 300 and whole.unacked[KeyLayout()].walk_stopped == "time"
    assert next_walk.observe([HIGH]) == Observation(0, 60, in_flight_exact=True)


def test_values_too_large_to_read_are_counted_as_unattributed() -> None:
    reading = poll([HIGH], [0] * 4, script_reply(10, [("", "high_priority", 6)], too_large=4))
    summary = reading.unacked[KeyLayout()]
    assert (summary.too_large, summary.unattributed) == (4, 4)


def test_routing_past_the_polls_budget_is_counted_unrouted() -> None:
    bindings = {"topic": [f"a.*{SEP}p{SEP}high_priority"]}
    pairs = [("topic", f"a.{i}", 1) for i in range(10)]
    reading = parse_poll(
        plan_poll([HIGH]),
        [[[0] * 4, *script_reply(10, pairs, bindings)]],
        budget=routing.RoutingBudget(steps=3 * (2 + 2 * 3)),  # three keys' lookup and match
    )
    summary = reading.unacked[KeyLayout()]
    assert (summary.unrouted, summary.unattributed) == (7, 7)
    assert reading.observe([HIGH]) == Observation(0, 3)


class StalledRedis:
    """Answers the first poll, then (like Redis running a slow script) raises `fail`."""

    def __init__(self, fail: BaseException, answer_first: bool = True) -> None:
        self.fake = FakeRedis({"high_priority": 1})
        self.fail = fail
        self.calls = 0
        self.answer_first = answer_first

    async def __call__(self, commands: Sequence[Command]) -> list[Reply]:
        self.calls += 1
        if self.calls == 1 and self.answer_first:
            return await self.fake(commands)
        raise self.fail


@pytest.mark.parametrize(
    ("answer_first", "kind"),
    [
        pytest.param(True, ErrorKind.OWN_POLL_SLOW, id="a-broker-that-answered-times-out-on-our-walk"),
        pytest.param(False, ErrorKind.TIMEOUT, id="a-broker-that-never-answered-is-a-timeout"),
    ],
)
def test_a_timeout_while_our_script_walks_is_about_us(answer_first: bool, kind: ErrorKind) -> None:
    stalled = StalledRedis(rexc.TimeoutError("Timeout reading from socket"), answer_first)
    source = RedisDepthSource(stalled, TARGET, inflight_budget=0.02)
    source._next_scan_at = 0.0

    async def main() -> BrokerError:
        if answer_first:
            await source.read([HIGH])
            source._next_scan_at = 0.0  # the walk is due again
        with pytest.raises(BrokerError) as err:
            await source.read([HIGH])
        return err.value

    err = asyncio.run(main())
    assert err.kind is kind
    if kind is ErrorKind.OWN_POLL_SLOW:
        assert "poll script" in err.message and err.retry_after > 0
        assert source._next_scan_at > 0  # the next polls read lengths only for a while


def test_busy_while_we_walk_is_our_own_slow_script() -> None:
    fake = FakeRedis({})

    async def busy(commands: Sequence[Command]) -> list[Reply]:
        await fake(commands)
        return [rexc.ResponseError("BUSY Redis is busy running a script.") for _ in commands]

    with pytest.raises(BrokerError) as err:
        asyncio.run(RedisDepthSource(busy, TARGET).read([HIGH]))
    assert err.value.kind is ErrorKind.OWN_POLL_SLOW


def bounded_parse(data: bytes, limit: int = 1024) -> object:
    async def main() -> object:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        parser = BoundedRESP2Parser(socket_read_size=65536)
        parser.max_reply_bytes = limit
        parser.on_connect(type("Conn", (), {"_reader": reader, "encoder": None})())
        return await parser.read_response(disable_decoding=True)

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        pytest.param(b"*3\r\n:1\r\n$3\r\nabc\r\n*1\r\n$-1\r\n", [1, b"abc", [None]], id="poll-shaped"),
        pytest.param(b"+OK\r\n", b"OK", id="simple"),
        pytest.param(b"*-1\r\n", None, id="nil-array"),
    ],
)
def test_bounded_parser_reads_replies_within_the_bound(data: bytes, reply: object) -> None:
    assert bounded_parse(data) == reply


def test_bounded_parser_returns_error_replies() -> None:
    assert isinstance(bounded_parse(b"-WRONGTYPE nope\r\n"), rexc.ResponseError)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"$314572800\r\n" + b"x" * 64, id="a-300-MiB-bulk-string"),
        pytest.param(b"*100000000\r\n:1\r\n", id="a-hundred-million-elements"),
        pytest.param(b"*1\r\n" * 20 + b":1\r\n", id="nested-past-the-depth-bound"),
        pytest.param(b"*20\r\n" + (b"$60\r\n" + b"y" * 60 + b"\r\n") * 20, id="many-small-strings-over-the-total"),
        pytest.param(b"*10001\r\n" + b":1\r\n" * 10001, id="one-element-past-the-count-bound"),
    ],
)
def test_bounded_parser_refuses_a_reply_over_the_bound_before_reading_it(data: bytes) -> None:
    with pytest.raises(ReplyTooLarge):
        bounded_parse(data)


def test_a_reply_too_large_is_named_and_never_unreachable() -> None:
    async def huge(commands: Sequence[Command]) -> list[Reply]:
        raise ReplyTooLarge("a reply over 8388608 bytes")

    with pytest.raises(BrokerError) as err:
        asyncio.run(RedisDepthSource(huge, TARGET).read([HIGH]))
    assert err.value.kind is ErrorKind.REPLY_TOO_LARGE


def test_a_walk_under_way_for_queues_no_longer_polled_is_left_alone() -> None:
    fake = FakeRedis({}, script=[300, 100, 0, [], [], 0, 100, 0, 300, 0, b"time"])
    source = RedisDepthSource(fake, TARGET, inflight_budget=0)
    other = QueueRef("other", "p:")

    async def main() -> DepthReading:
        await source.read([HIGH])
        await source.read([other])  # the walk of the first layout is not resumed here
        return await source.read([HIGH, LOW])  # its queues changed: it starts again

    reading = asyncio.run(main())
    assert [c[0][-1] for c in fake.round_trips] == [0, 0, 0]
    assert reading.unacked[KeyLayout()].scanned == 100


def test_a_parse_past_its_deadline_is_about_us_and_holds_the_next_parse() -> None:
    fake = FakeRedis({"high_priority": 1})
    source = RedisDepthSource(fake, TARGET, parse_deadline_seconds=0.05)
    release = threading.Event()
    real = parse_poll

    def slow_parse(*args: object, **kwargs: object) -> DepthReading:
        release.wait(5)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    async def main() -> list[BrokerError]:
        errors = []
        for _ in range(2):
            with pytest.raises(BrokerError) as err:
                await source.read([HIGH])
            errors.append(err.value)
        release.set()
        return errors

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(source_module, "parse_poll", slow_parse)
        overran, held = asyncio.run(main())
    assert overran.kind is held.kind is ErrorKind.OWN_POLL_SLOW
    assert "took over" in overran.message and "still parsing" in held.message  # one parse per broker at a time
    assert overran.retry_after == held.retry_after == 0.05
