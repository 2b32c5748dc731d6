"""Batched acknowledgements: fewer frames, and never one the broker would refuse.

`Broker` below settles acks the way RabbitMQ's channel does (rabbit_channel:collect_acks):
`multiple=True` settles every outstanding tag up to the given one, and a tag that is not
outstanding closes the channel with PRECONDITION_FAILED.
"""

from __future__ import annotations

import asyncio
import gc
import random
import weakref
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.acks import Acknowledger, AlreadySettledError, Frame, Ledger

FLUSH_S = 0.001


class PreconditionFailed(Exception):
    pass


@dataclass(eq=False)  # hashable by identity, like a real channel
class Broker:
    """One channel's view of its unacked deliveries."""

    outstanding: list[int] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    closed: bool = False

    def deliver(self, count: int) -> list[Delivery]:
        start = len(self.outstanding) + len(self.acked) + len(self.requeued) + len(self.dropped)
        tags = list(range(start + 1, start + count + 1))
        self.outstanding.extend(tags)
        return [Delivery(self, tag) for tag in tags]

    def _settle(self, tag: int, multiple: bool) -> list[int]:
        if self.closed:
            raise ConnectionError("channel closed")
        if tag not in self.outstanding:
            self.closed = True
            raise PreconditionFailed(f"unknown delivery tag {tag}")
        settled = [t for t in self.outstanding if t <= tag] if multiple else [tag]
        self.outstanding = [t for t in self.outstanding if t not in settled]
        return settled

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.frames.append(Frame(tag, ack=True, multiple=multiple))
        self.acked.extend(self._settle(tag, multiple))

    async def basic_nack(self, tag: int, requeue: bool = True) -> None:
        self.frames.append(Frame(tag, ack=False, requeue=requeue))
        (self.requeued if requeue else self.dropped).extend(self._settle(tag, False))


@dataclass
class Delivery:
    channel: Broker
    delivery_tag: int


async def test_deliveries_finishing_together_are_acked_with_one_frame() -> None:
    broker = Broker()
    acks = Acknowledger(flush_s=FLUSH_S)

    await asyncio.gather(*(acks.ack(d) for d in broker.deliver(20)))  # type: ignore[arg-type]

    assert broker.frames == [Frame(20, ack=True, multiple=True)]
    assert sorted(broker.acked) == list(range(1, 21))
    assert broker.outstanding == []


async def test_a_slow_delivery_does_not_hold_the_others_acks_for_long() -> None:
    broker = Broker()
    acks = Acknowledger(flush_s=FLUSH_S, straggler_s=0.02)
    slow, *rest = broker.deliver(5)

    done = asyncio.gather(*(acks.ack(d) for d in rest))  # type: ignore[arg-type]
    await asyncio.wait_for(done, timeout=1)  # acked one by one once they waited 20 ms

    assert broker.outstanding == [1]
    assert broker.frames == [Frame(tag, ack=True) for tag in (2, 3, 4, 5)]
    await acks.ack(slow)  # type: ignore[arg-type]
    assert broker.outstanding == []
    assert broker.frames[-1] == Frame(1, ack=True, multiple=True)  # harmless over settled 2..5


async def test_a_nack_inside_a_finished_run_is_sent_before_the_ack_that_spans_it() -> None:
    broker = Broker()
    acks = Acknowledger(flush_s=FLUSH_S)
    first, second, third = broker.deliver(3)

    await asyncio.gather(
        acks.ack(first),  # type: ignore[arg-type]
        acks.nack(second, requeue=True),  # type: ignore[arg-type]
        acks.ack(third),  # type: ignore[arg-type]
    )

    assert broker.frames == [Frame(2, ack=False, requeue=True), Frame(3, ack=True, multiple=True)]
    assert broker.requeued == [2]
    assert sorted(broker.acked) == [1, 3]


async def test_a_new_channel_after_a_reconnect_starts_its_own_ledger() -> None:
    old, new = Broker(), Broker()
    acks = Acknowledger(flush_s=FLUSH_S)
    [stale] = old.deliver(1)
    old.closed = True  # the connection dropped; the broker requeued what was unacked
    [fresh] = new.deliver(1)  # tag 1 again, on the new channel

    with pytest.raises(ConnectionError):
        await acks.ack(stale)  # type: ignore[arg-type]
    await acks.ack(fresh)  # type: ignore[arg-type]

    assert new.acked == [1]


def test_the_ledger_waits_for_the_gap_to_close_before_acking_past_it() -> None:
    ledger = Ledger()
    ledger.finish(2, now=0.0)
    ledger.finish(3, now=0.0)
    assert ledger.plan(now=0.01, straggler_s=1.0) == []  # 1 is unfinished: nothing to send
    ledger.finish(1, now=0.02)
    assert ledger.plan(now=0.03, straggler_s=1.0) == [Frame(3, ack=True, multiple=True)]
    assert ledger.floor == 3
    assert not ledger.waiting


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=40),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    nack_share=st.floats(min_value=0, max_value=0.5),
    straggler_s=st.sampled_from([0.0, 3600.0]),
)
def test_any_completion_order_settles_every_delivery_exactly_as_asked(
    count: int, seed: int, nack_share: float, straggler_s: float
) -> None:
    """Deliveries finish in a random order, with random pauses, some nacked: the broker never
    sees an unknown tag, and ends with every ack acked and every nack requeued.

    The pauses are turns of the event loop, and the ledger flushes at every turn, so the
    finishes and the flushes interleave by the seed rather than by a clock. Stragglers are
    acked on their own at once, or only ever by the run that ends behind them."""
    rng = random.Random(seed)
    broker = Broker()
    deliveries = broker.deliver(count)
    nacked = {d.delivery_tag for d in deliveries if rng.random() < nack_share}
    turns = {d.delivery_tag: rng.choice([0, 0, 0, 1, 3, 10, 40]) for d in deliveries}
    acks = Acknowledger(flush_s=0.0, straggler_s=straggler_s)

    async def finish(delivery: Delivery) -> None:
        for _ in range(turns[delivery.delivery_tag]):
            await asyncio.sleep(0)
        if delivery.delivery_tag in nacked:
            await acks.nack(delivery, requeue=True)  # type: ignore[arg-type]
        else:
            await acks.ack(delivery)  # type: ignore[arg-type]

    async def scenario() -> None:
        order = deliveries[:]
        rng.shuffle(order)
        await asyncio.wait_for(asyncio.gather(*(finish(d) for d in order)), timeout=5)

    asyncio.run(scenario())

    assert not broker.closed
    assert broker.outstanding == []
    assert sorted(broker.requeued) == sorted(nacked)
    assert sorted(broker.acked) == sorted(set(range(1, count + 1)) - nacked)
    assert len(broker.frames) <= count


async def test_settling_a_delivery_twice_raises_and_sends_nothing_more() -> None:
    broker = Broker()
    acks = Acknowledger(flush_s=FLUSH_S)
    [delivery] = broker.deliver(1)
    await acks.ack(delivery)  # type: ignore[arg-type]

    with pytest.raises(AlreadySettledError):
        await acks.nack(delivery, requeue=True)  # type: ignore[arg-type]
    with pytest.raises(AlreadySettledError):
        await acks.ack(delivery)  # type: ignore[arg-type]

    await asyncio.sleep(5 * FLUSH_S)
    assert broker.frames == [Frame(1, ack=True, multiple=True)]
    assert not broker.closed


async def test_the_registry_does_not_keep_a_closed_channel_alive() -> None:
    broker = Broker()
    acks = Acknowledger(flush_s=FLUSH_S)
    await acks.ack(broker.deliver(1)[0])  # type: ignore[arg-type]
    gone = weakref.ref(broker)

    del broker
    gc.collect()

    assert gone() is None


class FailingBroker(Broker):
    """A channel whose first frame fails with `error`; it records whatever else reaches it."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error: BaseException | None = error

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        await super().basic_ack(tag, multiple)

    async def basic_nack(self, tag: int, requeue: bool = True) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        await super().basic_nack(tag, requeue)


@pytest.mark.parametrize("error", [asyncio.CancelledError(), ConnectionError("reset")])
async def test_a_frame_that_cannot_be_sent_fails_every_waiter_and_nothing_follows_it(
    error: BaseException,
) -> None:
    broker = FailingBroker(error)
    acks = Acknowledger(flush_s=FLUSH_S, straggler_s=0.0)
    first, second, third = broker.deliver(3)

    results = await asyncio.wait_for(
        asyncio.gather(
            acks.nack(second, requeue=True),  # type: ignore[arg-type]
            acks.ack(third),  # type: ignore[arg-type]
            return_exceptions=True,
        ),
        timeout=1,
    )
    assert all(isinstance(result, Exception) for result in results)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the channel's first failure
        await asyncio.wait_for(acks.ack(first), timeout=1)  # type: ignore[arg-type]
    # The failed nack is never covered by a later multiple ack: nothing more was sent.
    assert broker.frames == []
