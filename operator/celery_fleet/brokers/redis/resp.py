"""A RESP parser for ``redis.asyncio`` that refuses a reply bigger than a byte bound before it
allocates it: whatever answers on a broker's address (a hostile server, a non-Redis service) cannot
make the operator hold more than the bound per reply. The connection is dropped on refusal (the
rest of the reply is never read), so nothing of it is left for the next command."""

from __future__ import annotations

from typing import Any, Final

from redis import exceptions as rexc
from redis._parsers import _AsyncRESP2Parser
from redis.maint_notifications import MaintNotificationsConfig

# Poll replies are at most ~4 MiB of binding members (scripts.ReplyBounds) plus lengths and pairs.
MAX_REPLY_BYTES: Final = 8 * 1024 * 1024
# Elements per reply: each costs a Python object and ~5 µs of parsing on the event loop, so a reply
# of millions of empty elements is bounded too (a poll reply has at most ~7,200: 1,024 lengths,
# 2,048 pair fields, 4,096 binding members).
MAX_REPLY_ELEMENTS: Final = 10_000
MAX_DEPTH: Final = 8  # the poll script's replies nest 3 deep; deeper would only grow the stack


class ReplyTooLarge(rexc.RedisError):
    """The server's reply passed the byte, element or nesting bound and was refused unread."""


class BoundedRESP2Parser(_AsyncRESP2Parser):
    """redis-py's pure-Python RESP2 parser with every length checked against what is left of the
    reply's budget before anything is read (hiredis, redis-py's default, reads whatever it is sent)."""

    max_reply_bytes: int = MAX_REPLY_BYTES

    async def read_response(self, disable_decoding: bool = False) -> Any:
        self._left = self.max_reply_bytes
        self._elements_left = MAX_REPLY_ELEMENTS
        self._depth = 0
        try:
            return await super().read_response(disable_decoding=disable_decoding)
        except ReplyTooLarge:
            self._clear()  # type: ignore[no-untyped-call]  # redis-py's parsers are untyped
            raise

    def _spend(self, cost: int) -> None:
        self._left -= cost
        if self._left < 0:
            raise ReplyTooLarge(f"a reply over {self.max_reply_bytes} bytes (refused unread, connection dropped)")

    async def _read_response(self, disable_decoding: bool = False) -> Any:
        raw = await self._readline()  # a line: bounded by the stream's limit (64 KiB)
        self._spend(len(raw))
        kind, rest = raw[:1], raw[1:]
        if kind == b"-":
            error = self.parse_error(rest.decode("utf-8", errors="replace"))  # type: ignore[no-untyped-call]
            if isinstance(error, rexc.ConnectionError):
                raise error
            return error
        if kind == b"+":
            return rest if disable_decoding or self.encoder is None else self.encoder.decode(rest)  # type: ignore[no-untyped-call]
        if kind not in (b":", b"$", b"*"):
            raise rexc.InvalidResponse(f"Protocol Error: {raw[:40]!r}")
        try:
            number = int(rest)
        except ValueError:
            raise rexc.InvalidResponse(f"Protocol Error: {raw[:40]!r}") from None
        if kind == b":":
            return number
        if number < 0:
            return None  # $-1 / *-1: nil
        if kind == b"$":
            self._spend(number)  # before a byte of it is read
            body = await self._read(number)
            return body if disable_decoding or self.encoder is None else self.encoder.decode(body)  # type: ignore[no-untyped-call]
        self._elements_left -= number  # before a list of that size is built
        if self._elements_left < 0:
            raise ReplyTooLarge(f"a reply of over {MAX_REPLY_ELEMENTS} elements (refused unread, connection dropped)")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise ReplyTooLarge(f"a reply nested over {MAX_DEPTH} deep (refused, connection dropped)")
        try:
            return [await self._read_response(disable_decoding) for _ in range(number)]
        finally:
            self._depth -= 1


# The client arguments that put the bound on every reply: our parser; RESP2 said explicitly, or
# redis-py 8 sends HELLO 3 on connect and reads its answer with its own, unbounded RESP3 parser (a
# fake server's 300 MiB "hello" reply was read whole); and no maintenance push handling (redis-py
# allows it only with its hiredis / RESP3 parsers).
BOUNDED_REPLIES: Final[dict[str, Any]] = {
    "parser_class": BoundedRESP2Parser,
    "protocol": 2,
    "maint_notifications_config": MaintNotificationsConfig(enabled=False),
}
