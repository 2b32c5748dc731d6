"""One result form per audience: the caller gets the secrets, the stored reply never does."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from messages import ErrorBody, ErrorCode, Result, StartSessionResult, StoredReply
from messages.models import Secret
from services.identity import IdentityService
from tests.unit.helpers import create_cmd, ctx, start_cmd


async def test_a_sign_in_is_stored_without_its_token_and_replayed_only_with_it(
    service: IdentityService,
) -> None:
    await service.create_account(create_cmd(), ctx())
    result = await service.start_session(start_cmd(), ctx())
    secrets = {
        name: getattr(result, name).get_secret_value()
        for name in ("token", "access_token", "refresh_token")
    }

    stored = StoredReply.from_json(StoredReply.of_result(result).to_json())

    assert stored.result is not None
    assert set(secrets).isdisjoint(stored.result)
    for name, secret in secrets.items():
        assert secret not in str(stored.result)
        assert result.to_wire()[name] == secret
    with pytest.raises(ValueError, match="token"):
        StartSessionResult.from_stored(stored.result, token=secrets["token"])
    assert StartSessionResult.from_stored(stored.result, **secrets) == result


def test_a_stored_error_reads_back_as_the_same_error() -> None:
    error = ErrorBody(code=ErrorCode.RATE_LIMITED, message="Wait.", retry_after_s=3)
    written = StoredReply.of_error(error).to_json()
    assert written == {
        "ok": False,
        "error": {"code": "rate_limited", "message": "Wait.", "fields": [], "retry_after_s": 3},
    }
    assert StoredReply.from_json(written).error == error


def test_a_stored_reply_is_either_a_result_or_an_error() -> None:
    with pytest.raises(ValidationError):
        StoredReply.from_json({"ok": False})
    with pytest.raises(ValidationError):
        StoredReply.from_json(
            {"ok": True, "result": {}, "error": {"code": "not_found", "message": "No."}}
        )


def test_a_result_knows_its_secret_fields_from_their_type() -> None:
    class Issued(Result):
        session_id: str
        token: Secret
        refresh_token: Secret | None = None

    issued = Issued(session_id="s", token=SecretStr("t"), refresh_token=SecretStr("r"))
    assert Issued.secret_fields == {"token", "refresh_token"}
    assert issued.to_stored() == {"session_id": "s"}
    assert issued.to_wire() == {"session_id": "s", "token": "t", "refresh_token": "r"}
