"""The worker end to end through the broker: a command in, its reply and its event out."""

from __future__ import annotations

import uuid

from tests.support.bus import Bus


async def test_create_account_replies_and_announces_the_account(bus: Bus) -> None:
    email = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    payload = {"email": email, "password": "correct horse battery staple", "display_name": "Ada"}
    reply = await bus.call("account.create", payload, key="smoke-" + email)
    assert reply["ok"] is True
    account = reply["result"]["account"]
    assert account["email"] == email
    await bus.wait_for(
        lambda: any(
            e["data"]["account"]["id"] == account["id"] for e in bus.events_of("account.created")
        )
    )
