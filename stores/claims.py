"""`ClaimedBatch`: the `EventBatch` both stores hand out, and what its end writes back.

A batch holds whole commands. Of each, only a prefix can be published: a row counts only if
every row of its command before it in the batch was marked too, so that a command's events
are recorded as published in the order they happened, whatever the caller marks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from stores.records import PendingEvent


@dataclass(frozen=True, slots=True)
class ClaimOutcome:
    """What the end of a batch writes: the rows now published, the commands with nothing
    left to publish, and, for the others that got further, their first row not published."""

    published: list[int] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    moved: list[tuple[int, int]] = field(default_factory=list)


class ClaimedBatch:
    """`EventBatch` over the commands a store holds until the batch ends: `commands` maps each
    held command to its claimed rows, in order; `unfinished` are the commands with unpublished
    rows beyond those."""

    __slots__ = ("_commands", "_events", "_marked", "_unfinished")

    def __init__(
        self, commands: dict[int, list[PendingEvent]], unfinished: Iterable[int] = ()
    ) -> None:
        self._commands = commands
        self._unfinished = frozenset(unfinished)
        self._events = tuple(event for events in commands.values() for event in events)
        self._marked: set[int] = set()

    @property
    def events(self) -> Sequence[PendingEvent]:
        """Command by command, in the order the commands were held; each in outbox order."""
        return self._events

    def mark_published(self, seqs: Sequence[int]) -> None:
        self._marked.update(seqs)

    def outcome(self) -> ClaimOutcome:
        outcome = ClaimOutcome()
        for command, events in self._commands.items():
            done = 0
            while done < len(events) and events[done].seq in self._marked:
                done += 1
            outcome.published.extend(event.seq for event in events[:done])
            if done == len(events) and command not in self._unfinished:
                outcome.finished.append(command)
            elif done:
                after = events[done].seq if done < len(events) else events[-1].seq + 1
                outcome.moved.append((command, after))
        return outcome
