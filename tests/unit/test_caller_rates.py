"""Per-caller rates (worker.rates): the setting's grammar, the token bucket on a fake clock,
one bucket per caller, bounded metric labels; and in the pipeline, a command beyond its
caller's rate answered `rate_limited` before any work, with its key left free."""

from __future__ import annotations

import uuid

import pytest

from tests.support.bus import Bus
from tests.support.pipeline import Broker, running_worker
from worker.metrics import create_metrics
from worker.rates import CallerRates, Rate, RateGate, RatesError, TokenBucket
from worker.settings import SettingsError, load_settings


class Ticks:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gate(text: str, *, known: frozenset[str] = frozenset()) -> tuple[RateGate, Ticks, object]:
    metrics = create_metrics()
    ticks = Ticks()
    built = RateGate(
        CallerRates.parse(text), metrics.caller_commands_total, known=known, clock=ticks
    )
    return built, ticks, metrics


def counted(metrics: object, caller: str, decision: str) -> float:
    registry = metrics.registry  # type: ignore[attr-defined]
    value = registry.get_sample_value(
        "identity_caller_commands_total", {"caller": caller, "decision": decision}
    )
    return 0.0 if value is None else float(value)


# The setting


def test_rates_name_callers_and_a_default() -> None:
    rates = CallerRates.parse(" web = 50/s ; batch=0.5/s;*=10/s ")
    assert rates.named == {"web": Rate(50.0), "batch": Rate(0.5)}
    assert rates.default == Rate(10.0)
    assert rates.rate_of("web") == Rate(50.0)
    assert rates.rate_of("someone-else") == Rate(10.0)
    assert rates.rate_of(None) == Rate(10.0)


def test_without_a_default_callers_not_named_are_not_limited() -> None:
    rates = CallerRates.parse("web=5/s")
    assert rates.rate_of("admin") is None
    assert rates.rate_of(None) is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        ";",
        "web",
        "web=",
        "=5/s",
        "web=5",
        "web=5/m",
        "web=0/s",
        "web=-1/s",
        "web=x/s",
        "web=5/s;web=6/s",
        "*=1/s;*=2/s",
        "web=1e3/s",
    ],
)
def test_a_rate_that_does_not_parse_is_refused(text: str) -> None:
    with pytest.raises(RatesError):
        CallerRates.parse(text)


def test_the_setting_is_checked_at_start_and_named_when_wrong() -> None:
    dev = {"IDENTITY_DEV_MODE": "true"}
    assert load_settings(dev).parsed_caller_rates() == CallerRates.none()
    loaded = load_settings({**dev, "IDENTITY_CALLER_RATES": "web=5/s;*=1/s"})
    assert loaded.parsed_caller_rates().rate_of("web") == Rate(5.0)
    with pytest.raises(SettingsError, match=r"^IDENTITY_CALLER_RATES: "):
        load_settings({**dev, "IDENTITY_CALLER_RATES": "web=fast"})


# The bucket


def test_a_full_bucket_admits_a_burst_of_the_rate_then_one_per_interval() -> None:
    rate = Rate(4.0)
    bucket = TokenBucket(rate, now=0.0)
    assert [bucket.take(rate, 0.0) for _ in range(4)] == [0.0] * 4
    assert bucket.take(rate, 0.0) == pytest.approx(0.25)  # the next token in a quarter second
    assert bucket.take(rate, 0.1) == pytest.approx(0.15)
    assert bucket.take(rate, 0.25) == 0.0
    assert bucket.take(rate, 0.25) == pytest.approx(0.25)


def test_an_idle_bucket_fills_up_to_its_burst_and_no_further() -> None:
    rate = Rate(2.0)
    bucket = TokenBucket(rate, now=0.0)
    for _ in range(2):
        bucket.take(rate, 0.0)
    admitted = [bucket.take(rate, 3600.0) == 0.0 for _ in range(3)]
    assert admitted == [True, True, False]


def test_a_rate_below_one_a_second_still_admits_one_command() -> None:
    rate = Rate(0.5)
    bucket = TokenBucket(rate, now=0.0)
    assert bucket.take(rate, 0.0) == 0.0
    assert bucket.take(rate, 0.0) == pytest.approx(2.0)
    assert bucket.take(rate, 2.0) == 0.0


def test_a_clock_going_back_refills_nothing() -> None:
    rate = Rate(1.0)
    bucket = TokenBucket(rate, now=10.0)
    assert bucket.take(rate, 10.0) == 0.0
    assert bucket.take(rate, 5.0) > 0.0


# The gate


def test_beyond_its_rate_a_caller_is_told_whole_seconds_to_wait() -> None:
    limiter, ticks, _ = gate("web=2/s")
    assert [limiter.admit("web") for _ in range(3)] == [None, None, 1]
    ticks.now += 0.5
    assert limiter.admit("web") is None


def test_a_slow_rate_names_the_seconds_until_its_next_token() -> None:
    limiter, _, _ = gate("batch=0.2/s")
    assert limiter.admit("batch") is None
    assert limiter.admit("batch") == 5


def test_one_caller_at_its_limit_leaves_the_others_untouched() -> None:
    limiter, _, _ = gate("web=1/s;*=3/s")
    assert limiter.admit("web") is None
    assert limiter.admit("web") == 1
    # Each caller not named has a bucket of its own at the default rate.
    for caller in ("admin", "reports"):
        assert [limiter.admit(caller) for _ in range(4)] == [None, None, None, 1]
    # Commands without a user_id (dev mode's open policy) share one bucket.
    assert [limiter.admit(None) for _ in range(4)] == [None, None, None, 1]


def test_without_rates_every_command_is_admitted_and_counted() -> None:
    metrics = create_metrics()
    limiter = RateGate(CallerRates.none(), metrics.caller_commands_total, known={"web"})
    assert all(limiter.admit("web") is None for _ in range(1000))
    assert counted(metrics, "web", "admitted") == 1000


def test_metric_labels_are_the_named_callers_and_other_whoever_connects() -> None:
    limiter, _, metrics = gate("web=1/s;*=1/s", known=frozenset({"admin"}))
    for n in range(50):
        limiter.admit(f"stranger-{n}")
        limiter.admit(f"stranger-{n}")
    limiter.admit("web")
    limiter.admit("web")
    limiter.admit("admin")
    assert counted(metrics, "other", "admitted") == 50
    assert counted(metrics, "other", "rate_limited") == 50
    assert counted(metrics, "web", "rate_limited") == 1
    assert counted(metrics, "admin", "admitted") == 1
    registry = metrics.registry  # type: ignore[attr-defined]
    callers = {
        sample.labels["caller"]
        for family in registry.collect()
        if family.name == "identity_caller_commands"
        for sample in family.samples
    }
    assert callers == {"web", "admin", "other"}


def test_buckets_of_callers_gone_quiet_are_forgotten() -> None:
    limiter, ticks, _ = gate("*=1/s")
    for n in range(5000):
        limiter.admit(f"early-{n}")
    ticks.now += 2  # the early buckets are full again: what a new one would be
    for n in range(5000):
        limiter.admit(f"late-{n}")
    held = set(limiter._buckets)
    assert not any(str(caller).startswith("early-") for caller in held)
    assert len(held) == 5000


# In the pipeline (in-memory broker and store)


async def test_a_command_beyond_the_rate_is_answered_before_any_work_and_its_key_stays_free() -> (
    None
):
    broker = Broker.in_memory()
    async with running_worker(broker, caller_rates="guest=1/s") as worker:
        ticks = Ticks()  # the gate's clock, moved by the test alone: no race with a slow machine
        rate_gate = worker.parts.processor._rates
        assert rate_gate is not None
        rate_gate._clock = ticks
        registry = worker.parts.metrics.registry
        bus = await Bus.attach(await broker.connect())
        try:
            first = await bus.call("account.create", _account())
            hashed = registry.get_sample_value("identity_hash_seconds_count", {"operation": "hash"})
            key = uuid.uuid4().hex
            payload = _account()
            limited = await bus.call("account.create", payload, key)
            hashed_since = registry.get_sample_value(
                "identity_hash_seconds_count", {"operation": "hash"}
            )

            ticks.now += 1  # a token again
            created = await bus.call("account.create", payload, key)
        finally:
            await bus.close()

    assert first["ok"] is True, first
    assert limited["ok"] is False
    assert limited["idempotency_key"] == key
    error = limited["error"]
    assert (error["code"], error["retry_after_s"]) == ("rate_limited", 1)
    assert error["message"] == "Too many commands from this caller; try again later."
    assert hashed_since == hashed  # no argon2 for it
    # The same key runs once a token has come: the refusal stored nothing under it.
    assert created["result"]["account"]["email"] == payload["email"]
    assert created["idempotency_key"] == key


async def test_malformed_messages_beyond_the_rate_are_answered_without_a_dead_letter_each() -> None:
    """A caller flooding with bodies that are not commands pays from the same bucket: beyond
    its rate each is answered `rate_limited` before it is parsed, and no dead letter is
    published for it (within the rate, it is refused and dead-lettered as always)."""
    broker = Broker.in_memory()
    async with running_worker(broker, caller_rates="guest=1/s") as worker:
        ticks = Ticks()
        rate_gate = worker.parts.processor._rates
        assert rate_gate is not None
        rate_gate._clock = ticks
        registry = worker.parts.metrics.registry

        def dead_letters() -> float:
            sample = registry.get_sample_value(
                "identity_dead_letters_total", {"reason": "malformed_json"}
            )
            return sample or 0.0

        bus = await Bus.attach(await broker.connect())
        try:
            first = await bus.reply(await bus.publish("session.verify", b"not json"))
            after_first = dead_letters()
            flood = [await bus.publish("session.verify", b"not json") for _ in range(20)]
            answers = [await bus.reply(cid) for cid in flood]
            keyed = await bus.reply(
                await bus.publish("session.verify", b'{"idempotency_key": "k-1", "payload": 1}')
            )
            ticks.now += 1
            after_flood = dead_letters()
            again = await bus.reply(await bus.publish("session.verify", b"not json"))
            after_refill = dead_letters()
        finally:
            await bus.close()

    assert first["error"]["code"] == "malformed_message"
    assert {a["error"]["code"] for a in answers} == {"rate_limited"}
    assert keyed["error"]["code"] == "rate_limited"
    assert keyed["idempotency_key"] == "k-1"  # echoed, so a retry can be matched
    assert again["error"]["code"] == "malformed_message"
    # A dead letter for the first and for the one after the refill, none for the flood.
    assert (after_first, after_flood, after_refill) == (1, 1, 2)


def _account() -> dict[str, str]:
    email = f"rate-{uuid.uuid4().hex[:10]}@example.com"
    return {"email": email, "password": "a long enough passphrase", "display_name": "Ada"}
