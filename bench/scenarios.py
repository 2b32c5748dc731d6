"""What one benchmark run measures, scenario by scenario (see BENCHMARKS.md for the why)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import astuple, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from env import ROOT, CpuMeter, Sandbox, WorkerProcess, git_head, worker_env
from loadgen import LoadGenerator, MakeRequest, Sample, latency_summary

from messages.topology import COMMANDS_EXCHANGE
from services.ids import new_account_id, new_session_id
from services.passwords import HashingPool, huge_pages_settings, make_hasher
from services.tokens import TokenSigner, format_signing_key, new_signing_key, parse_signing_keys
from stores.postgres import migrate
from stores.records import AccountRecord, SessionRecord
from worker.settings import load_settings
from worker.topology import FAST_QUEUE, PASSWORD_QUEUE

PASSWORD = "Plum-orbit-castle-7319-quiet"  # noqa: S105 - the bench accounts' password
FAST_WINDOW = 128  # > the fast prefetch (64): the consumer never waits for the generator
PASSWORD_WINDOW = 16  # > the password prefetch (4)


def window_for(command: str) -> int:
    return PASSWORD_WINDOW if command in ("account.create", "session.start") else FAST_WINDOW


MIX = {
    "session.verify": 0.85,
    "account.get": 0.08,
    "session.end": 0.05,
    "session.start": 0.012,
    "account.create": 0.008,
}
BACKLOG_RATE = 200.0


@dataclass(frozen=True)
class Durations:
    warmup: float
    fast: float
    password: float
    mix: float
    backlog: float

    @classmethod
    def pick(cls, quick: bool) -> Durations:
        return cls(2, 5, 8, 8, 8) if quick else cls(3, 12, 20, 15, 15)


class State:
    """Accounts and sessions written straight to the database (a real argon2 hash of
    PASSWORD, tokens signed with the worker's key), and the request bodies built on them."""

    def __init__(self, signer: TokenSigner, run_id: str) -> None:
        self.signer = signer
        self.run_id = run_id
        self.account_ids: list[str] = []
        self.emails: list[str] = []
        self.verify_tokens: list[str] = []
        self.end_tokens: list[str] = []
        self._next_end = 0
        self._keys = 0

    async def write(self, database_url: str, password_hash: str, accounts: int, ends: int) -> None:
        now = datetime.now(UTC)
        account_rows, session_rows = [], []
        for n in range(accounts):
            email = f"user{n}-{self.run_id}@bench.example.com"
            record = AccountRecord(
                new_account_id(now), email, email, "Bench User", password_hash, now, now, 1
            )
            account_rows.append(astuple(record))
            self.account_ids.append(record.id)
            self.emails.append(email)
        kid = self.signer.current_kid
        expires = now + timedelta(hours=12)
        for n in range(accounts + ends):
            session = SessionRecord(
                new_session_id(), self.account_ids[n % accounts], kid, now, expires, now
            )
            session_rows.append(astuple(session))
            token = self.signer.sign(session.id, kid)
            (self.verify_tokens if n < accounts else self.end_tokens).append(token)
        conn = await asyncpg.connect(database_url)
        try:
            columns = [f.name for f in fields(AccountRecord)]
            await conn.copy_records_to_table("accounts", records=account_rows, columns=columns)
            columns = [f.name for f in fields(SessionRecord)]
            await conn.copy_records_to_table("sessions", records=session_rows, columns=columns)
        finally:
            await conn.close()

    def key(self) -> str:
        self._keys += 1
        return f"{self.run_id}-{self._keys}"

    def body(self, command: str, n: int) -> bytes:
        if command == "session.verify":
            token = self.verify_tokens[n % len(self.verify_tokens)]
            return orjson.dumps({"payload": {"token": token}})
        if command == "account.get":
            account_id = self.account_ids[n % len(self.account_ids)]
            return orjson.dumps({"payload": {"account_id": account_id}})
        if command == "session.end":
            # Each end takes a live session of its own; wrapping round would end ended ones.
            token = self.end_tokens[self._next_end % len(self.end_tokens)]
            self._next_end += 1
            return orjson.dumps({"idempotency_key": self.key(), "payload": {"token": token}})
        if command == "account.create":
            key = self.key()
            payload = {
                "email": f"new-{key}@bench.example.com",
                "password": PASSWORD,
                "display_name": "Bench User",
            }
            return orjson.dumps({"idempotency_key": key, "payload": payload})
        if command == "session.start":
            email = self.emails[n % len(self.emails)]
            payload = {"email": email, "password": PASSWORD}
            return orjson.dumps({"idempotency_key": self.key(), "payload": payload})
        raise ValueError(command)

    def maker(self, command: str) -> MakeRequest:
        return lambda n: (command, self.body(command, n))

    def mix_maker(self, seed: int = 7) -> MakeRequest:
        rng = random.Random(seed)
        names, weights = list(MIX), list(MIX.values())

        def make(n: int) -> tuple[str, bytes]:
            command = rng.choices(names, weights)[0]
            return command, self.body(command, n)

        return make

    @property
    def ends_used(self) -> int:
        return self._next_end


# -- ceilings -------------------------------------------------------------------------------


async def prepare(
    sandbox: Sandbox, tag: str, password_hash: str, *, ends: int
) -> tuple[State, str]:
    """The sandbox's database migrated and holding 2,000 accounts (whose password hashes to
    `password_hash`) and `ends` live sessions; returns them as a `State`, and the signing keys
    (for IDENTITY_SIGNING_KEYS) their tokens are signed with."""
    await migrate(sandbox.database_url, worker_role=sandbox.worker_role)
    keys = format_signing_key(new_signing_key())
    state = State(TokenSigner(parse_signing_keys(keys)), tag)
    await state.write(sandbox.database_url, password_hash, accounts=2000, ends=ends)
    return state, keys


async def argon2_ceiling(seconds: float) -> dict[str, Any]:
    """Hashes (and verifications) per second with the worker's default argon2 parameters and
    pool size, the pool kept full, nothing else running."""
    s = load_settings({}, keys_needed=False)  # the defaults, which need no keys
    hasher = make_hasher(s.argon2_time_cost, s.argon2_memory_kib, s.argon2_parallelism)
    pool = HashingPool(hasher, workers=s.effective_hash_workers)
    out: dict[str, Any] = {
        "time_cost": s.argon2_time_cost,
        "memory_kib": s.argon2_memory_kib,
        "parallelism": s.argon2_parallelism,
        "pool_workers": s.effective_hash_workers,
        **huge_pages_settings(),
    }
    try:
        stored = await pool.hash(PASSWORD)
        for name, work in (
            ("hash", lambda: pool.hash(PASSWORD)),
            ("verify", lambda: pool.verify(stored, PASSWORD)),
        ):
            done = 0
            deadline = time.perf_counter() + seconds
            started = time.perf_counter()

            async def lane(work: Any = work, deadline: float = deadline) -> None:
                nonlocal done
                while time.perf_counter() < deadline:
                    await work()
                    done += 1

            await asyncio.gather(*(lane() for _ in range(2 * pool.workers)))
            out[f"{name}_per_s"] = round(done / (time.perf_counter() - started), 2)
        out["password_hash"] = stored
    finally:
        pool.close()
    return out


async def broker_ceiling(
    sandbox: Sandbox, gen: LoadGenerator, state: State, d: Durations, *, floor: bool = True
) -> dict[str, Any]:
    """The bare consumer's throughput (closed loop), and with `floor` its latency at the
    backlog scenario's rate (open loop): the tail that the broker and the machine alone give a
    consumer doing nothing, to read the worker's backlog p99 against."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "ceiling.py"), sandbox.amqp_url, "session.verify"],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.to_thread(process.stdout.readline)
        if line.strip() != b"ready":
            raise RuntimeError("the ceiling consumer did not start")
        meter, out = CpuMeter([process.pid]), {}
        with meter.span(out):
            sample = await gen.closed_loop(
                state.maker("session.verify"), window=FAST_WINDOW, warmup=d.warmup, seconds=d.fast
            )
        result = {**sample.summary(), **_cpu_per_command(out, sample)}
        if floor:
            await asyncio.sleep(2)  # what the closed loop left to flush is not the floor's
            slow = await gen.open_loop(
                state.maker("session.verify"), rate=BACKLOG_RATE, seconds=d.backlog
            )
            result["at_backlog_rate"] = slow.summary()
        return result
    finally:
        process.terminate()
        process.wait(timeout=30)


def _cpu_per_command(cpu: dict[str, float], sample: Sample) -> dict[str, float]:
    rate = sample.completed / sample.seconds if sample.seconds else 0
    out = dict(cpu)
    if rate:
        out["worker_cpu_ms_per_command"] = round(1000 * cpu["cpu_worker_cores"] / rate, 3)
    return out


# -- the worker -----------------------------------------------------------------------------


async def queue_depth(gen: LoadGenerator, queue: str) -> int:
    channel = await gen.connection.channel()
    try:
        declared = await channel.queue_declare(queue, passive=True)
        return int(declared.message_count or 0)
    finally:
        await channel.close()


async def purge(gen: LoadGenerator, queue: str) -> None:
    channel = await gen.connection.channel()
    try:
        await channel.queue_purge(queue)
    finally:
        await channel.close()


async def per_command(
    worker: WorkerProcess, gen: LoadGenerator, state: State, d: Durations
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    plan = [
        ("session.verify", FAST_WINDOW, d.fast),
        ("account.get", FAST_WINDOW, d.fast),
        ("session.end", FAST_WINDOW, d.fast),
        ("account.create", PASSWORD_WINDOW, d.password),
        ("session.start", PASSWORD_WINDOW, d.password),
    ]
    for command, window, seconds in plan:
        meter, cpu = CpuMeter([worker.pid]), {}
        with meter.span(cpu):
            sample = await gen.closed_loop(
                state.maker(command), window=window, warmup=d.warmup, seconds=seconds
            )
        results[command] = {**sample.summary(), **_cpu_per_command(cpu, sample)}
    results["session.end"]["live_sessions_left"] = max(0, len(state.end_tokens) - state.ends_used)
    return results


async def mix(
    gen: LoadGenerator, state: State, rate: float, d: Durations, worker: WorkerProcess
) -> dict[str, Any]:
    meter, cpu = CpuMeter([worker.pid]), {}
    with meter.span(cpu):
        sample = await gen.open_loop(state.mix_maker(), rate=rate, seconds=d.mix)
    out: dict[str, Any] = {"offered_per_s": round(rate, 1), **sample.summary(), **cpu}
    out["by_command"] = {k: latency_summary(v) for k, v in sorted(sample.by_command.items())}
    return out


async def backlog(gen: LoadGenerator, state: State, d: Durations) -> dict[str, Any]:
    """1,000 account.create queued, then session.verify at 200/s while they are worked off."""
    creates = [("account.create", state.body("account.create", n)) for n in range(1000)]
    await gen.publish_many(creates, tag="create")
    before = await queue_depth(gen, PASSWORD_QUEUE)
    sample = await gen.open_loop(
        state.maker("session.verify"), rate=BACKLOG_RATE, seconds=d.backlog
    )
    after = await queue_depth(gen, PASSWORD_QUEUE)
    await purge(gen, PASSWORD_QUEUE)
    await asyncio.sleep(3)  # let the worker finish the creates it had prefetched
    await purge(gen, PASSWORD_QUEUE)
    return {
        "rate_per_s": BACKLOG_RATE,
        "password_queue_at_start": before,
        "password_queue_at_end": after,
        **sample.summary(),
    }


async def rss_under_backlog(
    sandbox: Sandbox, gen: LoadGenerator, state: State, env: dict[str, str], logs: Path
) -> dict[str, Any]:
    """Peak RSS of a worker started on a 10,000-command backlog (9,500 cheap commands and 500
    account.create), with the default prefetch and with a large one."""
    results: dict[str, Any] = {}
    for label, extra in (
        ("default_prefetch", {}),
        (
            "large_prefetch",
            {"IDENTITY_FAST_PREFETCH": "10000", "IDENTITY_PASSWORD_PREFETCH": "500"},
        ),
    ):
        fast = [("session.verify", state.body("session.verify", n)) for n in range(8000)]
        fast += [("account.get", state.body("account.get", n)) for n in range(1000)]
        fast += [("session.end", state.body("session.end", n)) for n in range(500)]
        random.Random(3).shuffle(fast)
        slow = [("account.create", state.body("account.create", n)) for n in range(500)]
        fast_tag, slow_tag = f"fast{label}", f"slow{label}"
        await gen.publish_many(slow, tag=slow_tag)
        await gen.publish_many(fast, tag=fast_tag)
        queued = await queue_depth(gen, FAST_QUEUE) + await queue_depth(gen, PASSWORD_QUEUE)
        worker = WorkerProcess({**env, **extra}, logs / f"worker-rss-{label}.log")
        started = time.perf_counter()
        worker.start(wait=False)
        try:
            deadline = started + 300
            while gen.unmatched[fast_tag] < len(fast) and time.perf_counter() < deadline:
                await asyncio.sleep(0.1)
            drained = time.perf_counter() - started
            await asyncio.sleep(5)  # prefetched creates keep argon2 busy meanwhile
            results[label] = {
                "queued": queued,
                "fast_replies": gen.unmatched[fast_tag],
                "fast_backlog_worked_off_s": round(drained, 2),
                "create_replies": gen.unmatched[slow_tag],
                "peak_rss_mib": round(worker.peak_rss_mib(), 1),
            }
        finally:
            await purge(gen, PASSWORD_QUEUE)
            worker.stop()
            # What the stopped worker had prefetched went back to the queue.
            await purge(gen, PASSWORD_QUEUE)
    return results


async def scaling(
    env: dict[str, str], gen: LoadGenerator, state: State, d: Durations, logs: Path
) -> dict[str, Any]:
    """session.verify throughput with one worker process and with two, same generator."""
    results: dict[str, Any] = {}
    for count in (1, 2):
        workers = [
            WorkerProcess(env, logs / f"worker-scale{count}-{n}.log").start() for n in range(count)
        ]
        try:
            meter, cpu = CpuMeter([w.pid for w in workers]), {}
            with meter.span(cpu):
                sample = await gen.closed_loop(
                    state.maker("session.verify"),
                    window=FAST_WINDOW * count,
                    warmup=d.warmup,
                    seconds=d.fast,
                )
            results[f"{count}_worker"] = {**sample.summary(), **_cpu_per_command(cpu, sample)}
        finally:
            for worker in workers:
                worker.stop()
    one, two = results["1_worker"]["throughput"], results["2_worker"]["throughput"]
    results["ratio"] = round(two / one, 3) if one else None
    return results


# -- one full run ---------------------------------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def bracket(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """A ceiling measured before and after what is compared with it: the mean of every number
    both have, and both measurements."""
    mean = {
        key: round((value + after[key]) / 2, 3)
        for key, value in before.items()
        if _number(value) and _number(after.get(key))
    }
    return {**mean, "before": before, "after": after}


@contextlib.asynccontextmanager
async def verify_unrouted_to_worker(gen: LoadGenerator) -> AsyncIterator[None]:
    """The stopped worker's fast queue unbound from session.verify: the bare consumer's queue
    alone receives the commands (rather than a copy piling up for the worker)."""
    channel = await gen.connection.channel()
    try:
        await channel.queue_unbind(FAST_QUEUE, COMMANDS_EXCHANGE, routing_key="session.verify")
        await channel.queue_purge(FAST_QUEUE)
        yield
    finally:
        await channel.queue_bind(FAST_QUEUE, COMMANDS_EXCHANGE, routing_key="session.verify")
        await channel.close()


async def one_run(quick: bool, log: Any) -> dict[str, Any]:
    d = Durations.pick(quick)
    sandbox = Sandbox()
    run_id = secrets.token_hex(3)
    logs = Path(tempfile.mkdtemp(prefix="identity-bench-"))
    out: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(),
        "quick": quick,
        "git": git_head(),
    }
    gen: LoadGenerator | None = None
    worker: WorkerProcess | None = None
    try:
        await sandbox.open()
        log("argon2 ceiling")
        argon2 = await argon2_ceiling(d.password / 2)
        out["argon2_ceiling"] = argon2
        state, keys = await prepare(sandbox, run_id, argon2.pop("password_hash"), ends=60_000)
        gen = LoadGenerator(sandbox.amqp_url)
        await gen.open()
        log("broker ceiling")
        broker_before = await broker_ceiling(sandbox, gen, state, d)
        env = worker_env(sandbox, keys)
        worker = WorkerProcess(env, logs / "worker.log").start()
        log("worker, per command")
        out["worker"] = await per_command(worker, gen, state, d)
        rate = min(
            0.5 * broker_before["throughput"],
            0.7 * argon2["hash_per_s"] / (MIX["account.create"] + MIX["session.start"]),
        )
        log("worker, mix")
        out["mix"] = await mix(gen, state, rate, d, worker)
        log("verify during a create backlog")
        out["backlog_verify"] = await backlog(gen, state, d)
        out["worker"]["peak_rss_mib"] = round(worker.peak_rss_mib(), 1)
        worker.stop()
        # The machine is shared and its speed drifts within minutes: each ceiling is measured
        # again once the worker's per-command scenarios are done, and the ratios divide by the
        # mean of the two (both are kept).
        log("ceilings again")
        async with verify_unrouted_to_worker(gen):
            broker_after = await broker_ceiling(sandbox, gen, state, d)
        out["broker_ceiling"] = bracket(broker_before, broker_after)
        argon2_after = await argon2_ceiling(d.password / 2)
        del argon2_after["password_hash"]
        out["argon2_ceiling"] = bracket(argon2, argon2_after)
        log("rss under a 10k backlog")
        out["rss_10k_backlog"] = await rss_under_backlog(sandbox, gen, state, env, logs)
        log("one worker vs two")
        out["scaling"] = await scaling(env, gen, state, d, logs)
    finally:
        if worker is not None:
            worker.stop()
        if gen is not None:
            with contextlib.suppress(Exception):
                await gen.close()
        await sandbox.close()
    out["worker_logs"] = str(logs)
    return out


@contextlib.asynccontextmanager
async def worker_under_load(
    tag: str, **settings: str
) -> AsyncIterator[tuple[State, WorkerProcess, LoadGenerator]]:
    """A fresh vhost and database with the prepared state, a worker on them (`settings` are
    extra `IDENTITY_*` variables for it) and a generator, all taken down on the way out
    (bench/profile.py, bench/threads.py)."""
    sandbox = Sandbox()
    worker = gen = None
    try:
        await sandbox.open()
        password_hash = (await argon2_ceiling(0.1))["password_hash"]
        state, keys = await prepare(sandbox, tag, password_hash, ends=60_000)
        worker = WorkerProcess(
            worker_env(sandbox, keys, **settings), Path(tempfile.mkdtemp()) / "worker.log"
        ).start()
        gen = LoadGenerator(sandbox.amqp_url)
        await gen.open()
        yield state, worker, gen
    finally:
        if gen is not None:
            with contextlib.suppress(Exception):
                await gen.close()
        if worker is not None:
            worker.stop()
        with contextlib.suppress(Exception):
            await sandbox.close()
