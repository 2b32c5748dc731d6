"""Per-caller command rates (`IDENTITY_CALLER_RATES`): a token bucket per caller, per worker.

`user=N/s;user=N/s;*=N/s`: each named broker user (the AMQP `user_id` RabbitMQ validated) may
send N commands a second to this worker, across all its queues; `*` is the rate of every
caller not named, each in a bucket of its own (commands without a `user_id`, possible only
under dev mode's open policy, share one). Without `*`, callers not named are not limited. N
may be fractional (`0.5/s`). A bucket holds N tokens (at least one): a caller idle for a
second may send N at once, and no more than N a second on average after that.

The gate sits in the processor right after decoding, when the caller is known, and before
everything else: authorisation (an `@self` proof reads the store), the idempotency look-up,
the store, argon2. Beyond its rate a command is answered `rate_limited` with `retry_after_s`
(whole seconds until the caller's next token) and acked, and nothing is stored under its key.

Per worker process: W workers admit up to W times a rate in total. A limit across the cluster
is the broker's to keep (per-user connection and channel limits, queue length limits); this
worker only keeps one caller from taking all of its own capacity.

Every decoded command is counted per caller (`identity_caller_commands_total`, admitted or
rate_limited), whether or not rates are set: what an operator sizes the rates from. The label
is the caller when the caller policy or the rates name it, else `other`, so the series stay
bounded whoever connects.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import Counter

OTHER = "other"
DEFAULT = "*"
ADMITTED = "admitted"
RATE_LIMITED = "rate_limited"
MESSAGE = "Too many commands from this caller; try again later."
_RATE = re.compile(r"(\d+(?:\.\d+)?)/s")
# Buckets kept before the full ones are dropped (a full bucket is what a new one would be).
_PRUNE_AT = 4096


class RatesError(ValueError):
    """`IDENTITY_CALLER_RATES` does not parse; the message says where."""


@dataclass(frozen=True, slots=True)
class Rate:
    per_s: float

    @property
    def burst(self) -> float:
        """Tokens a full bucket holds: the rate, and never less than one command."""
        return max(1.0, self.per_s)


@dataclass(frozen=True, slots=True)
class CallerRates:
    """The parsed setting: a rate per named caller, and the default (`*`) or None."""

    named: dict[str, Rate]
    default: Rate | None = None

    @classmethod
    def none(cls) -> CallerRates:
        """No rates: every caller is admitted (and still counted)."""
        return cls({})

    @classmethod
    def parse(cls, text: str) -> CallerRates:
        named: dict[str, Rate] = {}
        default: Rate | None = None
        entries = [entry.strip() for entry in text.split(";") if entry.strip()]
        if not entries:
            raise RatesError("names no caller (expected user=N/s;*=N/s)")
        for entry in entries:
            user, sep, value = (part.strip() for part in entry.partition("="))
            if not sep or not user:
                raise RatesError(f"{entry!r} is not user=N/s")
            rate = _parse_rate(user, value)
            if user in named or (user == DEFAULT and default is not None):
                raise RatesError(f"user {user!r} is given twice")
            if user == DEFAULT:
                default = rate
            else:
                named[user] = rate
        return cls(named, default)

    @property
    def users(self) -> frozenset[str]:
        return frozenset(self.named)

    def rate_of(self, caller: str | None) -> Rate | None:
        """The caller's rate; None when it is not limited."""
        named = self.named.get(caller) if caller is not None else None
        return named if named is not None else self.default


def _parse_rate(user: str, value: str) -> Rate:
    found = _RATE.fullmatch(value.replace(" ", ""))
    per_s = float(found.group(1)) if found else 0.0
    if per_s <= 0 or not math.isfinite(per_s):
        raise RatesError(f"the rate of {user!r} must be a positive number of commands, N/s")
    return Rate(per_s)


class TokenBucket:
    """Tokens refill at `rate.per_s` up to `rate.burst`; a command takes one."""

    __slots__ = ("_tokens", "_updated")

    def __init__(self, rate: Rate, now: float) -> None:
        self._tokens = rate.burst
        self._updated = now

    def take(self, rate: Rate, now: float) -> float:
        """0.0 when a token was taken; else the seconds until one will be there."""
        self._refill(rate, now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / rate.per_s

    def full(self, rate: Rate, now: float) -> bool:
        self._refill(rate, now)
        return self._tokens >= rate.burst

    def _refill(self, rate: Rate, now: float) -> None:
        # A clock that went back (it should not: monotonic) refills nothing.
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(rate.burst, self._tokens + elapsed * rate.per_s)
        self._updated = max(self._updated, now)


class RateGate:
    """Admits a caller's command or says how long to wait; counts both per caller label."""

    def __init__(
        self,
        rates: CallerRates,
        commands_total: Counter,
        *,
        known: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rates = rates
        self._clock = clock
        self._buckets: dict[str | None, TokenBucket] = {}
        self._prune_at = _PRUNE_AT
        # Children looked up once: labels() takes a lock each time.
        labels = {*known, *rates.users, OTHER}
        self._counts = {
            (label, decision): commands_total.labels(label, decision)
            for label in labels
            for decision in (ADMITTED, RATE_LIMITED)
        }

    def admit(self, caller: str | None) -> int | None:
        """None when the command may run; else `retry_after_s` (at least 1)."""
        label = caller if caller is not None and (caller, ADMITTED) in self._counts else OTHER
        wait = self._wait(caller)
        if wait is None:
            self._counts[label, ADMITTED].inc()
            return None
        self._counts[label, RATE_LIMITED].inc()
        return max(1, math.ceil(wait))

    def _wait(self, caller: str | None) -> float | None:
        rate = self._rates.rate_of(caller)
        if rate is None:
            return None
        now = self._clock()
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= self._prune_at:
                self._prune(now)
                # Amortised: the next sweep waits until the buckets still held have doubled.
                self._prune_at = max(_PRUNE_AT, 2 * len(self._buckets))
            bucket = self._buckets[caller] = TokenBucket(rate, now)
        wait = bucket.take(rate, now)
        return None if wait == 0.0 else wait

    def _prune(self, now: float) -> None:
        """Forget the full buckets: a caller back after a pause gets a full one anyway."""
        for caller, bucket in list(self._buckets.items()):
            rate = self._rates.rate_of(caller)
            if rate is None or bucket.full(rate, now):
                del self._buckets[caller]
