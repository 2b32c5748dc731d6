"""The caller policy against a neighbour holding a caller's credentials (issue 13, finding 1):
knowing an account id (every account.created event carries one) is not enough to read,
rename or sign out that account."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest

from tests.support.deployment import Deployment
from tests.support.security import NO_USER_ID, OPERATOR, Caller, Connector
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.security


@pytest.fixture
async def web(connect: Connector, deployment: Deployment) -> Caller:
    return await Caller.open(await connect("web-gateway"), deployment.user("web-gateway"))


@pytest.fixture
async def admin(connect: Connector, deployment: Deployment) -> Caller:
    return await Caller.open(await connect("admin-tool"), deployment.user("admin-tool"))


async def _signed_up(web: Caller, name: str) -> tuple[dict[str, Any], str]:
    """A new account through the web gateway, and a live session token of it."""
    email = f"{name}-{uuid.uuid4().hex[:10]}@example.com"
    password = f"lantern-{uuid.uuid4()}"
    created = await web.call(
        "account.create", {"email": email, "password": password, "display_name": name}
    )
    assert created["ok"], created
    started = await web.call("session.start", {"email": email, "password": password})
    assert started["ok"], started
    return created["result"]["account"], started["result"]["token"]


def _forbidden(reply: dict[str, Any]) -> bool:
    return reply["ok"] is False and reply["error"]["code"] == "forbidden"


def _counted(worker: WorkerProcess, caller: str, command: str) -> float:
    pattern = (
        rf'^identity_forbidden_total\{{caller="{re.escape(caller)}",command="{command}"\}} (\S+)$'
    )
    found = re.search(pattern, worker.metrics(), flags=re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_a_neighbour_cannot_read_rename_or_sign_out_someone_elses_account(
    web: Caller, admin: Caller
) -> None:
    victim, victim_token = await _signed_up(web, "victim")
    _, own_token = await _signed_up(web, "mallory")
    target = {"account_id": victim["id"]}
    rename = {**target, "expected_version": 1, "display_name": "pwned"}

    for metadata in (None, {"actor_token": own_token}, {"actor_token": "v1.k.ses_forged.x"}):
        assert _forbidden(await web.call("account.get", target, metadata=metadata))
        assert _forbidden(await web.call("account.update", rename, metadata=metadata))
        assert _forbidden(await web.call("session.end_all", target, metadata=metadata))

    # Nothing happened to the victim: same name, same version, still signed in.
    seen = await admin.call("account.get", target)
    assert seen["result"]["account"] == victim
    verified = await web.call("session.verify", {"token": victim_token})
    assert verified["ok"], verified


async def test_with_its_own_session_a_caller_acts_on_its_own_account(web: Caller) -> None:
    account, token = await _signed_up(web, "owner")
    own = {"account_id": account["id"]}
    proof = {"actor_token": token}

    read = await web.call("account.get", own, metadata=proof)
    renamed = await web.call(
        "account.update", {**own, "expected_version": 1, "display_name": "Owner"}, metadata=proof
    )
    ended = await web.call("session.end_all", own, metadata=proof)

    assert read["result"]["account"]["id"] == account["id"]
    assert renamed["result"]["account"]["display_name"] == "Owner"
    assert ended["result"]["sessions_ended"] == 1
    # The session that proved it has ended now: it proves nothing any more.
    assert _forbidden(await web.call("account.get", own, metadata=proof))


async def test_a_command_not_granted_is_forbidden_and_leaves_its_key_free(
    web: Caller, admin: Caller, worker: WorkerProcess, deployment: Deployment
) -> None:
    account, _ = await _signed_up(web, "keyed")
    key = f"change-{uuid.uuid4().hex}"
    payload = {
        "account_id": account["id"],
        "current_password": "not-the-password-at-all",
        "new_password": "a-new-password-that-is-long",
    }
    before = _counted(worker, deployment.user("web-gateway"), "account.change_password")

    refused = await web.call("account.change_password", payload, key=key)
    # The same key from a caller allowed to send it runs the command: nothing was stored.
    allowed = await admin.call("account.change_password", payload, key=key)

    assert _forbidden(refused)
    assert allowed["error"]["code"] == "invalid_credentials", allowed
    after = _counted(worker, deployment.user("web-gateway"), "account.change_password")
    assert after == before + 1
    logged = [
        line for line in worker.log_entries("forbidden") if line.get("idempotency_key") == key
    ]
    assert [(line["caller"], line["reason"]) for line in logged] == [
        (deployment.user("web-gateway"), "not_granted")
    ]


async def test_without_a_user_id_or_from_a_user_the_policy_does_not_name_all_is_forbidden(
    web: Caller, connect: Connector, worker: WorkerProcess, deployment: Deployment
) -> None:
    _, token = await _signed_up(web, "anon")
    guest = await Caller.open(await connect(OPERATOR), "guest")
    before = _counted(worker, "other", "session.verify")

    anonymous = await web.call("session.verify", {"token": token}, user_id=NO_USER_ID)
    stranger = await guest.call("session.verify", {"token": token})

    assert _forbidden(anonymous)
    assert _forbidden(stranger)
    # Both counted under one bounded label: no series per user a publisher may log in as.
    assert _counted(worker, "other", "session.verify") == before + 2
    assert "guest" not in {
        match.group(1)
        for match in re.finditer(r'identity_forbidden_total\{caller="([^"]*)"', worker.metrics())
    }
