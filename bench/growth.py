"""Cost as the data grows, and a soak that shows purging keeps the tables bounded.

    .venv/bin/python bench/growth.py [--accounts N] [--sessions N] [--keyed-per-s R]
                                     [--quick] [--out bench/results/NAME.json]
    .venv/bin/python bench/growth.py --soak-minutes 30 [--soak-rate 200] [--out ...]

Growth (the default): the same measurements, in one run, on an empty database (2,000
accounts, as bench/run.py prepares it) and on a grown one, and the ratios grown / empty. The
empty database is measured before and after the grown one and the ratios divide by the mean
of the two (the machine drifts). The grown database gets, written straight to the database
with COPY:

- `--accounts` accounts (1,000,000), created over the past year;
- `--sessions` sessions (10,000,000) in the mix a table purged after a day holds at a steady
  sign-in rate: a third created 24 to 48 h ago and expired, never ended (ended ones of that
  age are purged); a third created in the last 24 h and ended within two hours; a third
  created in the last 24 h and still open (most idle);
- a day of idempotency records and a day of published outbox events at `--keyed-per-s`
  commands per second (default: what the session mix implies, sessions started and ended
  in a day over 86,400 s), their replies and bodies copied from the rows the worker wrote
  while the empty database was measured.

Then VACUUM (ANALYZE), as autovacuum would have left tables that grew over days. Measured on
both: `session.verify` closed loop (throughput, p99) and open loop at a fixed rate (p99),
`session.start` and `account.create` closed loop; on the grown database `session.verify`
also over tokens of 100,000 sessions spread over the table (the empty database has no more
than 2,000 to verify), a working set that no longer stays in shared buffers.

Soak (--soak-minutes N): a fresh database with a day of idempotency records at the soak's
keyed rate (so rows fall out of the 24 h retention as fast as new ones come in), then the
mix of bench/run.py open loop at --soak-rate for N minutes, minute by minute: throughput,
p50/p99, and every table's pg_total_relation_size. The worker purges every 600 s (fixed);
the soak shortens IDENTITY_SESSION_LIFETIME_S and IDENTITY_OUTBOX_RETENTION_S to 300 s so
sessions and events are purged within the run (idempotency keeps its 24 h minimum).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import random
import re
import secrets
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import uvloop
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))

from env import ROOT, CpuMeter, Sandbox, WorkerProcess, as_deployed, git_head, worker_env
from loadgen import LoadGenerator, MakeRequest, latency_summary
from scenarios import (
    FAST_WINDOW,
    MIX,
    PASSWORD_WINDOW,
    State,
    _cpu_per_command,
    argon2_ceiling,
    prepare,
)

from services.ids import new_account_id
from services.tokens import TokenSigner

TABLES = ("accounts", "sessions", "idempotency", "outbox", "signin_throttle")
VERIFY_OPEN_RATE = 400.0  # open-loop verify: ~0.2 x the broker ceiling, a normal load
WIDE_TOKENS = 100_000
DAY = 86400
# Crockford base32, the alphabet of the worker's ids, from RFC 4648's.
_B32 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", b"0123456789abcdefghjkmnpqrstvwxyz")
CHUNK = 50_000


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Spans:
    warmup: float
    fast: float
    password: float
    open_loop: float

    @classmethod
    def pick(cls, quick: bool) -> Spans:
        return cls(2, 6, 10, 8) if quick else cls(3, 12, 20, 15)


# -- measuring ------------------------------------------------------------------------------


async def measure(
    sandbox: Sandbox,
    state: State,
    keys: str,
    spans: Spans,
    logs: Path,
    label: str,
    wide: MakeRequest | None = None,
) -> dict[str, Any]:
    """A fresh worker on the sandbox; verify (closed and open loop), start and create."""
    worker = WorkerProcess(worker_env(sandbox, keys), logs / f"worker-{label}.log").start()
    gen = LoadGenerator(sandbox.amqp_url)
    await gen.open()
    out: dict[str, Any] = {}
    before_io = await table_io(sandbox.database_url)
    try:
        plan: list[tuple[str, MakeRequest, int, float]] = [
            ("session.verify", state.maker("session.verify"), FAST_WINDOW, spans.fast)
        ]
        if wide is not None:
            plan.append(("session.verify.wide", wide, FAST_WINDOW, spans.fast))
        plan += [
            ("session.start", state.maker("session.start"), PASSWORD_WINDOW, spans.password),
            ("account.create", state.maker("account.create"), PASSWORD_WINDOW, spans.password),
        ]
        for name, make, window, seconds in plan:
            meter, cpu = CpuMeter([worker.pid]), {}
            with meter.span(cpu):
                sample = await gen.closed_loop(
                    make, window=window, warmup=spans.warmup, seconds=seconds
                )
            out[name] = {**sample.summary(), **_cpu_per_command(cpu, sample)}
            if name.startswith("session.verify"):
                await asyncio.sleep(1)
                slow = await gen.open_loop(make, rate=VERIFY_OPEN_RATE, seconds=spans.open_loop)
                out[name]["open_loop"] = {"rate_per_s": VERIFY_OPEN_RATE, **slow.summary()}
            log(f"  {label} {name}: {out[name]['throughput']}/s, p99 {out[name]['p99_ms']} ms")
        out["peak_rss_mib"] = round(worker.peak_rss_mib(), 1)
        out["db_query_ms"] = db_query_means(worker.port)
        out["buffers"] = buffer_deltas(before_io, await table_io(sandbox.database_url))
    finally:
        with contextlib.suppress(Exception):
            await gen.close()
        worker.stop()
    out["purges"] = purges_logged(worker.log_path)
    return out


def db_query_means(port: int) -> dict[str, dict[str, float]]:
    """The worker's own timing of each database operation (identity_db_query_seconds):
    count and mean in ms, over the worker's life."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "identity_db_query_seconds":
            continue
        for sample in family.samples:
            operation = sample.labels.get("operation", "")
            if sample.name.endswith("_sum"):
                sums[operation] = sample.value
            elif sample.name.endswith("_count"):
                counts[operation] = sample.value
    return {
        op: {"count": int(counts[op]), "mean_ms": round(1000 * sums[op] / counts[op], 3)}
        for op in sorted(counts)
        if counts[op]
    }


async def table_io(database_url: str) -> dict[str, dict[str, int]]:
    """Blocks each table and its indexes found in shared buffers (hit) or had to read."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT relname, heap_blks_hit, heap_blks_read, idx_blks_hit, idx_blks_read"
            " FROM pg_statio_user_tables WHERE relname = ANY($1::text[])",
            list(TABLES),
        )
    finally:
        await conn.close()
    return {r["relname"]: {k: int(r[k] or 0) for k in list(r.keys())[1:]} for r in rows}


def buffer_deltas(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    return {
        table: {k: v - before.get(table, {}).get(k, 0) for k, v in counters.items()}
        for table, counters in after.items()
        if any(v - before.get(table, {}).get(k, 0) for k, v in counters.items())
    }


def purges_logged(path: Path) -> list[dict[str, Any]]:
    """The worker's "purged expired rows" lines: when, and how many rows of each kind."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if "purged expired rows" in line:
            with contextlib.suppress(ValueError):
                record = orjson.loads(line)
                found.append({"at": record.get("ts") or record.get("time"), **record["purged"]})
    return found


async def table_sizes(database_url: str) -> dict[str, dict[str, int]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT c.relname, pg_total_relation_size(c.oid) AS total,"
            " pg_indexes_size(c.oid) AS indexes, s.n_live_tup, s.n_dead_tup,"
            " s.n_tup_upd, s.n_tup_hot_upd, s.autovacuum_count"
            " FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid"
            " WHERE c.relname = ANY($1::text[])",
            list(TABLES),
        )
    finally:
        await conn.close()
    return {
        r["relname"]: {
            "total_bytes": r["total"],
            "index_bytes": r["indexes"],
            "live_rows": r["n_live_tup"],
            "dead_rows": r["n_dead_tup"],
            "updates": r["n_tup_upd"],
            "hot_updates": r["n_tup_hot_upd"],
            "autovacuums": r["autovacuum_count"],
        }
        for r in rows
    }


# -- growing the data -----------------------------------------------------------------------


def crockford(raw: bytes, chars: int) -> list[str]:
    """`raw` (a multiple of 20 bytes) as 32-character Crockford base32 strings, cut to
    `chars` each: b32encode of 20 bytes is exactly 32 characters, so one call serves a chunk."""
    text = base64.b32encode(raw).translate(_B32).decode()
    return [text[i : i + chars] for i in range(0, len(text), 32)]


def ulids(ms: list[int]) -> list[str]:
    """ULIDs (the worker's account and event ids) for the given millisecond stamps."""
    out = []
    for stamp in ms:
        value = (stamp << 80) | random.getrandbits(80)
        # 130 bits, left-aligned in 20 bytes, encode to 26 characters and six zeros.
        out.append(crockford((value << 30).to_bytes(20, "big"), 26)[0])
    return out


@dataclass
class Templates:
    """Real rows the worker wrote (empty database), copied with new keys and times."""

    idempotency: list[tuple[str, str, str]]  # command, fingerprint, reply (jsonb text)
    outbox: list[tuple[str, bytes]]  # type, body

    @classmethod
    async def read(cls, database_url: str) -> Templates:
        conn = await asyncpg.connect(database_url)
        try:
            idem = await conn.fetch(
                "SELECT command, fingerprint, reply::text FROM idempotency"
                " ORDER BY random() LIMIT 200"
            )
            events = await conn.fetch("SELECT type, body FROM outbox ORDER BY random() LIMIT 200")
        finally:
            await conn.close()
        if not idem or not events:
            raise RuntimeError("no idempotency or outbox rows to copy from the empty run")
        return cls([tuple(r) for r in idem], [(r[0], bytes(r[1])) for r in events])


async def grow(
    database_url: str,
    password_hash: str,
    kid: str,
    templates: Templates,
    *,
    accounts: int,
    sessions: int,
    keyed_per_s: float,
) -> tuple[dict[str, Any], list[str]]:
    """Write the grown data; returns the timings and the ids of open, recently seen
    sessions (to sign the wide set of verify tokens from)."""
    now = datetime.now(UTC)
    timings: dict[str, Any] = {}
    conn = await asyncpg.connect(database_url)
    try:
        started = time.perf_counter()
        account_ids: list[str] = []

        async def account_rows() -> AsyncIterator[tuple[Any, ...]]:
            year = timedelta(days=365)
            for n in range(accounts):
                created = now - year + year * (n / accounts)
                account_id = new_account_id(created)
                account_ids.append(account_id)
                email = f"user{n}@grown.example.com"
                yield (account_id, email, email, "Grown User", password_hash, created, created, 1)

        await conn.copy_records_to_table(
            "accounts",
            records=account_rows(),
            columns=[
                "id",
                "email",
                "email_canonical",
                "display_name",
                "password_hash",
                "created_at",
                "updated_at",
                "version",
            ],
        )
        timings["accounts_s"] = round(time.perf_counter() - started, 1)
        log(f"  {accounts:,} accounts in {timings['accounts_s']} s")

        # Every account_id is one just written: the foreign key's check, a trigger fired for
        # each of the 10,000,000 rows, is skipped during the load only.
        await conn.execute("ALTER TABLE sessions DISABLE TRIGGER ALL")
        wide: list[str] = []
        started = time.perf_counter()
        third = sessions // 3
        two_thirds = sessions - third
        # Every wide_every-th open session of the last 23 h gives the wide set a token.
        wide_every = max(1, two_thirds * 23 // 24 // 2 // WIDE_TOKENS)
        rng = random.Random(17)

        async def session_rows() -> AsyncIterator[tuple[Any, ...]]:
            day, two_hours = timedelta(days=1), timedelta(hours=2)
            for start in range(0, sessions, CHUNK):
                count = min(CHUNK, sessions - start)
                ids = crockford(os.urandom(20 * count), 32)
                for k in range(count):
                    n = start + k
                    session_id = "ses_" + ids[k]
                    account_id = account_ids[rng.randrange(accounts)]
                    if n < third:  # created 24 to 48 h ago, expired, never ended
                        created = now - 2 * day + day * (n / third)
                        seen = created + two_hours * rng.random()
                        yield (session_id, account_id, kid, created, created + day, seen,
                               None, None)  # fmt: skip
                        continue
                    j = n - third
                    created = now - day + day * (j / (sessions - third))
                    lived = min(two_hours * rng.random(), now - created)
                    if j % 2:  # ended within two hours
                        ended = created + lived
                        yield (session_id, account_id, kid, created, created + day,
                               ended, ended, "sign_out")  # fmt: skip
                    elif (
                        (j // 2) % wide_every == 0
                        and len(wide) < WIDE_TOKENS
                        and j > two_thirds // 24
                    ):
                        # open, created within the last 23 h (an hour before it expires) and seen in
                        # the last five minutes: a token the wide set uses
                        seen = now - timedelta(seconds=300 * rng.random())
                        wide.append(session_id)
                        yield (session_id, account_id, kid, created, created + day, seen,
                               None, None)  # fmt: skip
                    else:  # open, mostly idle
                        yield (session_id, account_id, kid, created, created + day,
                               created + lived, None, None)  # fmt: skip

        await conn.copy_records_to_table(
            "sessions",
            records=session_rows(),
            columns=[
                "id",
                "account_id",
                "key_id",
                "created_at",
                "expires_at",
                "last_seen_at",
                "ended_at",
                "end_reason",
            ],
        )
        await conn.execute("ALTER TABLE sessions ENABLE TRIGGER ALL")
        timings["sessions_s"] = round(time.perf_counter() - started, 1)
        log(f"  {sessions:,} sessions in {timings['sessions_s']} s")

        keyed = int(keyed_per_s * DAY)
        timings["idempotency_rows"] = keyed
        started = time.perf_counter()
        await fill_idempotency(conn, templates, keyed, now)
        timings["idempotency_s"] = round(time.perf_counter() - started, 1)
        log(f"  {keyed:,} idempotency records in {timings['idempotency_s']} s")

        started = time.perf_counter()

        async def outbox_rows() -> AsyncIterator[tuple[Any, ...]]:
            for start in range(0, keyed, CHUNK):
                count = min(CHUNK, keyed - start)
                stamps = [now - timedelta(seconds=DAY * (1 - (start + k) / keyed))
                          for k in range(count)]  # fmt: skip
                ids = ulids([int(s.timestamp() * 1000) for s in stamps])
                for k in range(count):
                    kind, body = templates.outbox[(start + k) % len(templates.outbox)]
                    created = stamps[k]
                    yield (
                        "evt_" + ids[k],
                        kind,
                        body,
                        created,
                        created + timedelta(milliseconds=40),
                    )

        await conn.copy_records_to_table(
            "outbox",
            records=outbox_rows(),
            columns=["event_id", "type", "body", "created_at", "published_at"],
        )
        timings["outbox_rows"] = keyed
        timings["outbox_s"] = round(time.perf_counter() - started, 1)
        log(f"  {keyed:,} outbox events in {timings['outbox_s']} s")

        started = time.perf_counter()
        for table in TABLES:
            await conn.execute(f"VACUUM (ANALYZE) {table}")
        timings["vacuum_analyze_s"] = round(time.perf_counter() - started, 1)
        log(f"  VACUUM (ANALYZE) in {timings['vacuum_analyze_s']} s")
    finally:
        await conn.close()
    return timings, wide


async def fill_idempotency(
    conn: asyncpg.Connection, templates: Templates, count: int, now: datetime
) -> None:
    """`count` idempotency records created evenly over the 24 h before `now`."""

    async def rows() -> AsyncIterator[tuple[Any, ...]]:
        for start in range(0, count, CHUNK):
            n = min(CHUNK, count - start)
            keys = os.urandom(16 * n).hex()
            for k in range(n):
                command, fingerprint, reply = templates.idempotency[
                    (start + k) % len(templates.idempotency)
                ]
                created = now - timedelta(seconds=DAY * (1 - (start + k) / count))
                key = keys[32 * k : 32 * k + 32]
                yield (key, command, fingerprint, reply, created)

    await conn.copy_records_to_table(
        "idempotency",
        records=rows(),
        columns=["key", "command", "fingerprint", "reply", "created_at"],
    )


def wide_maker(signer: TokenSigner, ids_or_tokens: list[str], *, signed: bool) -> MakeRequest:
    """session.verify over many sessions' tokens, in a shuffled order."""
    kid = signer.current_kid
    tokens = list(ids_or_tokens) if signed else [signer.sign(i, kid) for i in ids_or_tokens]
    random.Random(5).shuffle(tokens)

    def make(n: int) -> tuple[str, bytes]:
        token = tokens[n % len(tokens)]
        return "session.verify", orjson.dumps({"payload": {"token": token}})

    return make


# -- one growth run -------------------------------------------------------------------------


def dig(data: dict[str, Any], path: str) -> float:
    """The number at `path` in the results, whose keys have dots of their own
    ("session.verify.wide.open_loop.p99_ms"): the longest key that fits comes first."""
    if path in data:
        return float(data[path])
    key = max((k for k in data if path.startswith(k + ".")), key=len)
    return dig(data[key], path[len(key) + 1 :])


FIGURES = {
    # name in the ratios: where the figure is in a measurement
    "verify_throughput": "session.verify.throughput",
    "verify_p99_closed": "session.verify.p99_ms",
    "verify_p99_open": "session.verify.open_loop.p99_ms",
    "verify_wide_throughput": "session.verify.wide.throughput",
    "verify_wide_p99_open": "session.verify.wide.open_loop.p99_ms",
    "verify_cpu_ms": "session.verify.worker_cpu_ms_per_command",
    "verify_wide_cpu_ms": "session.verify.wide.worker_cpu_ms_per_command",
    "start_throughput": "session.start.throughput",
    "create_throughput": "account.create.throughput",
}


def ratios(empty: list[dict[str, Any]], grown: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure: mean over the grown rounds / mean over the empty ones, and round by round
    (grown round i against the empty rounds on either side of it)."""
    out: dict[str, Any] = {}
    for name, path in FIGURES.items():
        e = [dig(m, path) for m in empty]
        g = [dig(m, path) for m in grown]
        out[name] = round(sum(g) / len(g) / (sum(e) / len(e)), 3)
        out[name + "_rounds"] = [round(g[i] / ((e[i] + e[i + 1]) / 2), 3) for i in range(len(g))]
    return out


def db_query_ratios(
    empty: list[dict[str, Any]], grown: list[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """Each database operation's mean time as the worker measured it: the mean over the
    grown rounds, over the empty ones, and their ratio."""
    out = {}
    operations = set.intersection(*(set(m["db_query_ms"]) for m in empty + grown))
    for op in sorted(operations):
        e = sum(m["db_query_ms"][op]["mean_ms"] for m in empty) / len(empty)
        g = sum(m["db_query_ms"][op]["mean_ms"] for m in grown) / len(grown)
        out[op] = {"empty_ms": round(e, 3), "grown_ms": round(g, 3), "ratio": round(g / e, 3)}
    return out


async def growth(args: argparse.Namespace) -> dict[str, Any]:
    spans = Spans.pick(args.quick)
    logs = Path(tempfile.mkdtemp(prefix="identity-growth-"))
    empty, grown = Sandbox(), Sandbox()
    out: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(),
        "git": git_head(),
        "accounts": args.accounts,
        "sessions": args.sessions,
        "keyed_per_s": round(args.keyed_per_s, 1),
        "wide_tokens": WIDE_TOKENS,
        "verify_open_rate": VERIFY_OPEN_RATE,
    }
    try:
        await empty.open()
        await grown.open()
        password_hash = (await argon2_ceiling(0.1))["password_hash"]
        # The empty database: 2,000 accounts with a session each, and WIDE_TOKENS open
        # sessions more, the wide set (a whole table of them fits in shared buffers).
        empty_state, empty_keys = await prepare(
            empty, "e" + secrets.token_hex(2), password_hash, ends=WIDE_TOKENS
        )
        grown_state, grown_keys = await prepare(
            grown, "g" + secrets.token_hex(2), password_hash, ends=0
        )
        empty_wide = wide_maker(empty_state.signer, empty_state.end_tokens, signed=True)
        runs: dict[str, list[dict[str, Any]]] = {"empty": [], "grown": []}

        async def empty_round() -> None:
            label = f"empty{len(runs['empty']) + 1}"
            log(f"empty database, round {len(runs['empty']) + 1}")
            runs["empty"].append(
                await measure(empty, empty_state, empty_keys, spans, logs, label, wide=empty_wide)
            )

        await empty_round()
        templates = await Templates.read(empty.database_url)
        log(
            f"growing: {args.accounts:,} accounts, {args.sessions:,} sessions, "
            f"{int(args.keyed_per_s * DAY):,} idempotency and outbox rows"
        )
        started = time.perf_counter()
        out["load"], wide_ids = await grow(
            grown.database_url,
            password_hash,
            grown_state.signer.current_kid,
            templates,
            accounts=args.accounts,
            sessions=args.sessions,
            keyed_per_s=args.keyed_per_s,
        )
        out["load"]["total_s"] = round(time.perf_counter() - started, 1)
        out["sizes_after_load"] = await table_sizes(grown.database_url)
        grown_wide = wide_maker(grown_state.signer, wide_ids, signed=False)
        for n in range(args.rounds):
            log(f"grown database, round {n + 1}")
            runs["grown"].append(
                await measure(
                    grown, grown_state, grown_keys, spans, logs, f"grown{n + 1}", wide=grown_wide
                )
            )
            await empty_round()
        out["sizes_after_rounds"] = await table_sizes(grown.database_url)
        out["empty"], out["grown"] = runs["empty"], runs["grown"]
        out["ratios"] = ratios(runs["empty"], runs["grown"])
        out["db_query_ratios"] = db_query_ratios(runs["empty"], runs["grown"])
    finally:
        await empty.close()
        await grown.close()
    out["worker_logs"] = str(logs)
    return out


# -- soak -----------------------------------------------------------------------------------


SOAK_SETTINGS = {
    "IDENTITY_SESSION_LIFETIME_S": "300",
    "IDENTITY_SESSION_IDLE_TIMEOUT_S": "300",  # may not exceed the lifetime
    "IDENTITY_OUTBOX_RETENTION_S": "300",
}


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    rate, minutes = args.soak_rate, args.soak_minutes
    keyed_share = MIX["session.end"] + MIX["session.start"] + MIX["account.create"]
    ends_needed = int(rate * MIX["session.end"] * 60 * minutes * 1.2) + 1000
    logs = Path(tempfile.mkdtemp(prefix="identity-soak-"))
    sandbox = Sandbox()
    out: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(),
        "git": git_head(),
        "rate_per_s": rate,
        "minutes": minutes,
        "settings": SOAK_SETTINGS,
        "mix": MIX,
    }
    worker = gen = None
    try:
        await sandbox.open()
        password_hash = (await argon2_ceiling(0.1))["password_hash"]
        state, keys = await prepare(sandbox, "s" + secrets.token_hex(2), password_hash,
                                    ends=ends_needed)  # fmt: skip
        worker = WorkerProcess(worker_env(sandbox, keys, **SOAK_SETTINGS), logs / "worker.log")
        worker.start()
        gen = LoadGenerator(sandbox.amqp_url)
        await gen.open()
        log("warm-up (and rows to copy)")
        await gen.open_loop(state.mix_maker(seed=1), rate=rate, seconds=20)
        templates = await Templates.read(sandbox.database_url)
        keyed = int(rate * keyed_share * DAY)
        started = time.perf_counter()
        conn = await asyncpg.connect(sandbox.database_url)
        try:
            await fill_idempotency(conn, templates, keyed, datetime.now(UTC))
            await conn.execute("VACUUM (ANALYZE) idempotency")
        finally:
            await conn.close()
        out["idempotency_seeded"] = keyed
        out["seed_s"] = round(time.perf_counter() - started, 1)
        log(f"seeded {keyed:,} idempotency records ({rate * keyed_share:.1f}/s for a day)")
        series = []
        make = state.mix_maker(seed=2)
        offset = 0
        soak_started = time.monotonic()
        for minute in range(minutes):
            meter, cpu = CpuMeter([worker.pid]), {}

            def shifted(n: int, base: int = offset) -> tuple[str, bytes]:
                return make(base + n)

            with meter.span(cpu):
                sample = await gen.open_loop(shifted, rate=rate, seconds=60)
            offset += int(rate * 60)
            point = {
                "minute": minute + 1,
                "elapsed_s": round(time.monotonic() - soak_started),
                **sample.summary(),
                "by_command_p99_ms": {
                    k: latency_summary(v)["p99_ms"] for k, v in sorted(sample.by_command.items())
                },
                "worker_rss_mib": round(current_rss_mib(worker.pid), 1),
                **cpu,
                "sizes": await table_sizes(sandbox.database_url),
            }
            series.append(point)
            sizes = point["sizes"]
            log(
                f"minute {minute + 1}: {point['throughput']}/s p99 {point['p99_ms']} ms, "
                f"verify p99 {point['by_command_p99_ms'].get('session.verify')} ms; "
                + ", ".join(f"{t} {sizes[t]['total_bytes'] // 1024} KiB" for t in TABLES)
            )
        out["series"] = series
        out["ends_left"] = max(0, len(state.end_tokens) - state.ends_used)
    finally:
        if gen is not None:
            with contextlib.suppress(Exception):
                await gen.close()
        if worker is not None:
            worker.stop()
            out["purges"] = purges_logged(worker.log_path)
        await sandbox.close()
    out["worker_logs"] = str(logs)
    return out


def current_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+)", status, flags=re.MULTILINE)
    return int(match.group(1)) / 1024 if match else 0.0


# -- main -----------------------------------------------------------------------------------


def summary(result: dict[str, Any]) -> str:
    if "series" in result:
        rows = [f"soak: {result['rate_per_s']}/s for {result['minutes']} min"]
        for p in result["series"]:
            sizes = ", ".join(
                f"{t} {p['sizes'][t]['total_bytes'] / 2**20:.1f}" for t in TABLES if t in p["sizes"]
            )
            verify = p["by_command_p99_ms"].get("session.verify", "-")
            rows.append(
                f"  {p['minute']:>3}  {p['throughput']:>7}/s  p99 {p['p99_ms']:>8} ms"
                f"  verify p99 {verify:>7} ms  MiB: {sizes}"
            )
        return "\n".join(rows)
    rows = [f"load: {result['load']}", ""]
    names = ("session.verify", "session.verify.wide", "session.start", "account.create")
    for kind in ("empty", "grown"):
        for n, m in enumerate(result[kind], 1):
            parts = []
            for name in names:
                part = f"{name} {m[name]['throughput']}/s p99 {m[name]['p99_ms']} ms"
                if "open_loop" in m[name]:
                    part += f" (open loop {m[name]['open_loop']['p99_ms']} ms)"
                parts.append(part)
            rows.append(f"{kind} {n}: " + "; ".join(parts))
    rows.append(f"ratios (grown / empty): {result['ratios']}")
    for op, r in result.get("db_query_ratios", {}).items():
        rows.append(f"  db {op:<32} empty {r['empty_ms']:>8} ms  grown {r['grown_ms']:>8} ms"
                    f"  x{r['ratio']}")  # fmt: skip
    return "\n".join(rows)


def main() -> int:
    as_deployed()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=10_000_000)
    parser.add_argument(
        "--keyed-per-s",
        type=float,
        default=None,
        help="idempotency records and outbox events per second, for a day (default: the "
        "sign-ins and sign-outs a day that the session mix implies)",
    )
    parser.add_argument("--quick", action="store_true", help="shorter spans")
    parser.add_argument(
        "--rounds", type=int, default=2, help="grown rounds, each followed by an empty one"
    )
    parser.add_argument("--soak-minutes", type=int, default=0)
    parser.add_argument("--soak-rate", type=float, default=200.0)
    parser.add_argument("--out", help="the JSON report (default bench/results/growth-*.json)")
    args = parser.parse_args()
    if args.keyed_per_s is None:
        # In the last 24 h: two thirds of the table's sessions started, half of those ended.
        args.keyed_per_s = (args.sessions * 2 / 3 + args.sessions / 3) / DAY
    kind = "soak" if args.soak_minutes else "growth"
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    result = uvloop.run(soak(args) if args.soak_minutes else growth(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(summary(result))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
