"""The control path honours the broker destination policy as the poll path does: a refused broker
gets ControlError and not a single connection (a drain resumed after a restart included)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from celery_fleet.brokers.control import ControlError, ControlTarget, PidboxControl
from celery_fleet.planning.broker_policy import BrokerPolicy


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(BrokerPolicy.build(), id="loopback-denied-by-default"),
        pytest.param(BrokerPolicy.build(allowed=["10.0.0.0/8"], denied=["127.0.0.0/8"]), id="explicit-deny"),
    ],
)
def test_a_refused_broker_is_never_connected(policy: BrokerPolicy) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        target = ControlTarget(f"redis://:secret-pw@127.0.0.1:{port}/0")

        async def run() -> None:
            control = PidboxControl(policy=policy)
            try:
                for call in (
                    control.census(target, ["p0"], deadline=time.monotonic() + 1),
                    control.add_consumer(target, ["p0"], ["q"], deadline=time.monotonic() + 1),
                ):
                    with pytest.raises(ControlError) as caught:
                        await call
                    assert "secret-pw" not in str(caught.value)
                    assert "policy" in str(caught.value).lower() or "loopback" in str(caught.value).lower()
            finally:
                await control.aclose()

        asyncio.run(run())
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody ever connected
