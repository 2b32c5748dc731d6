"""`identity-worker dead list|republish`: look at, and send again, what the worker dead-lettered.

`dead list [--limit N]` prints each dead letter (time, reason, command, ids, and whether it
could be republished) and leaves the queue as it was.

`dead republish [--reason R] [--limit N] [--yes]` sends each selected dead letter's command
again to `identity.commands` under its original routing key and idempotency key, waits for
the reply, and removes the dead letter once the command was accepted by the broker. Without
`--yes` it only says what it would do. A dead letter whose body is gone or whose secrets were
redacted (every password command, every token) cannot succeed: it is reported as skipped and
stays in the queue; the original caller has to send it again. Re-sending under the original
idempotency key is safe: if the command did take effect after all, the worker replays its
stored reply instead of doing it twice.

Exit 0 when everything sent got an `ok` reply; 1 when a reply was an error or missing, the
worker was not there, or the broker could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractConnection, AbstractQueue
from aio_pika.exceptions import ChannelNotFoundEntity

from brokers import connect_any
from client import ErrorReply, IdentityClient, ReplyTimeout, Unroutable
from messages.topology import DEAD_QUEUE
from tools.common import (
    BROKER_ERRORS,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Broker,
    broker_unreachable,
    resolve_broker,
    stopwatch,
)
from tools.deadletters import DeadLetter, put_back, take

Action = Callable[[AbstractConnection, AbstractQueue, argparse.Namespace], Awaitable[int]]


def run_dead(args: argparse.Namespace) -> int:
    if args.limit < 1:
        print("identity-worker dead: --limit must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    broker = resolve_broker(args.amqp_url)
    action: Action = list_dead if args.dead_command == "list" else republish_dead
    return asyncio.run(_on_dead_queue(broker, args, action))


async def _on_dead_queue(broker: Broker, args: argparse.Namespace, action: Action) -> int:
    url = broker.url
    try:
        connection = await connect_any(url, **broker.connect_kwargs())
    except BROKER_ERRORS as exc:
        return broker_unreachable(url, exc)
    try:
        channel = await connection.channel()
        try:
            # Passive: an operator's tool must not create the queue on a wrong vhost.
            queue = await channel.declare_queue(DEAD_QUEUE, passive=True)
        except ChannelNotFoundEntity:
            print(f"identity-worker dead: no queue {DEAD_QUEUE} on this vhost", file=sys.stderr)
            return EXIT_FAILED
        return await action(connection, queue, args)
    except BrokenPipeError:
        # Our stdout went away (`| head`); anything held was already put back.
        return EXIT_FAILED
    except BROKER_ERRORS as exc:
        return broker_unreachable(url, exc)
    finally:
        await connection.close()


def describe(letter: DeadLetter) -> str:
    why = letter.unsendable()
    verdict = "can be republished" if why is None else f"cannot be republished: {why}"
    return f"{letter.when}  {letter.reason:<18} {letter.command:<24} {letter.ids()}\n    {verdict}"


async def list_dead(
    connection: AbstractConnection, queue: AbstractQueue, args: argparse.Namespace
) -> int:
    ready = queue.declaration_result.message_count or 0
    letters, passed_over = await take(
        queue, args.limit, lambda letter: args.reason in (None, letter.reason)
    )
    try:
        print(f"{DEAD_QUEUE}: {ready} dead letter(s), showing {len(letters)}")
        # Requeueing may reorder a quorum queue: time order reads better than queue order.
        for letter in sorted(letters, key=lambda letter: letter.when):
            print(describe(letter))
    finally:
        await put_back(letters + passed_over)
    return EXIT_OK


async def republish_dead(
    connection: AbstractConnection, queue: AbstractQueue, args: argparse.Namespace
) -> int:
    selected, passed_over = await take(
        queue, args.limit, lambda letter: args.reason in (None, letter.reason)
    )
    try:
        sendable = [letter for letter in selected if letter.unsendable() is None]
        for letter in selected:
            if (why := letter.unsendable()) is not None:
                print(f"skip {letter.reason} {letter.command} {letter.ids()}: {why}")
        if not args.yes:
            for letter in sendable:
                print(f"would republish {letter.reason} {letter.command} {letter.ids()}")
            skipped = len(selected) - len(sendable)
            print(f"dry run: {len(sendable)} to republish, {skipped} skipped; add --yes to do it")
            return EXIT_OK
        return await _send_all(connection, sendable, args.timeout, len(selected) - len(sendable))
    finally:
        # Everything not removed on purpose goes back, skipped ones included.
        await put_back(
            [letter for letter in selected + passed_over if not letter.message.processed]
        )


async def _send_all(
    connection: AbstractConnection, letters: list[DeadLetter], reply_timeout_s: float, skipped: int
) -> int:
    tally = {"ok": 0, "error": 0, "not sent": 0}
    async with IdentityClient(connection, timeout=reply_timeout_s, retries=1) as client:
        for number, letter in enumerate(letters, start=1):
            print(f"[{number}/{len(letters)}] {letter.command} {letter.ids()} ... ", end="")
            sys.stdout.flush()
            with stopwatch() as elapsed:
                outcome, sent = await _resend(client, letter)
            print(f"{outcome} ({elapsed[0]:.0f} ms)", flush=True)
            tally["ok" if outcome == "ok" else "error" if sent else "not sent"] += 1
            if not sent:
                break  # no worker queue: the rest would not be routed either
            # Sent: whatever the reply, this copy is dealt with (a new failure dead-letters anew).
            await letter.message.ack()
    print(
        f"republished {tally['ok'] + tally['error']} ({tally['ok']} ok, {tally['error']} not ok),"
        f" skipped {skipped}, not sent {len(letters) - tally['ok'] - tally['error']}"
    )
    return EXIT_OK if tally["ok"] == len(letters) else EXIT_FAILED


async def _resend(client: IdentityClient, letter: DeadLetter) -> tuple[str, bool]:
    """The outcome in words, and whether the broker accepted the command."""
    body = letter.body or {}
    try:
        await client.send(
            letter.command,
            body["payload"],
            idempotency_key=body.get("idempotency_key"),
            metadata=body.get("metadata"),
        )
    except Unroutable:
        return "not sent: no queue is bound (is the worker running?)", False
    except ReplyTimeout:
        return "sent, but no reply in time", True
    except ErrorReply as exc:
        return f"sent, error reply: {exc}", True
    return "ok", True
