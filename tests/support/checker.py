"""The one place that decides whether a run kept the worker's promises.

It reads what the test published (`Bus.sent`), the replies, the events captured on a bound
queue, the dead letters, the broker's queue depths and the database, and checks:

- every published command got a reply, and every reply to one idempotency key is the same
  (ok, result, error): duplicates and redeliveries replay, they never redo;
- the database holds exactly one account per successful `account.create` and one session per
  successful `session.start`, and nothing else; each stored idempotency record matches the
  reply its callers got;
- each committed change has exactly the events its reply implies in the outbox, all of them
  published and captured (a republication shares its `event_id`), and every captured event is
  in the outbox (no event for a change that did not commit);
- every courier row (codes and notices for the mail sender) is relayed and sits in
  `identity.courier` exactly once in effect (the checker drains it, as the mail sender would);
- no message is left in, or unacknowledged on, a worker queue or a capture queue;
- no password or token the test sent, and no password hash, appears in a worker log, an
  event, a dead letter, a stored reply, a fingerprint or the metrics text.

`check_run` returns a `Report`: the figures of the run and the problems found (none is a pass).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from messages import COMMANDS
from messages.topology import COURIER_QUEUE, DEAD_QUEUE
from tests.support.bus import Bus, Sent
from tests.support.load import STATE_CHANGING

HASH_MARKER = "$argon2"
INTERNAL_ERROR = "internal_error"


@dataclass
class Report:
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def describe(self) -> str:
        shown = "\n".join(f"- {p}" for p in self.problems[:60])
        more = len(self.problems) - 60
        return shown + (f"\n... and {more} more" if more > 0 else "")


def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


# Runs `rabbitmqctl ARGS` against some broker and returns its output: the machine's node
# (`rabbitmqctl`), or a node of a test's own cluster (tests.support.clusters.RabbitCluster.ctl).
Ctl = Callable[..., str]


def queue_depths(vhost: str, ctl: Ctl = rabbitmqctl) -> dict[str, tuple[int, int]]:
    """{queue: (ready, unacknowledged)} for every queue of `vhost`, as `ctl`'s broker says."""
    out = ctl("list_queues", "-q", "-p", vhost, "name", "messages_ready", "messages_unacknowledged")
    depths = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[1].isdigit():
            depths[parts[0]] = (int(parts[1]), int(parts[2]))
    return depths


async def wait_queues_empty(
    vhost: str, timeout: float = 30.0, ctl: Ctl = rabbitmqctl
) -> dict[str, tuple[int, int]]:
    """Poll until every queue but the dead-letter one is empty and fully acked; the last
    depths seen either way."""
    deadline = time.monotonic() + timeout
    while True:
        depths = await asyncio.to_thread(queue_depths, vhost, ctl)
        stuck = {q: d for q, d in depths.items() if q != DEAD_QUEUE and d != (0, 0)}
        if not stuck or time.monotonic() > deadline:
            return depths
        await asyncio.sleep(0.3)


def _comparable(reply: dict[str, Any]) -> tuple[Any, ...]:
    return (reply.get("ok"), reply.get("command"), reply.get("result"), reply.get("error"))


def _code(reply: dict[str, Any]) -> str | None:
    return None if reply.get("ok") else (reply.get("error") or {}).get("code")


def _expected_events(command: str, sent: Sent, reply: dict[str, Any]) -> dict[str, int] | None:
    """The events a successful reply implies ({type: count}); None when it may be 0 or 1."""
    result = reply["result"]
    if command == "account.create":
        return {"account.created": 1}
    if command == "session.start":
        return {"session.started": 1}
    if command == "account.update":
        bumped = result["account"]["version"] == sent.payload.get("expected_version", 0) + 1
        return {"account.updated": 1} if bumped else {}
    if command == "account.change_password":
        ended = result["sessions_ended"]
        return {"account.password_changed": 1, **({"session.ended": ended} if ended else {})}
    if command == "session.end_all":
        ended = result["sessions_ended"]
        return {"session.ended": ended} if ended else {}
    if command == "session.end":
        return None
    return {}


class Checker:
    def __init__(
        self,
        bus: Bus,
        dsn: str,
        vhost: str,
        *,
        secrets: Iterable[str] = (),
        logs: Iterable[str] = (),
        metrics: Iterable[str] = (),
        expect_dead_letters: bool = False,
        ctl: Ctl = rabbitmqctl,
    ) -> None:
        self.bus = bus
        self.dsn = dsn
        self.vhost = vhost
        self.secrets = {s for s in secrets if s}
        self.logs = list(logs)
        self.metrics = list(metrics)
        self.expect_dead_letters = expect_dead_letters
        self.ctl = ctl  # where the queue depths are asked (the broker of `vhost`)
        self.report = Report()

    async def run(self, settle_timeout: float = 45.0) -> Report:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            await self._wait_outbox_captured(conn, settle_timeout)
            await self._wait_courier_relayed(conn, settle_timeout)
            rows = await self._fetch(conn)
        finally:
            await conn.close()
        finals = self._check_replies()
        self._check_database(rows, finals)
        self._check_events(rows["outbox"], finals)
        await self._check_courier(rows["courier"])
        await self._check_queues(settle_timeout)
        self._check_secrets(rows)
        return self.report

    # -- gathering --------------------------------------------------------------------------

    async def _wait_outbox_captured(self, conn: Any, timeout: float) -> None:
        """Until the relay published every row and the capture queue delivered them."""
        deadline = time.monotonic() + timeout
        while True:
            ids = {r["event_id"] for r in await conn.fetch("SELECT event_id FROM outbox")}
            unpublished = await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL"
            )
            captured = {e.get("event_id") for e in self.bus.events}
            if (unpublished == 0 and ids <= captured) or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.3)

    async def _wait_courier_relayed(self, conn: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = await conn.fetchval(
                "SELECT count(*) FROM courier_outbox WHERE relayed_at IS NULL"
            )
            if pending == 0:
                return
            await asyncio.sleep(0.3)

    async def _fetch(self, conn: Any) -> dict[str, list[Any]]:
        return {
            "courier": await conn.fetch("SELECT message_id, relayed_at FROM courier_outbox"),
            "accounts": await conn.fetch("SELECT id, email FROM accounts"),
            "sessions": await conn.fetch("SELECT id, account_id FROM sessions"),
            "idempotency": await conn.fetch(
                "SELECT key, command, fingerprint, reply, reply::text AS text FROM idempotency"
            ),
            "outbox": await conn.fetch("SELECT event_id, type, body, published_at FROM outbox"),
        }

    # -- replies ----------------------------------------------------------------------------

    def _check_replies(self) -> dict[str, tuple[Sent, dict[str, Any]]]:
        """Every command answered, duplicates identical; the final answer per key."""
        report, bus = self.report, self.bus
        by_key: dict[str, list[dict[str, Any]]] = {}
        first_sent: dict[str, Sent] = {}
        missing = 0
        for sent in bus.sent:
            replies = bus.replies.get(sent.correlation_id, [])
            if not replies:
                missing += 1
                report.problem(f"no reply: {sent.command} key={sent.key} cid={sent.correlation_id}")
                continue
            if sent.key is not None and sent.command in STATE_CHANGING:
                by_key.setdefault(sent.key, []).extend(replies)
                first_sent.setdefault(sent.key, sent)
        inconsistent = internal = 0
        finals: dict[str, tuple[Sent, dict[str, Any]]] = {}
        for key, replies in by_key.items():
            settled = [r for r in replies if _code(r) != INTERNAL_ERROR]
            internal += len(replies) - len(settled)
            if not settled:
                report.problem(f"only internal_error for key={key}")
                continue
            if (
                len({orjson.dumps(_comparable(r), option=orjson.OPT_SORT_KEYS) for r in settled})
                > 1
            ):
                inconsistent += 1
                report.problem(f"different replies for one key={key}: {settled}")
            finals[key] = (first_sent[key], settled[0])
        replies_total = sum(len(v) for v in bus.replies.values())
        codes = Counter(_code(r) or "ok" for v in bus.replies.values() for r in v)
        self.report.figures.update(
            commands_published=len(bus.sent),
            duplicates_published=sum(1 for s in bus.sent if s.duplicate_of),
            replies=replies_total,
            lost_replies=missing,
            inconsistent_replies=inconsistent,
            internal_errors=internal,
            outcomes=dict(sorted(codes.items())),
        )
        if internal:
            report.problem(f"{internal} internal_error replies")
        return finals

    # -- database ---------------------------------------------------------------------------

    def _check_database(
        self, rows: dict[str, list[Any]], finals: dict[str, tuple[Sent, dict[str, Any]]]
    ) -> None:
        report = self.report
        ok = {k: (s, r) for k, (s, r) in finals.items() if r.get("ok")}
        created = {
            r["result"]["account"]["id"] for s, r in ok.values() if s.command == "account.create"
        }
        started = {
            r["result"]["session"]["id"] for s, r in ok.values() if s.command == "session.start"
        }
        accounts = Counter(row["id"] for row in rows["accounts"])
        sessions = Counter(row["id"] for row in rows["sessions"])
        extra_accounts = set(accounts) - created
        extra_sessions = set(sessions) - started
        lost_accounts = created - set(accounts)
        lost_sessions = started - set(sessions)
        for name, ids in (
            ("account in the database without a successful create", extra_accounts),
            ("session in the database without a successful start", extra_sessions),
            ("account created but not in the database", lost_accounts),
            ("session started but not in the database", lost_sessions),
        ):
            for item in sorted(ids):
                report.problem(f"{name}: {item}")
        emails = Counter(row["email"].casefold() for row in rows["accounts"])
        twice = [e for e, n in emails.items() if n > 1]
        for email in twice:
            report.problem(f"email stored more than once: {email}")
        stored = {row["key"]: row for row in rows["idempotency"]}
        mismatched = 0
        for key, (sent, reply) in finals.items():
            record = stored.get(key)
            if record is None:
                mismatched += 1
                report.problem(f"no idempotency record for answered key={key}")
                continue
            kept = orjson.loads(record["text"])
            expected = _stored_form(sent.command, reply)
            same = bool(kept.get("ok")) == bool(reply.get("ok")) and (
                kept.get("result") == expected
                if reply.get("ok")
                else (kept.get("error") or {}).get("code") == _code(reply)
            )
            if record["command"] != sent.command or not same:
                mismatched += 1
                report.problem(f"stored reply differs from the reply sent for key={key}")
        report.figures.update(
            accounts_created=len(created),
            sessions_started=len(started),
            duplicated_rows=len(extra_accounts) + len(extra_sessions) + len(twice),
            lost_rows=len(lost_accounts) + len(lost_sessions),
            idempotency_mismatches=mismatched,
        )

    # -- events -----------------------------------------------------------------------------

    def _check_events(
        self, outbox: list[Any], finals: dict[str, tuple[Sent, dict[str, Any]]]
    ) -> None:
        report = self.report
        bodies = {row["event_id"]: orjson.loads(row["body"]) for row in outbox}
        unpublished = [row["event_id"] for row in outbox if row["published_at"] is None]
        captured = Counter(e.get("event_id") for e in self.bus.events)
        lost = sorted(set(bodies) - set(captured))
        phantom = sorted(set(captured) - set(bodies))
        for event_id in unpublished:
            report.problem(f"outbox row never published: {event_id}")
        for event_id in lost:
            report.problem(f"committed event never captured: {event_id} {bodies[event_id]['type']}")
        for event_id in phantom:
            report.problem(f"captured event with no outbox row (uncommitted change?): {event_id}")
        for event in self.bus.events:
            kept = bodies.get(event.get("event_id"))
            if kept is not None and kept != event:
                report.problem(f"event {event.get('event_id')} differs from its outbox row")
        by_cause: dict[str | None, Counter[str]] = {}
        for body in bodies.values():
            by_cause.setdefault(body.get("causation_id"), Counter())[body["type"]] += 1
        duplicated = missing = 0
        for key, (sent, reply) in finals.items():
            have = by_cause.pop(key, Counter())
            if not reply.get("ok"):
                if have:
                    duplicated += sum(have.values())
                    report.problem(f"events for a refused command key={key}: {dict(have)}")
                continue
            want = _expected_events(sent.command, sent, reply)
            if want is None:  # session.end: one event if the session was still open
                if set(have) - {"session.ended"} or have["session.ended"] > 1:
                    duplicated += 1
                    report.problem(f"wrong events for {sent.command} key={key}: {dict(have)}")
                continue
            for kind in set(want) | set(have):
                diff = have.get(kind, 0) - want.get(kind, 0)
                if diff:
                    if diff > 0:
                        duplicated += diff
                    else:
                        missing -= diff
                    report.problem(
                        f"{sent.command} key={key}: {have.get(kind, 0)} {kind} events,"
                        f" expected {want.get(kind, 0)}"
                    )
        for cause, have in by_cause.items():
            duplicated += sum(have.values())
            report.problem(f"events with no answered command as cause ({cause}): {dict(have)}")
        redelivered = sum(n - 1 for n in captured.values() if n > 1)
        report.figures.update(
            events_committed=len(bodies),
            events_captured=sum(captured.values()),
            events_redelivered_same_id=redelivered,
            events_lost=len(lost) + len(unpublished) + missing,
            events_phantom=len(phantom),
            events_duplicated=duplicated,
        )

    # -- courier ----------------------------------------------------------------------------

    async def _check_courier(self, rows: list[Any]) -> None:
        """Drain `identity.courier` as the mail sender would: every row relayed, each relayed
        row's message there (a redelivery shares its message_id), nothing without a row."""
        received: Counter[str] = Counter()
        channel = await self.bus.connection.channel()
        try:
            queue = await channel.get_queue(COURIER_QUEUE, ensure=False)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                received[message.message_id or ""] += 1
        finally:
            await channel.close()
        written = {row["message_id"] for row in rows}
        unrelayed = [row["message_id"] for row in rows if row["relayed_at"] is None]
        lost = written - set(received) - set(unrelayed)
        phantom = set(received) - written
        for message_id in unrelayed:
            self.report.problem(f"courier row never relayed: {message_id}")
        for message_id in sorted(lost):
            self.report.problem(f"courier message relayed but not in the queue: {message_id}")
        for message_id in sorted(phantom):
            self.report.problem(f"courier message with no courier row: {message_id}")
        self.report.figures.update(
            courier_written=len(written),
            courier_received=sum(received.values()),
            courier_lost=len(unrelayed) + len(lost),
            courier_phantom=len(phantom),
        )

    # -- broker -----------------------------------------------------------------------------

    async def _check_queues(self, timeout: float) -> None:
        depths = await wait_queues_empty(self.vhost, timeout, self.ctl)
        stuck = {q: d for q, d in depths.items() if q != DEAD_QUEUE and d != (0, 0)}
        for queue, (ready, unacked) in stuck.items():
            self.report.problem(f"queue {queue}: {ready} ready, {unacked} unacknowledged")
        dead = depths.get(DEAD_QUEUE, (0, 0))
        self.report.figures.update(
            stuck_messages=sum(r + u for r, u in stuck.values()),
            dead_letters=dead[0] + dead[1],
        )
        if dead != (0, 0) and not self.expect_dead_letters:
            reasons = Counter(d.get("reason") for d in self.bus.dead)
            self.report.problem(f"unexpected dead letters: {dict(reasons)}")

    # -- secrets ----------------------------------------------------------------------------

    def _check_secrets(self, rows: dict[str, list[Any]]) -> None:
        haystacks: list[tuple[str, str]] = [("worker log", text) for text in self.logs]
        haystacks += [("metrics", text) for text in self.metrics]
        haystacks += [("event", orjson.dumps(e).decode()) for e in self.bus.events]
        haystacks += [("dead letter", orjson.dumps(d).decode()) for d in self.bus.dead]
        haystacks += [("stored reply", row["text"]) for row in rows["idempotency"]]
        haystacks += [("fingerprint", row["fingerprint"]) for row in rows["idempotency"]]
        haystacks += [
            ("outbox", bytes(row["body"]).decode(errors="replace")) for row in rows["outbox"]
        ]
        leaked = scan_for_secrets(self.secrets, haystacks)
        for where, what in leaked:
            self.report.problem(f"secret found in {where}: {what}")
        self.report.figures.update(
            secrets_checked=len(self.secrets),
            places_scanned=len(haystacks),
            leaked=len(leaked),
        )


def scan_for_secrets(
    secrets: Iterable[str], haystacks: Iterable[tuple[str, str]]
) -> list[tuple[str, str]]:
    """(where, which secret, shortened) for every secret or password hash found."""
    needles = [s for s in set(secrets) if len(s) >= 8]
    found = []
    for where, text in haystacks:
        if HASH_MARKER in text:
            found.append((where, "an argon2 hash"))
        found.extend((where, f"{s[:6]}...") for s in needles if s in text)
    return found


async def check_run(
    bus: Bus, dsn: str, vhost: str, *, settle_timeout: float = 45.0, **kw: Any
) -> Report:
    """Check a finished run (see the module docstring); `kw` goes to `Checker`.
    `settle_timeout`: how long to wait for the outbox and the queues to drain."""
    return await Checker(bus, dsn, vhost, **kw).run(settle_timeout)


def _stored_form(command: str, reply: dict[str, Any]) -> dict[str, Any]:
    """The result of an `ok` reply as its idempotency record keeps it: the command's result
    model says which fields are secrets (never stored; derived again on a replay)."""
    result = reply.get("result") or {}
    spec = COMMANDS.get(command)
    if not reply.get("ok") or spec is None:
        return dict(result)
    return spec.result.model_validate(result, strict=False).to_stored()
