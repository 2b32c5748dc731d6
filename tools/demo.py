"""`identity-worker demo`: a whole sign-up/sign-in story against a running worker.

Creates an account (a fresh email, a random password that is never printed), signs in,
verifies, signs out, signs in twice more and signs out everywhere, then checks that the
events of exactly that story arrived. Each command carries an idempotency key chosen here, so
the demo recognises its own events by `causation_id` even on a busy broker. The event queue is
exclusive and auto-delete: it disappears with the demo's connection and leaves nothing behind.

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

import aio_pika

from client import IdentityClient, IdentityClientError, NotDeployed
from tools.common import (
    BROKER_ERRORS,
    EXIT_FAILED,
    EXIT_OK,
    broker_unreachable,
    mask_token,
    resolve_amqp_url,
    stopwatch,
)
from tools.events import EventTap

# (type, reason) -> how many the story must produce; the reason applies to session.ended only.
EXPECTED_EVENTS: Counter[tuple[str, str | None]] = Counter(
    {
        ("account.created", None): 1,
        ("session.started", None): 3,
        ("session.ended", "sign_out"): 1,
        ("session.ended", "sign_out_everywhere"): 2,
    }
)


class StepFailed(Exception):
    """A step got an answer, but not the one the story needs."""


@dataclass
class Story:
    """What the steps hand to each other."""

    client: IdentityClient
    tap: EventTap
    email: str = field(default_factory=lambda: f"demo-{uuid.uuid4().hex[:12]}@example.com")
    # Random and long enough for the password policy; it only ever leaves in a payload.
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    account_id: str = ""
    tokens: list[str] = field(default_factory=list)

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


async def _demo(url: str, timeout_s: float) -> int:
    try:
        connection = await aio_pika.connect_robust(url)
    except BROKER_ERRORS as exc:
        return broker_unreachable(url, exc)
    try:
        async with IdentityClient(connection, timeout=timeout_s, retries=1) as client:
            tap = await EventTap.open(connection)
            passed = await play(Story(client, tap), timeout_s)
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
    url = resolve_amqp_url(args.amqp_url)
    if args.timeout <= 0:
        print("identity-worker demo: --timeout must be > 0", file=sys.stderr)
        return 2
    return asyncio.run(_demo(url, args.timeout))
