"""Acknowledging deliveries several at a time, in the order the broker requires.

A frame per ack costs the worker a socket write and RabbitMQ a channel operation; measured on
the local broker, acking 16 deliveries with one `basic.ack(multiple=True)` instead of one frame
each saved ~30 us of worker CPU and ~45 us of RabbitMQ CPU per delivery. So a delivery whose
reply is confirmed is not acked on the spot: it joins its channel's ledger, and every
`flush_s` the ledger decides what to send.

Delivery tags on a channel count up from 1 without gaps, and `multiple=True` acks *every*
outstanding tag up to the one given: it may only cover a run of finished deliveries with
nothing unfinished below it. Each flush, per channel, in this order:

1. the nacks asked for since the last flush, one frame each;
2. the run of finished (or already settled) tags just above the last acknowledged one: one
   `multiple=True` frame for all of it;
3. finished deliveries stuck behind an unfinished one for `straggler_s` or more: one frame
   each, so a slow command does not hold the others' acks (and prefetch slots) for long.

Frames go out through one writer per channel in the order they were decided, and a caller's
`ack()` returns once the frame covering its delivery is written: the at-least-once rules are
unchanged (ack after the reply is confirmed), only the frames are fewer.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import AbstractChannel

FLUSH_S = 0.005
STRAGGLER_S = 0.05


class AlreadySettledError(RuntimeError):
    """A delivery was acked or rejected twice; nothing was sent the second time."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame to send: an ack (`multiple` or not) or a nack (`requeue` or not)."""

    tag: int
    ack: bool
    multiple: bool = False
    requeue: bool = False


class Ledger:
    """The unsettled deliveries of one channel, and the frames that settle them (no I/O)."""

    def __init__(self) -> None:
        self.floor = 0  # every tag up to here is settled at the broker
        self._finished: dict[int, float] = {}  # tag -> when it finished; not acked yet
        self._rejected: dict[int, bool] = {}  # tag -> requeue; nack not sent yet
        self._settled: set[int] = set()  # above the floor, acked or nacked on their own

    @property
    def waiting(self) -> bool:
        return bool(self._finished or self._rejected)

    def knows(self, tag: int) -> bool:
        """Whether `tag` was finished or rejected already (settling it twice would close the
        channel: the broker refuses a tag it no longer holds)."""
        return (
            tag <= self.floor
            or tag in self._finished
            or tag in self._rejected
            or tag in self._settled
        )

    def finish(self, tag: int, now: float) -> None:
        self._finished[tag] = now

    def reject(self, tag: int, requeue: bool) -> None:
        self._rejected[tag] = requeue

    def plan(self, now: float, straggler_s: float) -> list[Frame]:
        frames = [Frame(tag, ack=False, requeue=requeue) for tag, requeue in self._rejected.items()]
        self._settled.update(self._rejected)
        self._rejected.clear()

        top, tag = None, self.floor
        while tag + 1 in self._finished or tag + 1 in self._settled:
            tag += 1
            if self._finished.pop(tag, None) is not None:
                top = tag
            self._settled.discard(tag)
        self.floor = tag
        if top is not None:
            frames.append(Frame(top, ack=True, multiple=True))

        for tag, since in list(self._finished.items()):
            if now - since >= straggler_s:
                frames.append(Frame(tag, ack=True))
                del self._finished[tag]
                self._settled.add(tag)
        return frames


@dataclass
class _Channel:
    # Weak: the registry is keyed weakly by the channel, which this must not keep alive.
    channel: weakref.ref[AbstractChannel]
    ledger: Ledger = field(default_factory=Ledger)
    waiters: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    outbox: deque[tuple[Frame, list[asyncio.Future[None]]]] = field(default_factory=deque)
    writer: asyncio.Task[None] | None = None
    flush: asyncio.TimerHandle | None = None
    failed: BaseException | None = None  # the first frame that could not be sent


class Acknowledger:
    """Acks and nacks deliveries through per-channel ledgers (see the module docstring)."""

    def __init__(self, flush_s: float = FLUSH_S, straggler_s: float = STRAGGLER_S) -> None:
        self._flush_s = flush_s
        self._straggler_s = straggler_s
        # Keyed by aiormq's channel: a reconnect brings a new one, with tags from 1 again.
        self._channels: weakref.WeakKeyDictionary[AbstractChannel, _Channel] = (
            weakref.WeakKeyDictionary()
        )

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Acknowledge `message`; returns once the frame covering it is written."""
        state, tag = self._state(message)
        state.ledger.finish(tag, time.monotonic())
        await self._wait(state, tag)

    async def nack(self, message: AbstractIncomingMessage, *, requeue: bool) -> None:
        """Reject `message` (back to its queue if `requeue`); returns once the nack is written."""
        state, tag = self._state(message)
        state.ledger.reject(tag, requeue)
        await self._wait(state, tag)

    def _state(self, message: AbstractIncomingMessage) -> tuple[_Channel, int]:
        channel, tag = message.channel, message.delivery_tag
        assert tag is not None, "a delivery consumed with acks has a tag"
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel(weakref.ref(channel))
        if state.ledger.knows(tag):
            raise AlreadySettledError(f"delivery {tag} was acked or rejected already")
        return state, tag

    async def _wait(self, state: _Channel, tag: int) -> None:
        waiter = asyncio.get_running_loop().create_future()
        state.waiters[tag] = waiter
        if state.flush is None:
            state.flush = asyncio.get_running_loop().call_later(self._flush_s, self._flush, state)
        await waiter

    def _flush(self, state: _Channel) -> None:
        state.flush = None
        previous_floor = state.ledger.floor
        for frame in state.ledger.plan(time.monotonic(), self._straggler_s):
            if frame.multiple:
                covered = range(previous_floor + 1, frame.tag + 1)
                waiters = [w for t in covered if (w := state.waiters.pop(t, None)) is not None]
            else:
                waiters = [w for w in (state.waiters.pop(frame.tag, None),) if w is not None]
            state.outbox.append((frame, waiters))
        if state.outbox and (state.writer is None or state.writer.done()):
            state.writer = asyncio.get_running_loop().create_task(self._write(state))
        if state.ledger.waiting:
            state.flush = asyncio.get_running_loop().call_later(self._flush_s, self._flush, state)

    async def _write(self, state: _Channel) -> None:
        while state.outbox:
            frame, waiters = state.outbox.popleft()
            try:
                if state.failed is not None:
                    raise state.failed  # after one failure nothing more goes on this channel
                channel = state.channel()
                if channel is None:
                    raise ConnectionError("the channel is gone")
                if frame.ack:
                    await channel.basic_ack(frame.tag, multiple=frame.multiple)
                else:
                    await channel.basic_nack(frame.tag, requeue=frame.requeue)
            except BaseException as exc:
                # The channel is gone or broken: the broker requeues what it holds. A later
                # multiple ack could cover a nack that failed, so the channel's ledger is done.
                if state.failed is None:
                    state.failed = exc if isinstance(exc, Exception) else ConnectionError(exc)
                _settle(waiters, state.failed)
                if not isinstance(exc, Exception):  # cancelled: fail the rest, then stop
                    while state.outbox:
                        _settle(state.outbox.popleft()[1], state.failed)
                    raise
                continue
            _settle(waiters, None)


def _settle(waiters: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for waiter in waiters:
        if waiter.done():
            continue
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)
