"""The AsyncAPI document: committed file up to date, AsyncAPI 3.0 shape, contract coverage."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from messages import COMMANDS, EVENT_TYPES, DeadLetterRecord, ErrorCode
from messages.asyncapi import build_asyncapi, render_asyncapi
from messages.topology import COMMANDS_EXCHANGE, DEAD_QUEUE, EVENTS_EXCHANGE

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.json"
SECRET_FIELDS = {"password", "current_password", "new_password", "token"}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return build_asyncapi()


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), ref
        assert part in node, f"dangling $ref {ref}"
        node = node[part]
    return node


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_committed_document_matches_the_models() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == render_asyncapi(), (
        "docs/asyncapi.json is out of date: run `identity-worker asyncapi > docs/asyncapi.json`"
    )


def test_rendering_is_deterministic_json() -> None:
    text = render_asyncapi()
    assert text == render_asyncapi()
    assert json.loads(text) == build_asyncapi()


def test_document_has_the_asyncapi_3_shape(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["version"] == "1.0.0"
    assert "docs/contract.md" in doc["info"]["description"]
    assert {"channels", "operations", "components"} <= doc.keys()
    for operation in doc["operations"].values():
        assert operation["action"] in {"send", "receive"}
        channel_ref = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/")


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    refs = [node["$ref"] for node in _walk(doc) if "$ref" in node]
    assert refs
    for ref in refs:
        _resolve(doc, ref)


def test_every_command_has_a_channel_and_a_send_operation_with_a_reply(
    doc: dict[str, Any],
) -> None:
    addresses = {ch["address"]: ch for ch in doc["channels"].values()}
    for name, spec in COMMANDS.items():
        channel = addresses[name]
        exchange = channel["bindings"]["amqp"]["exchange"]
        assert (exchange["name"], exchange["type"], exchange["durable"]) == (
            COMMANDS_EXCHANGE,
            "direct",
            True,
        )
        (operation,) = [
            op
            for op in doc["operations"].values()
            if _resolve(doc, op["channel"]["$ref"]) is channel
        ]
        assert operation["action"] == "send"
        assert operation["bindings"]["amqp"]["deliveryMode"] == 2
        assert operation["reply"]["address"]["$ref"] == "#/components/replyAddresses/replyTo"
        (reply_ref,) = operation["reply"]["messages"]
        reply = _resolve(doc, _resolve(doc, reply_ref["$ref"])["$ref"])
        success, failure = (_resolve(doc, r["$ref"]) for r in reply["payload"]["oneOf"])
        assert success["properties"]["result"]["$ref"].endswith("/" + spec.result.__name__)
        assert failure["properties"]["error"]["$ref"].endswith("/ErrorBody")


def test_state_changing_commands_require_an_idempotency_key(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    for name, spec in COMMANDS.items():
        envelope = next(s for s in schemas.values() if s.get("title") == f"{name} command")
        assert ("idempotency_key" in envelope["required"]) is spec.changes_state, name
        assert envelope["properties"]["payload"]["$ref"].endswith("/" + spec.payload.__name__)


def test_every_event_type_has_a_topic_channel_and_a_receive_operation(
    doc: dict[str, Any],
) -> None:
    addresses = {ch["address"]: ch for ch in doc["channels"].values()}
    receive_channels = [
        _resolve(doc, op["channel"]["$ref"])
        for op in doc["operations"].values()
        if op["action"] == "receive"
    ]
    for event_type, model in EVENT_TYPES.items():
        channel = addresses[event_type]
        exchange = channel["bindings"]["amqp"]["exchange"]
        assert (exchange["name"], exchange["type"]) == (EVENTS_EXCHANGE, "topic")
        assert any(ch is channel for ch in receive_channels)
        schema = doc["components"]["schemas"][model.__name__]
        assert schema["properties"]["type"]["const"] == event_type
        assert "type" in schema["required"]


def test_dead_letter_queue_is_described(doc: dict[str, Any]) -> None:
    addresses = {ch["address"]: ch for ch in doc["channels"].values()}
    binding = addresses[DEAD_QUEUE]["bindings"]["amqp"]
    assert binding["is"] == "queue"
    assert binding["queue"]["durable"] is True


def test_a_dead_letter_has_the_schema_of_its_record(doc: dict[str, Any]) -> None:
    addresses = {ch["address"]: ch for ch in doc["channels"].values()}
    (message_ref,) = addresses[DEAD_QUEUE]["messages"].values()
    message = _resolve(doc, message_ref["$ref"])
    assert message["payload"] == {"$ref": "#/components/schemas/DeadLetterRecord"}
    schema = _resolve(doc, message["payload"]["$ref"])
    assert schema["properties"].keys() == DeadLetterRecord.model_fields.keys()
    assert schema["additionalProperties"] is False
    assert {"reason", "dead_lettered_at", "body_bytes"} <= set(schema["required"])
    assert schema["properties"]["dead_lettered_at"]["format"] == "date-time"


def test_every_error_code_is_listed_and_explained(doc: dict[str, Any]) -> None:
    error_code = doc["components"]["schemas"]["ErrorCode"]
    assert set(error_code["enum"]) == {code.value for code in ErrorCode}
    assert len(error_code["enum"]) == 16
    for code in ErrorCode:
        assert f"`{code.value}`" in error_code["description"]


def _secret_properties(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for schema_name, schema in doc["components"]["schemas"].items():
        for field, prop in schema.get("properties", {}).items():
            if field in SECRET_FIELDS:
                for branch in prop.get("anyOf", [prop]):
                    if branch.get("type") != "null":
                        yield schema_name, field, branch


def test_secret_fields_are_marked_as_passwords(doc: dict[str, Any]) -> None:
    found = {(schema, field) for schema, field, _ in _secret_properties(doc)}
    assert {
        ("CreateAccount", "password"),
        ("UpdateAccount", "current_password"),
        ("ChangePassword", "current_password"),
        ("ChangePassword", "new_password"),
        ("StartSession", "password"),
        ("VerifySession", "token"),
        ("EndSession", "token"),
        ("StartSessionResult", "token"),
    } <= found
    for schema, field, branch in _secret_properties(doc):
        assert branch.get("format") == "password", (schema, field)
        assert branch.get("writeOnly") is True, (schema, field)


def test_no_event_schema_reaches_a_secret_field(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    reachable: set[str] = set()
    pending = [model.__name__ for model in EVENT_TYPES.values()]
    while pending:
        name = pending.pop()
        if name not in reachable:
            reachable.add(name)
            pending += [n["$ref"].rsplit("/", 1)[1] for n in _walk(schemas[name]) if "$ref" in n]
    assert {"Account", "Session"} <= reachable
    assert not reachable & {schema for schema, _, _ in _secret_properties(doc)}


def test_every_idempotency_key_schema_refuses_what_the_store_cannot_hold(
    doc: dict[str, Any],
) -> None:
    keys = [
        node["properties"]["idempotency_key"]
        for node in _walk(doc)
        if str(node.get("title", "")).endswith(" command") and "properties" in node
    ]
    strings = [
        option
        for key in keys
        for option in key.get("anyOf", [key])
        if option.get("type") == "string"
    ]
    assert len(strings) == len(COMMANDS)
    for schema in strings:
        pattern = re.compile(schema["pattern"])
        assert pattern.search("5b0f3c1e-8f7a-4d0c-9a51-2f1f2f3c8e11")
        assert not pattern.search("nul\x00key")
