"""A reply's size is bounded whatever the request: no echo of thousands of field names."""

from __future__ import annotations

import orjson
import pytest

from messages import Reply
from worker.decode import MAX_FIELD_ERRORS, MAX_FIELD_TEXT, Rejected, decode_command


def _reply_to(body: bytes) -> tuple[Rejected, bytes]:
    with pytest.raises(Rejected) as caught:
        decode_command("account.create", body, "c-1")
    rejected = caught.value
    reply = Reply(
        ok=False,
        command="account.create",
        idempotency_key=rejected.idempotency_key,
        error=rejected.error,
    )
    return rejected, orjson.dumps(reply.to_wire())


def test_a_64_kb_request_of_unknown_fields_gets_a_small_reply() -> None:
    # 6,000 unknown fields: 413 KB of reply before the bound.
    body = orjson.dumps({"idempotency_key": "k", "payload": {f"k{i}": 0 for i in range(6000)}})
    assert len(body) < 65536

    rejected, reply = _reply_to(body)

    assert len(reply) < 2048
    assert len(rejected.error.fields) == MAX_FIELD_ERRORS
    assert "6003 problems" in rejected.error.message  # the three required fields too


def test_long_field_names_are_cut() -> None:
    body = orjson.dumps({"idempotency_key": "k", "payload": {"x" * 5000: 1}})

    rejected, _ = _reply_to(body)

    assert all(len(f.field) <= MAX_FIELD_TEXT for f in rejected.error.fields)
    assert any(f.field.endswith("…") for f in rejected.error.fields)
