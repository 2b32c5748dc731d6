"""KeyedBatcher: coalesced look-ups, each served by a query that started after it was asked."""

from __future__ import annotations

import asyncio

import pytest

from stores.errors import TransientStoreError
from stores.postgres.batching import KeyedBatcher


class Table:
    """A fetch that records every batch and can be held open until released."""

    def __init__(self, rows: dict[str, str]) -> None:
        self.rows = rows
        self.batches: list[list[str]] = []
        self.running = 0
        self.most_running = 0
        self.gate: asyncio.Event | None = None
        self.fail_with: Exception | None = None

    async def fetch(self, keys: list[str]) -> dict[str, str]:
        self.batches.append(keys)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_with is not None:
                raise self.fail_with
            # The value says which batch read it, to tell a stale answer from a fresh one.
            return {k: f"{self.rows[k]}@{len(self.batches)}" for k in keys if k in self.rows}
        finally:
            self.running -= 1


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_lookups_of_one_turn_go_in_one_batch_each_getting_its_own_row() -> None:
    table = Table({"a": "A", "b": "B", "c": "C"})
    batcher = KeyedBatcher(table.fetch)

    found = await asyncio.gather(*(batcher.get(k) for k in ["a", "b", "missing", "a", "c"]))

    assert found == ["A@1", "B@1", None, "A@1", "C@1"]
    assert table.batches == [["a", "b", "missing", "c"]]  # distinct keys, in asking order


async def test_lookups_made_during_a_batch_wait_and_go_together_in_the_next() -> None:
    table = Table({"a": "A", "b": "B", "c": "C"})
    table.gate = asyncio.Event()
    batcher = KeyedBatcher(table.fetch, max_in_flight=1)

    first = asyncio.create_task(batcher.get("a"))
    await settle()
    assert table.batches == [["a"]]  # an idle batcher asks at once, alone
    later = [asyncio.create_task(batcher.get(k)) for k in ["b", "c", "a"]]
    await settle()
    assert table.batches == [["a"]]  # one at a time: the others wait for it

    table.gate.set()
    assert await first == "A@1"
    # "a" asked again while batch 1 ran is read again, not answered with batch 1's row.
    assert await asyncio.gather(*later) == ["B@2", "C@2", "A@2"]
    assert table.batches == [["a"], ["b", "c", "a"]]


async def test_no_more_than_max_in_flight_batches_run_and_none_exceeds_max_batch() -> None:
    rows = {str(n): f"v{n}" for n in range(10)}
    table = Table(rows)
    table.gate = asyncio.Event()
    batcher = KeyedBatcher(table.fetch, max_batch=3, max_in_flight=2)

    tasks = [asyncio.create_task(batcher.get(str(n))) for n in range(10)]
    await settle()
    assert [len(b) for b in table.batches] == [3, 3]
    table.gate.set()
    values = await asyncio.gather(*tasks)

    assert [v.split("@")[0] if v else None for v in values] == [f"v{n}" for n in range(10)]
    assert sorted(k for b in table.batches for k in b) == sorted(rows)
    assert max(len(b) for b in table.batches) <= 3
    assert table.most_running == 2


async def test_a_failed_batch_fails_each_of_its_lookups_and_the_next_batch_works() -> None:
    table = Table({"a": "A", "b": "B"})
    table.fail_with = ConnectionResetError("gone")
    batcher = KeyedBatcher(table.fetch)

    results = await asyncio.gather(batcher.get("a"), batcher.get("b"), return_exceptions=True)
    assert all(isinstance(r, ConnectionResetError) for r in results)

    table.fail_with = None
    assert await batcher.get("a") == "A@2"


async def test_a_caller_that_gives_up_leaves_the_rest_of_its_batch_alone() -> None:
    table = Table({"a": "A", "b": "B"})
    table.gate = asyncio.Event()
    batcher = KeyedBatcher(table.fetch, max_in_flight=1)
    running = asyncio.create_task(batcher.get("a"))
    await settle()

    quitter = asyncio.create_task(batcher.get("b"))
    stayer = asyncio.create_task(batcher.get("a"))
    await settle()
    quitter.cancel()
    table.gate.set()

    assert await running == "A@1"
    assert await stayer == "A@2"
    with pytest.raises(asyncio.CancelledError):
        await quitter
    assert table.batches == [["a"], ["a"]]  # nobody was left waiting for "b": not asked


@pytest.mark.parametrize("started", [True, False], ids=["running", "before-its-first-step"])
async def test_an_abandoned_batch_fails_its_callers_as_transient_and_the_next_works(
    started: bool,
) -> None:
    table = Table({"a": "A"})
    table.gate = asyncio.Event()
    batcher = KeyedBatcher(table.fetch, max_in_flight=1)
    callers = [asyncio.create_task(batcher.get("a")) for _ in range(2)]
    if started:
        await settle()
    else:  # one turn for the callers to ask, one for the batch task to be created
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    assert batcher._tasks

    for task in list(batcher._tasks):  # as the event loop does to every task at shutdown
        task.cancel()
    results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 5)

    assert all(isinstance(r, TransientStoreError) for r in results), results
    assert len(table.batches) == (1 if started else 0)
    table.gate.set()
    assert await batcher.get("a") == f"A@{len(table.batches)}"


async def test_a_key_that_fails_its_batch_is_asked_alone_and_fails_only_its_callers() -> None:
    table = Table({"a": "A", "b": "B"})
    bad = ValueError("cannot encode this key")

    async def fetch(keys: list[str]) -> dict[str, str]:
        if "bad" in keys:
            table.batches.append(keys)
            raise bad
        return await table.fetch(keys)

    batcher = KeyedBatcher(fetch, isolate=lambda exc: exc is bad)
    found = await asyncio.gather(
        batcher.get("a"), batcher.get("bad"), batcher.get("b"), return_exceptions=True
    )

    assert list(found) == ["A@2", bad, "B@4"]  # the batch each was read in: its own, alone
    assert table.batches == [["a", "bad", "b"], ["a"], ["bad"], ["b"]]


async def test_an_error_not_to_isolate_fails_the_whole_batch_without_asking_again() -> None:
    table = Table({"a": "A", "b": "B"})
    table.fail_with = TransientStoreError("database unavailable")
    batcher = KeyedBatcher(
        table.fetch, isolate=lambda exc: not isinstance(exc, TransientStoreError)
    )

    found = await asyncio.gather(batcher.get("a"), batcher.get("b"), return_exceptions=True)

    assert all(r is table.fail_with for r in found)
    assert table.batches == [["a", "b"]]


async def test_a_database_fault_while_asking_key_by_key_fails_the_rest_unasked() -> None:
    bad = ValueError("cannot encode this key")
    down = TransientStoreError("database unavailable")
    asked: list[list[str]] = []

    async def fetch(keys: list[str]) -> dict[str, str]:
        asked.append(keys)
        if len(keys) > 1:
            raise bad
        if keys == ["b"]:
            raise down
        return {k: k.upper() for k in keys}

    batcher = KeyedBatcher(fetch, isolate=lambda exc: exc is bad)
    found = await asyncio.gather(*(batcher.get(k) for k in "abcd"), return_exceptions=True)

    assert list(found) == ["A", down, down, down]
    assert asked == [["a", "b", "c", "d"], ["a"], ["b"]]


async def test_abandoning_the_key_by_key_asking_fails_the_keys_not_yet_answered() -> None:
    bad = ValueError("cannot encode this key")
    gate = asyncio.Event()

    async def fetch(keys: list[str]) -> dict[str, str]:
        if len(keys) > 1:
            raise bad
        if keys == ["b"]:
            await gate.wait()
        return {k: k.upper() for k in keys}

    batcher = KeyedBatcher(fetch, isolate=lambda exc: exc is bad)
    callers = [asyncio.create_task(batcher.get(k)) for k in "abc"]
    await settle()
    assert callers[0].done()  # "a" was answered; "b" is being asked
    for task in list(batcher._tasks):
        task.cancel()
    found = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 5)

    assert found[0] == "A"
    assert all(isinstance(r, TransientStoreError) for r in found[1:]), found
    assert batcher._in_flight == 0


async def test_a_bug_in_a_batch_fails_its_callers_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fetch(keys: list[str]) -> dict[str, str]:
        return {k: k for k in keys}

    batcher: KeyedBatcher[str, str] = KeyedBatcher(fetch)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("stores.postgres.batching._resolve", lambda *_: 1 / 0)
        found = await asyncio.gather(batcher.get("a"), return_exceptions=True)

    assert isinstance(found[0], TransientStoreError)
    assert "a batch of look-ups failed" in caplog.text
    assert await batcher.get("a") == "a"


@pytest.mark.parametrize(("max_batch", "max_in_flight"), [(0, 1), (1, 0)])
def test_limits_below_one_are_refused(max_batch: int, max_in_flight: int) -> None:
    table = Table({})
    with pytest.raises(ValueError, match="at least 1"):
        KeyedBatcher(table.fetch, max_batch=max_batch, max_in_flight=max_in_flight)
