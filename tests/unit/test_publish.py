"""publish_confirmed: one deadline for the whole publish, reconnection included."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pamqp.commands import Basic

from worker import broker
from worker.broker import BROKER_FAULTS, publish_confirmed


class Reconnecting:
    """A robust channel whose connection never comes back: its underlay is never handed out."""

    async def get_underlay_channel(self) -> Any:
        await asyncio.Event().wait()


class Recording:
    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []

    async def get_underlay_channel(self) -> Recording:
        return self

    async def basic_publish(self, body: bytes, **kwargs: Any) -> None:
        self.published.append({"body": body, **kwargs})


async def test_waiting_for_a_reconnect_counts_against_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(broker, "PUBLISH_TIMEOUT_S", 0.05)
    publish = publish_confirmed(
        Reconnecting(),  # type: ignore[arg-type]
        exchange="",
        routing_key="q",
        body=b"{}",
        properties=Basic.Properties(),
    )

    async with asyncio.timeout(5) as outer:  # a backstop: the publish's deadline comes first
        with pytest.raises(BROKER_FAULTS):
            await publish
    assert not outer.expired()


async def test_it_publishes_on_the_current_underlying_channel() -> None:
    channel = Recording()
    properties = Basic.Properties(content_type="application/json")

    await publish_confirmed(
        channel,  # type: ignore[arg-type]
        exchange="identity.events",
        routing_key="account.created",
        body=b"{}",
        properties=properties,
    )

    assert channel.published == [
        {
            "body": b"{}",
            "exchange": "identity.events",
            "routing_key": "account.created",
            "properties": properties,
        }
    ]
