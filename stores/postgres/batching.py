"""`KeyedBatcher`: look-ups by key, coalesced into one query per batch.

Under load, a worker has dozens of `session.verify` commands in flight, each wanting one row
by primary key. One query per command pays, every time, for a pooled connection, a round
trip and PostgreSQL's per-statement work; one query for every key asked for meanwhile pays
for them once. The batching is the natural kind, with no timer: a look-up made while no
batch is running starts one at once (after the current turn of the event loop, so that keys
asked for in the same turn go together); a look-up made while batches are running waits for
the next one, which takes every key that arrived in between. An idle worker answers as
fast as before; a busy one sends fewer, larger queries.

Every look-up is served by a query that started after it was asked for, so a batch never
answers with a row read before the request existed (a session ended just before a verify is
seen as ended).

A batch that fails with an error `isolate` accepts (one that a key can cause, such as a value
the database refuses) is asked again key by key, so that one bad key fails only its own
callers. Any other error fails the whole batch, whose callers retry as they would have; met
while asking key by key, it fails the keys not yet answered without asking for them. A caller
that gives up (cancelled) leaves the others in its batch alone; a batch abandoned (its task
cancelled, as at shutdown) fails its callers with a `TransientStoreError`.

Every caller of a batch that failed gets the same exception object, as every awaiter of one
asyncio future does; values found are shared the same way and must not be mutated.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

from stores.errors import TransientStoreError

_log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Fetch = Callable[[list[K]], Awaitable[Mapping[K, V]]]
_Batch = dict[K, list[asyncio.Future[V | None]]]


def _never(exc: Exception) -> bool:
    return False


class KeyedBatcher(Generic[K, V]):
    """`await batcher.get(key)` returns what `fetch` returned for `key`, or None.

    `fetch(keys)` gets distinct keys (at most `max_batch`) and returns a mapping of the
    ones it found. At most `max_in_flight` batches run at once; a query that hangs holds
    its batch's callers until the driver's own timeout ends it.
    """

    def __init__(
        self,
        fetch: Fetch[K, V],
        *,
        max_batch: int = 256,
        max_in_flight: int = 2,
        isolate: Callable[[Exception], bool] = _never,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._fetch = fetch
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._isolate = isolate
        self._waiting: _Batch[K, V] = {}
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, key: K) -> V | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[V | None] = loop.create_future()
        self._waiting.setdefault(key, []).append(future)
        self._schedule(loop)
        return await future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and self._in_flight < self._max_in_flight and self._waiting:
            self._scheduled = True
            loop.call_soon(self._dispatch, loop)

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        batch: _Batch[K, V] = {}
        while self._waiting and len(batch) < self._max_batch:
            key = next(iter(self._waiting))
            futures = [f for f in self._waiting.pop(key) if not f.done()]
            if futures:  # every caller for this key gave up: nothing to ask
                batch[key] = futures
        if not batch:
            return
        task = loop.create_task(self._run(batch))
        self._in_flight += 1
        self._tasks.add(task)
        # Bookkeeping in a callback: it runs however the task ends, even cancelled before
        # its first step (when nothing inside `_run` would).
        task.add_done_callback(lambda done: self._finished(done, batch, loop))
        # More keys than one batch takes: the next one can start beside it.
        self._schedule(loop)

    async def _run(self, batch: _Batch[K, V]) -> None:
        try:
            found = await self._fetch(list(batch))
        except Exception as exc:
            if len(batch) == 1 or not self._isolate(exc):
                _fail(batch, exc)
                return
            keys = list(batch)
            for n, key in enumerate(keys):  # rare: find the key at fault
                try:
                    alone = await self._fetch([key])
                except Exception as key_exc:
                    if not self._isolate(key_exc):  # the database, not the key: stop asking
                        _fail({k: batch[k] for k in keys[n:]}, key_exc)
                        return
                    _fail({key: batch[key]}, key_exc)
                else:
                    _resolve({key: batch[key]}, alone)
        else:
            _resolve(batch, found)

    def _finished(
        self, task: asyncio.Task[None], batch: _Batch[K, V], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        if task.cancelled():
            _fail(batch, TransientStoreError("the look-up was abandoned"))
        elif (exc := task.exception()) is not None:  # a bug: fail loudly, leave nobody waiting
            _log.error("a batch of look-ups failed", exc_info=exc)
            _fail(batch, TransientStoreError("the look-up failed"))
        self._schedule(loop)


def _resolve(batch: _Batch[K, V], found: Mapping[K, V]) -> None:
    for key, futures in batch.items():
        value = found.get(key)
        for future in futures:
            if not future.done():
                future.set_result(value)


def _fail(batch: _Batch[K, V], exc: BaseException) -> None:
    for futures in batch.values():
        for future in futures:
            if not future.done():
                future.set_exception(exc)
