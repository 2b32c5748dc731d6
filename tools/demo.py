"""`identity-worker demo`: a whole sign-up/sign-in/recovery story against a running worker.

Creates an account (a fresh email, a random password that is never printed), signs in,
verifies, signs out, signs in twice more and signs out everywhere, then recovers the account:
asks for a recovery code, reads it from the `identity.courier` queue as the mail sender would
(so the demo needs a broker user that may read it, as the development guest user may), sets
a new password with it and signs in with that. Last it checks that the events of exactly that
story arrived. Courier messages for other addresses are left unacknowledged, so they go back
to the queue for the mail sender when the demo ends. Each command carries an idempotency key
chosen here, so the demo recognises its own events by `causation_id` even on a busy broker.
The event queue is exclusive and auto-delete: it disappears with the demo's connection and
leaves nothing behind.

Exit 0 when every step and every expected event is there, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from brokers import connect_any
from client import IdentityClient, IdentityClientError, NotDeployed
from messages.topology import COURIER_QUEUE
from tools.common import (
    BROKER_ERRORS,
    EXIT_FAILED,
    EXIT_OK,
    Broker,
    broker_unreachable,
    mask_token,
    resolve_broker,
    stopwatch,
)
from tools.events import EventTap

# (type, reason) -> how many the story must produce; the reason applies to session.ended only.
EXPECTED_EVENTS: Counter[tuple[str, str | None]] = Counter(
    {
        ("account.created", None): 1,
        ("session.ended", "sign_out"): 1,
        ("session.ended", "sign_out_everywhere"): 2,
        ("account.recovery_requested", None): 1,
        ("account.password_reset", None): 1,
        ("session.started", None): 4,
    }
)


class StepFailed(Exception):
    """A step got an answer, but not the one the story needs."""


@dataclass
class Story:
    """What the steps hand to each other."""

    client: IdentityClient
    tap: EventTap
    connection: AbstractConnection
    email: str = field(default_factory=lambda: f"demo-{uuid.uuid4().hex[:12]}@example.com")
    # Random and long enough for the password policy; it only ever leaves in a payload.
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    new_password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    account_id: str = ""
    tokens: list[str] = field(default_factory=list)
    code: str = ""

    def key(self) -> str:
        """A fresh idempotency key, announced to the tap before the command is sent."""
        key = str(uuid.uuid4())
        self.tap.expect_causation(key)
        return key


async def create_account(story: Story) -> str:
    result = await story.client.create_account(
        story.email, story.password, "Demo User", idempotency_key=story.key()
    )
    story.account_id = result.account.id
    return f"{result.account.id} <{story.email}>"


async def sign_in(story: Story) -> str:
    result = await story.client.start_session(
        story.email, story.password, idempotency_key=story.key()
    )
    token = result.token.get_secret_value()
    story.tokens.append(token)
    return f"{result.session.id}, token {mask_token(token)}"


async def verify(story: Story) -> str:
    result = await story.client.verify_session(story.tokens[-1])
    if result.account.id != story.account_id:
        raise StepFailed(f"the session belongs to {result.account.id}")
    return f"signed in as {result.account.display_name}"


async def sign_out(story: Story) -> str:
    result = await story.client.end_session(story.tokens[0], idempotency_key=story.key())
    return f"ended {result.session_id}"


async def sign_out_everywhere(story: Story) -> str:
    result = await story.client.end_all_sessions(story.account_id, idempotency_key=story.key())
    # The first session is already over: only the two later ones may end here.
    if result.sessions_ended != 2:
        raise StepFailed(f"{result.sessions_ended} sessions ended, expected 2")
    return "2 sessions ended"


class CourierTap:
    """Reads `identity.courier` for one address, as the mail sender would; acks only the
    mail for that address."""

    def __init__(self, address: str) -> None:
        self._address = address
        self.mails: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()

    @classmethod
    async def open(cls, connection: AbstractConnection, address: str) -> CourierTap:
        tap = cls(address)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.declare_queue(COURIER_QUEUE, passive=True)
        await queue.consume(tap._on_message)
        return tap

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        mail = orjson.loads(message.body)
        if mail.get("to") == self._address:
            self.mails.append(mail)
            self._arrived.set()
            await message.ack()

    async def code(self, kind: str, timeout_s: float) -> str:
        async with asyncio.timeout(timeout_s):
            while not (found := [m for m in self.mails if m.get("kind") == kind]):
                self._arrived.clear()
                await self._arrived.wait()
        return str(found[-1]["code"])


async def request_recovery(story: Story) -> str:
    result = await story.client.request_recovery(story.email, idempotency_key=story.key())
    return f"accepted: {result.accepted} (the same for any email)"


def read_code_step(timeout_s: float) -> Callable[[Story], Awaitable[str]]:
    async def read_code(story: Story) -> str:
        # Opened only now: the queue is durable, so the mail waits there until it is read.
        courier = await CourierTap.open(story.connection, story.email)
        try:
            story.code = await courier.code("recovery_code", timeout_s)
        except TimeoutError:
            raise StepFailed(f"no recovery_code mail within {timeout_s:g} s") from None
        return f"recovery_code mail to <{story.email}>, code {story.code[:2]}…"

    return read_code


async def complete_recovery(story: Story) -> str:
    result = await story.client.complete_recovery(
        story.email, story.code, story.new_password, idempotency_key=story.key()
    )
    return f"new password set, email verified: {result.account.email_verified}"


async def sign_in_with_the_new_password(story: Story) -> str:
    story.password = story.new_password
    return await sign_in(story)


def events_step(timeout_s: float) -> Callable[[Story], Awaitable[str]]:
    async def expected_events(story: Story) -> str:
        seen = await story.tap.wait_for(EXPECTED_EVENTS, timeout_s)
        if seen != EXPECTED_EVENTS:
            missing = EXPECTED_EVENTS - seen
            extra = seen - EXPECTED_EVENTS
            raise StepFailed(f"missing {dict(missing)}, unexpected {dict(extra)}")
        return f"{seen.total()} events: " + ", ".join(
            f"{kind}{f' ({reason})' if reason else ''} x{n}" for (kind, reason), n in seen.items()
        )

    return expected_events


def steps(timeout_s: float) -> list[tuple[str, Callable[[Story], Awaitable[str]]]]:
    return [
        ("create account", create_account),
        ("sign in", sign_in),
        ("verify session", verify),
        ("sign out", sign_out),
        ("sign in again", sign_in),
        ("sign in a third time", sign_in),
        ("sign out everywhere", sign_out_everywhere),
        ("ask for a recovery code", request_recovery),
        ("read it from identity.courier", read_code_step(timeout_s)),
        ("set a new password with it", complete_recovery),
        ("sign in with the new password", sign_in_with_the_new_password),
        ("expected events", events_step(timeout_s)),
    ]


async def play(story: Story, timeout_s: float) -> bool:
    """Run the steps in order, printing each with the events that came in meanwhile; stop at
    the first that fails."""
    plan = steps(timeout_s)
    for number, (title, step) in enumerate(plan, start=1):
        print(f"[{number}/{len(plan)}] {title} ... ", end="", flush=True)
        passed = True
        try:
            with stopwatch() as elapsed:
                detail = await step(story)
        except (IdentityClientError, StepFailed) as exc:
            passed, detail = False, str(exc)
        print(f"{'ok' if passed else 'FAILED'} ({elapsed[0]:.0f} ms): {detail}", flush=True)
        # After the step's own line, so that an event that came in meanwhile never splits it.
        for line in story.tap.take_lines():
            print(line, flush=True)
        if not passed:
            return False
    return True


async def _demo(broker: Broker, timeout_s: float) -> int:
    url = broker.url
    try:
        connection = await connect_any(url, **broker.connect_kwargs())
    except BROKER_ERRORS as exc:
        return broker_unreachable(url, exc)
    try:
        async with IdentityClient(connection, timeout=timeout_s, retries=1) as client:
            tap = await EventTap.open(connection)
            passed = await play(Story(client, tap, connection), timeout_s)
    except NotDeployed as exc:
        print(f"identity-worker demo: {exc}", file=sys.stderr)
        passed = False
    except BROKER_ERRORS as exc:
        return broker_unreachable(url, exc)
    finally:
        await connection.close()
    print("demo passed" if passed else "demo FAILED", flush=True)
    return EXIT_OK if passed else EXIT_FAILED


def run_demo(args: argparse.Namespace) -> int:
    broker = resolve_broker(args.amqp_url)
    if args.timeout <= 0:
        print("identity-worker demo: --timeout must be > 0", file=sys.stderr)
        return 2
    return asyncio.run(_demo(broker, args.timeout))
