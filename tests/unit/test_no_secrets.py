"""No password, hash or token in an event, a stored reply, or the repr of a command."""

from __future__ import annotations

import pytest

from messages import COMMANDS, ChangePassword, EndSession, UpdateAccount
from services.identity import IdentityService
from stores.memory import MemoryIdentityStore
from tests.unit.helpers import PASSWORD, create_cmd, ctx, pending_events, start_cmd


async def test_events_and_stored_replies_hold_no_secret(
    service: IdentityService, store: MemoryIdentityStore
) -> None:
    account = (await service.create_account(create_cmd(), ctx("c"))).account
    started = await service.start_session(start_cmd(), ctx("s"))
    token = started.token.get_secret_value()
    new_password = "another quite long passphrase"
    await service.change_password(
        ChangePassword.model_validate(
            {"account_id": account.id, "current_password": PASSWORD, "new_password": new_password}
        ),
        ctx("p"),
    )
    await service.end_session(EndSession.model_validate({"token": token}), ctx("e"))
    record = await store.get_account(account.id)
    assert record is not None
    secrets = [PASSWORD, new_password, token, record.password_hash, "$argon2id$"]
    texts = [str(event) for event in await pending_events(store)]
    for key in ("c", "s", "p", "e"):
        stored = await store.get_idempotency(key)
        assert stored is not None
        texts.append(str(stored.reply) + stored.fingerprint)
    for text in texts:
        for secret in secrets:
            assert secret not in text


@pytest.mark.parametrize(
    "command",
    [
        create_cmd(),
        start_cmd(),
        ChangePassword.model_validate(
            {
                "account_id": "acct_" + "0" * 26,
                "current_password": PASSWORD,
                "new_password": PASSWORD,
            }
        ),
        UpdateAccount.model_validate(
            {
                "account_id": "acct_" + "0" * 26,
                "expected_version": 1,
                "email": "a@b.co",
                "current_password": PASSWORD,
            }
        ),
        EndSession.model_validate({"token": "v1.k1.ses_" + "a" * 32 + ".sig"}),
    ],
)
def test_commands_never_show_their_secrets(command: object) -> None:
    shown = repr(command) + str(command)
    assert PASSWORD not in shown
    assert "sig" not in shown.replace("ses_", "")
    dumped = command.model_dump_json()  # type: ignore[attr-defined]
    assert PASSWORD not in dumped


def test_every_command_with_a_secret_declares_it_as_secret() -> None:
    secret_names = {"password", "current_password", "new_password", "token"}
    for spec in COMMANDS.values():
        for name, field in spec.payload.model_fields.items():
            if name in secret_names:
                assert "Secret" in repr(field.annotation), f"{spec.name}.{name}"
