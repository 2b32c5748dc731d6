"""decode_command on any input, in process: it returns a Command or raises Rejected, never
anything else, and the reply a Rejected becomes never carries a secret of the input.

Secrets are planted under the contract's secret fields with a marker no other generated text
carries, so a reply that shows the marker leaked (part of) one. A valid envelope, unchanged,
always decodes: the fuzzing reaches the payload models, not only the JSON parser.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from messages import COMMANDS, Reply
from worker.decode import Command, Rejected, decode_command

SECRET_FIELDS = ("password", "current_password", "new_password", "token", "code", "refresh_token")
MARKER = "S3cr3tMarker"
NAMES = st.sampled_from([*COMMANDS, "account.delete", "", "session.verify.extra"])
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

secrets_ = st.text(max_size=30).map(lambda text: f"{MARKER}{text}")
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=6,
)
field_names = st.sampled_from(["email", "display_name", "account_id", "expected_version", "x"])
# Secret fields hold marked text (or anything else); every other key holds anything but.
payload_like = st.builds(
    lambda rest, planted: {**rest, **planted},
    st.dictionaries(field_names | st.text(max_size=10), json_values, max_size=4),
    st.fixed_dictionaries({}, optional={name: secrets_ | json_values for name in SECRET_FIELDS}),
)
envelope_like = st.fixed_dictionaries(
    {},
    optional={
        "idempotency_key": json_values,
        "payload": payload_like | json_values,
        "metadata": json_values,
        "extra": json_values,
    },
)

ACCOUNT_ID = "acct_" + "0" * 26
VALID_PAYLOADS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "account.create": st.fixed_dictionaries(
        {"email": st.just("ada@example.com"), "password": secrets_, "display_name": st.just("A")}
    ),
    "account.get": st.just({"account_id": ACCOUNT_ID}),
    "account.update": st.fixed_dictionaries(
        {"account_id": st.just(ACCOUNT_ID), "expected_version": st.integers(1, 10)},
        optional={"display_name": st.just("B"), "current_password": secrets_},
    ).filter(lambda p: "display_name" in p),
    "account.change_password": st.fixed_dictionaries(
        {"account_id": st.just(ACCOUNT_ID), "current_password": secrets_, "new_password": secrets_}
    ),
    "session.start": st.fixed_dictionaries(
        {"email": st.just("ada@example.com"), "password": secrets_}
    ),
    "session.verify": st.fixed_dictionaries({"token": secrets_}),
    "session.end": st.fixed_dictionaries({"token": secrets_}),
    "session.end_all": st.just({"account_id": ACCOUNT_ID}),
    "account.recovery.request": st.just({"email": "ada@example.com"}),
    "account.recovery.complete": st.fixed_dictionaries(
        {"email": st.just("ada@example.com"), "code": secrets_, "new_password": secrets_}
    ),
    "account.verification.request": st.just({"account_id": ACCOUNT_ID}),
    "account.verification.confirm": st.fixed_dictionaries(
        {"email": st.just("ada@example.com"), "code": secrets_}
    ),
    "account.disable": st.fixed_dictionaries(
        {"account_id": st.just(ACCOUNT_ID), "reason": st.just("abuse report 42")}
    ),
    "account.enable": st.just({"account_id": ACCOUNT_ID}),
    "account.delete": st.just({"account_id": ACCOUNT_ID}),
    "session.list": st.fixed_dictionaries(
        {"account_id": st.just(ACCOUNT_ID)}, optional={"limit": st.integers(1, 200)}
    ),
    "session.revoke": st.just({"session_id": "ses_" + "0" * 32}),
    "session.refresh": st.fixed_dictionaries({"refresh_token": secrets_}),
    "keys.jwks": st.just({}),
    "account.grant_role": st.just({"account_id": ACCOUNT_ID, "role": "admin"}),
    "account.revoke_role": st.just({"account_id": ACCOUNT_ID, "role": "billing:read"}),
}
assert set(VALID_PAYLOADS) == set(COMMANDS)


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[str, dict[str, Any], bool]:
    """(command, envelope, whether it was changed): a valid envelope, sometimes broken in one
    or two places the way callers get it wrong."""
    name = draw(st.sampled_from(sorted(COMMANDS)))
    payload: dict[str, Any] = dict(draw(VALID_PAYLOADS[name]))
    envelope: dict[str, Any] = {"idempotency_key": "key-1", "payload": payload}
    changes = draw(st.lists(st.sampled_from(MUTATIONS), max_size=2))
    for change in changes:
        change(draw, envelope)
    return name, envelope, bool(changes)


def _drop_field(draw: st.DrawFn, envelope: dict[str, Any]) -> None:
    if isinstance(envelope["payload"], dict) and envelope["payload"]:
        envelope["payload"].pop(draw(st.sampled_from(sorted(envelope["payload"]))))


def _unknown_field(draw: st.DrawFn, envelope: dict[str, Any]) -> None:
    if isinstance(envelope["payload"], dict):
        envelope["payload"][draw(st.text(min_size=1, max_size=8))] = draw(json_values)


def _wrong_value(draw: st.DrawFn, envelope: dict[str, Any]) -> None:
    if isinstance(envelope["payload"], dict) and envelope["payload"]:
        field = draw(st.sampled_from(sorted(envelope["payload"])))
        secret = field in SECRET_FIELDS
        envelope["payload"][field] = draw(BAD_SECRETS if secret else json_values)


def _bad_key(draw: st.DrawFn, envelope: dict[str, Any]) -> None:
    bad = st.sampled_from(["", "a\x00b", "k" * 201]) | st.integers(-1, 2**32) | st.none()
    envelope["idempotency_key"] = draw(bad)


def _no_key(draw: st.DrawFn, envelope: dict[str, Any]) -> None:
    envelope.pop("idempotency_key", None)


def _envelope_noise(draw: st.DrawFn, envelope: dict[str, Any]) -> None:
    envelope[draw(st.sampled_from(["metadata", "extra", "payload"]))] = draw(json_values)


BAD_SECRETS = st.sampled_from(["", MARKER + "x" * 1100, MARKER + "\x00\u202e", MARKER]) | (
    json_values
)
MUTATIONS = [_drop_field, _unknown_field, _wrong_value, _bad_key, _no_key, _envelope_noise]


def _decode(name: str, body: bytes) -> Command | None:
    """The command, or None after checking the Rejected it raised (any other exception
    fails the test as it is)."""
    try:
        return decode_command(name, body, "corr-1")
    except Rejected as rejected:
        reply = Reply(
            ok=False, command=name, idempotency_key=rejected.idempotency_key, error=rejected.error
        )
        for text in (*_strings(reply.to_wire()), str(rejected)):
            assert MARKER not in text, (text, body)
        return None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


@settings(FUZZ, max_examples=300)  # cheap to make: the parser gets more of them
@given(name=NAMES, body=st.binary(max_size=512))
def test_any_bytes_decode_to_a_command_or_a_rejection(name: str, body: bytes) -> None:
    _decode(name, body)


@FUZZ
@given(name=NAMES, envelope=envelope_like)
def test_any_json_object_decodes_to_a_command_or_a_rejection_without_its_secrets(
    name: str, envelope: dict[str, Any]
) -> None:
    _decode(name, orjson.dumps(envelope))


@FUZZ
@given(case=near_valid())
def test_a_near_valid_envelope_is_refused_without_its_secrets_and_a_valid_one_decodes(
    case: tuple[str, dict[str, Any], bool],
) -> None:
    name, envelope, changed = case
    command = _decode(name, orjson.dumps(envelope))
    if not changed:
        assert command is not None, envelope
        assert command.name == name
