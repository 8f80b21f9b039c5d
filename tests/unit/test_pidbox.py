"""The pidbox wire format and reply filtering (pure): what we publish is what kombu's Mailbox
publishes, and only well-formed JSON replies with our ticket from a node we asked count."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from celery_fleet.brokers.control import CENSUS_CALLS, census_reports, confirmed
from celery_fleet.brokers.redis.pidbox import (
    MAX_TASKS_COUNTED,
    Call,
    Mailbox,
    RequestResult,
    decode_replies,
    request_envelope,
    summarize,
)

TICKETS = {"t-active": 0, "t-queues": 1}
CALLS = [Call("active"), Call("active_queues")]


def _reply(node: str, value: Any, *, ticket: str = "t-active", content_type: str = "application/json") -> bytes:
    """A reply as a Celery worker LPUSHes it (kombu's virtual transport envelope, base64 body)."""
    body = base64.b64encode(json.dumps({node: value}).encode()).decode()
    return json.dumps({
        "body": body, "content-encoding": "utf-8", "content-type": content_type,
        "headers": {"ticket": ticket, "clock": 3},
        "properties": {"delivery_mode": 1, "delivery_info": {"exchange": "reply.celery.pidbox", "routing_key": "o"},
                       "priority": 0, "body_encoding": "base64", "delivery_tag": "d"},
    }).encode()  # fmt: skip


def test_request_envelope_is_kombus() -> None:
    raw = request_envelope(Call("cancel_consumer", {"queue": "work"}), ["celery@a"], "tk", "oid",
                           clock=7, expires=123.5, tag="tag")  # fmt: skip
    envelope = json.loads(raw)
    assert envelope["content-type"] == "application/json" and envelope["content-encoding"] == "utf-8"
    assert envelope["headers"] == {"clock": 7, "expires": 123.5}
    assert envelope["properties"]["body_encoding"] == "base64"
    assert envelope["properties"]["delivery_info"] == {"exchange": "celery.pidbox", "routing_key": ""}
    assert envelope["properties"]["delivery_tag"] == "tag"
    assert json.loads(base64.b64decode(envelope["body"])) == {
        "method": "cancel_consumer", "arguments": {"queue": "work"}, "destination": ["celery@a"],
        "pattern": None, "matcher": None, "ticket": "tk",
        "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "oid"},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("mailbox", "channels", "node_table", "reply_member"),
    [
        pytest.param(Mailbox(), ["/0.celery.pidbox"], "_kombu.binding.celery.pidbox",
                     "o\x06\x16o\x06\x16o.reply.celery.pidbox", id="defaults"),
        pytest.param(Mailbox(keyprefix="t:", sep=":", db=3), ["t:/3.celery.pidbox"], "t:_kombu.binding.celery.pidbox",
                     "o:o:o.reply.celery.pidbox", id="prefix-sep-db"),
        pytest.param(Mailbox(db=2, sentinel=True), ["/2.celery.pidbox", "/{db}.celery.pidbox"],
                     "_kombu.binding.celery.pidbox", "o\x06\x16o\x06\x16o.reply.celery.pidbox",
                     id="sentinel-also-kombu-before-5.4"),
    ],
)  # fmt: skip
def test_mailbox_layout(mailbox: Mailbox, channels: list[str], node_table: str, reply_member: str) -> None:
    assert mailbox.fanout_channels() == channels
    assert mailbox.node_table == node_table
    assert mailbox.reply_member("o") == reply_member
    assert mailbox.reply_list("o") == mailbox.keyprefix + "o.reply.celery.pidbox"
    assert mailbox.node_member("celery@a") == f"{mailbox.sep}{mailbox.sep}celery@a.celery.pidbox"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(_reply("celery@a", [{}, {}]), {(0, "celery@a"): 2}, id="ours"),
        pytest.param(_reply("celery@a", [{"name": "q"}], ticket="t-queues"), {(1, "celery@a"): {"q"}}, id="queues"),
        pytest.param(_reply("celery@a", [{}], ticket="someone-else"), {}, id="other-ticket"),
        pytest.param(_reply("celery@x", [{}]), {}, id="node-not-asked"),
        pytest.param(_reply("celery@a", [{}], content_type="application/x-python-serialize"), {}, id="pickle"),
        pytest.param(_reply("celery@a", "busy"), {}, id="not-a-list"),
        pytest.param(b"\x80garbage", {}, id="not-json"),
        pytest.param(b"[" * 200_000 + b"]" * 200_000, {}, id="nested-past-the-parser-stack"),
        pytest.param(
            json.dumps(
                {
                    "headers": {"ticket": "t-active"},
                    "content-type": "application/json",
                    "properties": {"body_encoding": "base64"},
                    "body": base64.b64encode(b"[" * 200_000 + b"]" * 200_000).decode(),
                }
            ).encode(),
            {},
            id="body-nested-past-the-parser-stack",
        ),
        pytest.param(
            b'{"headers": {"ticket": "t-active"}, "content-type": "application/json", "properties": {}, "body": 5}',
            {},
            id="body-not-a-string",
        ),
        pytest.param(
            json.dumps(
                {
                    "headers": {"ticket": "t-active"},
                    "content-type": "application/json",
                    "properties": {"body_encoding": "base64"},
                    "body": "!!",
                }
            ).encode(),
            {},
            id="bad-base64",
        ),
    ],
)
def test_decode_replies(raw: bytes, expected: dict[tuple[int, str], Any]) -> None:
    answers, foreign = decode_replies([raw], CALLS, TICKETS, ["celery@a", "celery@b"])
    assert answers == expected
    # Ours but malformed (an answer that is not a list) is not foreign: the node simply did not answer.
    assert foreign == (0 if expected or raw == _reply("celery@a", "busy") else 1)


def test_two_nodes_in_one_reply_and_the_first_reply_wins() -> None:
    raws = [
        json.dumps({"headers": {"ticket": "t-active"}, "content-type": "application/json", "properties": {},
                    "body": json.dumps({"celery@a": [], "celery@b": []})}).encode(),
        _reply("celery@a", [1]),
        _reply("celery@a", [1, 2, 3]),
    ]  # fmt: skip
    assert decode_replies(raws, CALLS, TICKETS, ["celery@a", "celery@b"])[0] == {(0, "celery@a"): 1}


@pytest.mark.parametrize(
    ("method", "answer", "kept"),
    [
        pytest.param("reserved", [{}] * 3, 3, id="count"),
        pytest.param("scheduled", [0] * (MAX_TASKS_COUNTED + 5), MAX_TASKS_COUNTED, id="count-capped"),
        pytest.param("active_queues", [{"name": "a"}, {"name": 5}, "x", {"name": "b" * 2000}], {"a"}, id="names"),
        pytest.param("active_queues", {"name": "a"}, None, id="queues-not-a-list"),
        pytest.param("cancel_consumer", {"ok": "no longer consuming from 'q'"}, True, id="ok"),
        pytest.param("add_consumer", {"error": "nope"}, False, id="error"),
        pytest.param("rate_limit", {"ok": 1}, None, id="not-ours-to-read"),
    ],
)
def test_summaries_keep_counts_and_names_only(method: str, answer: Any, kept: Any) -> None:
    assert summarize(method, answer) == kept


def test_census_reports_need_all_four_answers() -> None:
    active, reserved, scheduled, queues = range(len(CENSUS_CALLS))
    result = RequestResult(
        answers={
            (active, "celery@a"): 1, (reserved, "celery@a"): 1, (scheduled, "celery@a"): 0,
            (queues, "celery@a"): frozenset({"work"}),
            (active, "celery@b"): 0, (reserved, "celery@b"): 0, (scheduled, "celery@b"): 2,
            (queues, "celery@b"): frozenset(),
            (active, "celery@c"): 0,  # answered one call only: silent
        },
        bound={"celery@c": True, "celery@d": False},
    )  # fmt: skip
    nodes = {f"celery@{p}": p for p in "abcd"}
    reports = census_reports(nodes, result)
    assert (reports["a"].held, reports["a"].queues, reports["a"].busy) == (2, {"work"}, True)
    assert (reports["b"].scheduled, reports["b"].queues, reports["b"].busy) == (2, frozenset(), False)
    assert (reports["c"].answered, reports["c"].remote_control, reports["c"].busy) == (False, True, True)
    assert (reports["d"].remote_control, reports["d"].busy) == (False, False)
    # A reply dropped unread may be d's: then d is not taken for a worker with remote control off.
    result.dropped = 1
    assert census_reports(nodes, result)["d"].busy


def test_confirmed_needs_ok_for_every_queue() -> None:
    result = RequestResult(answers={(0, "celery@a"): True, (1, "celery@a"): True, (0, "celery@b"): True,
                                    (1, "celery@b"): False})  # fmt: skip
    assert confirmed({"celery@a": "a", "celery@b": "b", "celery@c": "c"}, ["q1", "q2"], result) == {"a"}
