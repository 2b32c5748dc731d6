"""The operator commands (`send`, `demo`, `dead list`, `dead republish`) run as processes
against a real worker, the way an operator runs them."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest

from messages.topology import COMMANDS_EXCHANGE, COMMANDS_EXCHANGE_ARGUMENTS, EVENTS_EXCHANGE
from tests.integration.conftest import Isolated
from tests.integration.scenarios import Person, call_ok, key, sign_up
from tests.support.bus import Bus, dead_queue_depth
from tests.support.vhosts import BROKER, fresh_vhost, rabbitmqctl
from tests.support.workers import WORKER_BIN, WorkerProcess

pytestmark = pytest.mark.integration

FULL_TOKEN = re.compile(r"v1\.[a-z0-9-]+\.ses_[0-9a-z]{32}\.")


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> dict[str, Any]:
        reply: dict[str, Any] = orjson.loads(self.out)
        return reply


async def cli(*args: str, amqp_url: str, stdin: str | None = None, timeout: float = 90) -> Ran:
    """`identity-worker ARGS` with IDENTITY_AMQP_URL set to `amqp_url` and nothing else of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDENTITY_")}
    env["IDENTITY_AMQP_URL"] = amqp_url
    process = await asyncio.create_subprocess_exec(
        str(WORKER_BIN),
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(
        process.communicate(stdin.encode() if stdin is not None else None), timeout
    )
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


def create_args(person: Person) -> list[str]:
    return [
        "send",
        "account.create",
        f"--email={person.email}",
        f"--password={person.password}",
        f"--display-name={person.display_name}",
    ]


async def test_send_prints_the_reply_and_maps_flags_to_typed_fields(
    worker: WorkerProcess, amqp_url: str
) -> None:
    person = Person.new("send")
    created = await cli(*create_args(person), amqp_url=amqp_url)
    assert created.code == 0, created.err
    account = created.json()["result"]["account"]
    assert account["email"] == person.email
    assert account["version"] == 1

    # --expected-version is an int field: the flag's text must reach the worker as 1, not "1".
    update = ["send", "account.update", f"--account-id={account['id']}", "--expected-version=1"]
    updated = await cli(*update, "--display-name=Ada L", amqp_url=amqp_url)
    assert updated.code == 0, updated.err
    assert updated.json()["result"]["account"]["version"] == 2
    assert updated.json()["result"]["account"]["display_name"] == "Ada L"


async def test_send_prints_the_session_token_to_its_caller_and_reads_secrets_from_stdin(
    worker: WorkerProcess, amqp_url: str
) -> None:
    person = Person.new("token")
    assert (await cli(*create_args(person), amqp_url=amqp_url)).code == 0
    start = ["send", "session.start", f"--email={person.email}", "--password=-"]
    started = await cli(*start, amqp_url=amqp_url, stdin=person.password + "\n")
    assert started.code == 0, started.err
    token = started.json()["result"]["token"]
    assert FULL_TOKEN.match(token)

    verified = await cli("send", "session.verify", "--token=-", amqp_url=amqp_url, stdin=token)
    assert verified.code == 0, verified.err
    assert verified.json()["result"]["account"]["email"] == person.email


async def test_send_replays_the_same_reply_for_the_same_idempotency_key(
    worker: WorkerProcess, amqp_url: str
) -> None:
    person = Person.new("replay")
    same_key = f"--idempotency-key={key('cli')}"
    first = await cli(*create_args(person), same_key, amqp_url=amqp_url)
    second = await cli(*create_args(person), same_key, amqp_url=amqp_url)
    assert first.code == second.code == 0
    assert first.json() == second.json()


async def test_send_exits_1_with_the_error_reply_printed(
    worker: WorkerProcess, amqp_url: str
) -> None:
    missing = "acct_" + "0" * 26
    ran = await cli("send", "account.get", f"--account-id={missing}", amqp_url=amqp_url)
    assert ran.code == 1
    reply = ran.json()
    assert reply["ok"] is False
    assert reply["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "args",
    [
        ["send", "account.erase", "--account-id=acct_x"],
        ["send", "account.get"],
        ["send", "account.update", "--account-id=acct_x", "--expected-version=three"],
        ["send", "account.update", f"--account-id=acct_{'0' * 26}", "--expected-version=1"],
        ["send", "account.get", "--account-id=acct_x", "--colour=red"],
    ],
    ids=["unknown-command", "missing-field", "not-an-int", "model-rule", "unknown-flag"],
)
async def test_send_exits_2_on_bad_usage_without_sending(
    args: list[str], private_amqp_url: str
) -> None:
    # The private vhost has no worker and no exchange: had anything been sent, the client
    # would have failed as unroutable (exit 1), not with a usage error.
    ran = await cli(*args, amqp_url=private_amqp_url)
    assert ran.code == 2, (ran.out, ran.err)
    assert ran.out == ""


async def test_demo_tells_the_whole_story_and_leaves_no_queue_behind(
    worker: WorkerProcess, amqp_url: str, amqp_vhost: str
) -> None:
    before = rabbitmqctl("list_queues", "-p", amqp_vhost, "name", "-q", "--no-table-headers")
    ran = await cli("demo", amqp_url=amqp_url)
    assert ran.code == 0, ran.out + ran.err
    for step in (
        "[1/12] create account ... ok",
        "[7/12] sign out everywhere ... ok",
        "[8/12] ask for a recovery code ... ok",
        "[9/12] read it from identity.courier ... ok",
        "[10/12] set a new password with it ... ok",
        "[11/12] sign in with the new password ... ok",
    ):
        assert step in ran.out
    assert "[12/12] expected events ... ok" in ran.out
    assert ran.out.count("event session.started") == 4
    assert "event account.password_reset" in ran.out
    assert ran.out.count("(sign_out_everywhere)") >= 2
    assert "token v1." in ran.out
    assert not FULL_TOKEN.search(ran.out + ran.err), "the demo printed a whole token"
    after = rabbitmqctl("list_queues", "-p", amqp_vhost, "name", "-q", "--no-table-headers")
    assert sorted(after.split()) == sorted(before.split())


async def test_demo_fails_when_no_worker_answers(private_amqp_url: str) -> None:
    async with await aio_pika.connect(private_amqp_url) as connection:
        # The exchanges exist (a deployment's definitions declare them), but no worker runs.
        channel = await connection.channel()
        await channel.declare_exchange(
            COMMANDS_EXCHANGE, "direct", durable=True, arguments=dict(COMMANDS_EXCHANGE_ARGUMENTS)
        )
        await channel.declare_exchange(EVENTS_EXCHANGE, "topic", durable=True)
    ran = await cli("demo", "--timeout=3", amqp_url=private_amqp_url)
    assert ran.code == 1
    assert "[1/12] create account ... FAILED" in ran.out
    assert "demo FAILED" in ran.out


async def test_demo_fails_on_a_vhost_without_the_identity_service() -> None:
    with fresh_vhost() as vhost:
        ran = await cli("demo", "--timeout=3", amqp_url=f"{BROKER}/{vhost}")
    assert ran.code == 1
    assert "the broker has no exchange identity.commands" in ran.err
    assert "demo FAILED" in ran.out


async def test_dead_list_prints_dead_letters_and_leaves_them_in_the_queue(
    isolated: Isolated,
) -> None:
    isolated.start()
    bus = await isolated.bus()
    await bus.publish("account.get", b"{not json")
    await bus.publish("account.get", b"{}", content_type="text/plain")
    await bus.wait_for(lambda: len(bus.dead) == 2)

    ran = await cli("dead", "list", amqp_url=isolated.amqp_url)
    assert ran.code == 0, ran.err
    assert "identity.dead: 2 dead letter(s), showing 2" in ran.out
    assert "malformed_json" in ran.out
    assert "wrong_content_type" in ran.out
    assert ran.out.count("cannot be republished: no body kept") == 2
    assert await dead_depth(bus) == 2
    assert (await cli("dead", "list", amqp_url=isolated.amqp_url)).out == ran.out


async def test_dead_republish_resends_complete_commands_after_the_fix_and_skips_redacted_ones(
    isolated: Isolated,
) -> None:
    isolated.start()
    bus = await isolated.bus()
    account = await sign_up(bus, person := Person.new("dead"))
    for _ in range(2):
        await call_ok(bus, "session.start", person.credentials(), key("start"))

    # A broken schema makes both commands fail as a bug would: unexpected_error, dead-lettered.
    end_all_key, create_key = key("end-all"), key("create")
    async with broken_accounts_table(isolated.database_url):
        end_all = await bus.call("session.end_all", {"account_id": account["id"]}, end_all_key)
        created = await bus.call("account.create", Person.new().create_payload(), create_key)
        assert end_all["error"]["code"] == created["error"]["code"] == "internal_error"
        await bus.wait_for(lambda: len(bus.dead) == 2)

    dry = await cli("dead", "republish", amqp_url=isolated.amqp_url)
    assert dry.code == 0, dry.err
    assert "dry run: 1 to republish, 1 skipped" in dry.out
    assert await dead_depth(bus) == 2

    ran = await cli(
        "dead", "republish", "--reason=unexpected_error", "--yes", amqp_url=isolated.amqp_url
    )
    assert ran.code == 0, ran.out + ran.err
    assert "[1/1] session.end_all" in ran.out
    assert "secrets were redacted" in ran.out
    ended = await bus_events(bus, "session.ended", end_all_key, count=2)
    assert {event["data"]["reason"] for event in ended} == {"sign_out_everywhere"}
    # The redacted account.create stays for the operator; the republished copy is gone.
    assert await dead_depth(bus) == 1
    listed = await cli("dead", "list", amqp_url=isolated.amqp_url)
    assert "account.create" in listed.out
    assert "session.end_all" not in listed.out


class broken_accounts_table:  # a context manager named for the state it creates
    """The `accounts` table renamed away for the block, as a bad migration would leave it."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn

    async def __aenter__(self) -> None:
        connection = await asyncpg.connect(self._dsn)
        try:
            await connection.execute("ALTER TABLE accounts RENAME TO accounts_away")
        finally:
            await connection.close()

    async def __aexit__(self, *exc_info: object) -> None:
        connection = await asyncpg.connect(self._dsn)
        try:
            await connection.execute("ALTER TABLE accounts_away RENAME TO accounts")
        finally:
            await connection.close()


async def dead_depth(bus: Bus) -> int:
    """The depth of identity.dead, asked on a channel of its own: aio-pika answers a repeated
    passive declare on one channel from its first result."""
    return await dead_queue_depth(bus.connection)


async def bus_events(bus: Bus, event_type: str, causation: str, count: int) -> list[Any]:
    """The `count` events of `event_type` caused by the command with key `causation`."""

    def caused() -> list[Any]:
        return [e for e in bus.events_of(event_type) if e["causation_id"] == causation]

    await bus.wait_for(lambda: len(caused()) >= count)
    return caused()


async def test_dead_commands_fail_when_the_broker_is_unreachable() -> None:
    url = f"amqp://guest:guest@127.0.0.1:1/{uuid.uuid4().hex}"
    ran = await cli("dead", "list", amqp_url=url)
    assert ran.code == 1
    assert "127.0.0.1:1" in ran.err
    assert "guest:guest" not in ran.err
