"""The events of one command reach the broker in the order they happened, on both stores: with
two relays sharing one outbox (every worker runs one), and when the broker refuses one publish.

The events come from the service (a password change on an account with open sessions, which
writes one `session.ended` per session, then `account.password_changed`); the relays are
`worker.outbox.OutboxRelay` on the in-memory broker, whose queue shows the order in which the
broker accepted them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from aiormq.exceptions import DeliveryError
from pamqp.commands import Basic
from pydantic import SecretStr

from messages import ChangePassword, CreateAccount
from messages.topology import EVENTS_EXCHANGE
from services.clock import FakeClock
from services.identity import IdentityService
from services.ids import new_session_id
from stores import IdentityStore
from tests.contract.builders import session
from tests.contract.test_store_contract import drain
from tests.support.eventually import eventually
from tests.support.factory import TEST_START, running_service
from tests.support.memory_broker import MemoryBroker
from worker.metrics import create_metrics
from worker.outbox import OutboxRelay

PASSWORD = "Copper-lantern-9041-quiet"
NEW_PASSWORD = "Harbour-kettle-5512-meadow"


@pytest.fixture
async def service(store: IdentityStore) -> AsyncIterator[IdentityService]:
    async with running_service(store, clock=FakeClock(TEST_START)) as (built, _):
        yield built


class Broker:
    """The in-memory broker with `identity.events` and a queue bound to every event type."""

    def __init__(self) -> None:
        self.memory = MemoryBroker()
        self._connection = self.memory.connect()

    async def start(self) -> None:
        channel = await self._connection.channel()
        await channel.declare_exchange(EVENTS_EXCHANGE, "topic", durable=True)
        self._queue = await channel.declare_queue("test.captured")
        await self._queue.bind(EVENTS_EXCHANGE, "#")

    async def channel(self) -> Any:
        return await self.memory.connect().channel(publisher_confirms=True)

    async def captured(self) -> list[str]:
        """The event ids the broker accepted, in the order it accepted them."""
        ids = []
        while (message := await self._queue.get(no_ack=True, fail=False)) is not None:
            ids.append(message.message_id)
        return ids


@pytest.fixture
async def broker() -> Broker:
    made = Broker()
    await made.start()
    return made


def relay(store: IdentityStore, channel: Any) -> OutboxRelay:
    return OutboxRelay(
        store, channel, EVENTS_EXCHANGE, create_metrics(), lambda: TEST_START, batch=100
    )


class Gated:
    """A publishing channel that holds every publish until `gate` opens."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel
        self.gate = asyncio.Event()
        self.waiting = False

    async def get_underlay_channel(self) -> Gated:
        return self

    async def basic_publish(self, body: bytes, **kwargs: Any) -> Any:
        self.waiting = True
        await self.gate.wait()
        return await (await self._channel.get_underlay_channel()).basic_publish(body, **kwargs)


class NackingOnce:
    """A publishing channel whose broker nacks the first publish of one event."""

    def __init__(self, channel: Any, event_id: str) -> None:
        self._channel = channel
        self._event_id = event_id
        self.nacked = 0

    async def get_underlay_channel(self) -> NackingOnce:
        return self

    async def basic_publish(self, body: bytes, **kwargs: Any) -> Any:
        if kwargs["properties"].message_id == self._event_id and not self.nacked:
            self.nacked += 1
            raise DeliveryError(None, Basic.Nack(delivery_tag=1))
        return await (await self._channel.get_underlay_channel()).basic_publish(body, **kwargs)


async def password_change_events(
    store: IdentityStore, service: IdentityService, open_sessions: int
) -> list[str]:
    """Change the password of an account with `open_sessions` live sessions, with nothing
    else pending in the outbox; the ids of its events, in the order they happened."""
    email = f"relay-{uuid.uuid4().hex[:12]}@example.com"
    created = await service.create_account(
        CreateAccount(email=email, password=SecretStr(PASSWORD), display_name="Ada")
    )
    account_id = created.account.id
    async with store.unit_of_work() as uow:
        for n in range(open_sessions):
            at = TEST_START - timedelta(seconds=open_sessions - n)
            await uow.insert_session(
                session(account_id, id=new_session_id(), created_at=at, last_seen_at=TEST_START)
            )
    await drain(store)
    change = ChangePassword(
        account_id=account_id,
        current_password=SecretStr(PASSWORD),
        new_password=SecretStr(NEW_PASSWORD),
    )
    assert (await service.change_password(change)).sessions_ended == open_sessions
    async with store.claim_events(1000) as batch:  # a look, publishing nothing
        pending = [(e.event_id, e.type) for e in batch.events]
    assert [t for _, t in pending] == ["session.ended"] * open_sessions + [
        "account.password_changed"
    ]
    return [event_id for event_id, _ in pending]


async def test_two_relays_publish_a_150_event_command_in_order(
    store: IdentityStore, service: IdentityService, broker: Broker
) -> None:
    expected = await password_change_events(store, service, open_sessions=149)
    held = Gated(await broker.channel())
    first, second = relay(store, held), relay(store, await broker.channel())

    # The first relay claims, and is held at its first publish until the second relay has
    # claimed and published whatever it could: a claim that split the command would let the
    # second publish the command's tail before the first publishes its head.
    draining = asyncio.create_task(first.drain())
    await eventually(lambda: held.waiting, what="the first relay's first publish")
    await second.drain()
    held.gate.set()
    await draining
    await first.drain()
    await second.drain()

    assert await broker.captured() == expected
    assert await store.outbox_backlog(TEST_START) == (0, 0.0)


@pytest.mark.parametrize("refused", [0, 1, 2], ids=["first", "second", "last"])
async def test_a_refused_publish_stops_its_command_until_the_next_drain(
    store: IdentityStore, service: IdentityService, broker: Broker, refused: int
) -> None:
    expected = await password_change_events(store, service, open_sessions=2)
    nacking = NackingOnce(await broker.channel(), expected[refused])
    only = relay(store, nacking)

    published = await only.drain()

    # Only what came before the refused event went out, and only that is marked published.
    assert nacking.nacked == 1
    assert published == refused
    assert await broker.captured() == expected[:refused]
    assert (await store.outbox_backlog(TEST_START))[0] == len(expected) - refused
    assert await only.drain() == len(expected) - refused
    assert await broker.captured() == expected[refused:]
    assert await store.outbox_backlog(TEST_START) == (0, 0.0)


async def test_a_refused_publish_holds_back_only_its_own_command(
    store: IdentityStore, service: IdentityService, broker: Broker
) -> None:
    stopped = await password_change_events(store, service, open_sessions=2)
    # A second command, committed after the first: its account.created is pending too.
    email = f"relay-{uuid.uuid4().hex[:12]}@example.com"
    await service.create_account(
        CreateAccount(email=email, password=SecretStr(PASSWORD), display_name="Ada")
    )
    nacking = NackingOnce(await broker.channel(), stopped[0])

    assert await relay(store, nacking).drain() == 1

    [other] = await broker.captured()
    assert other not in stopped
    assert (await store.outbox_backlog(TEST_START))[0] == len(stopped)
