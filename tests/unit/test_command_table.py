"""One name per command, written in the spec table; code holding a payload finds the rest by
the payload's type, and the handler table is keyed by it."""

from __future__ import annotations

from typing import get_type_hints

from messages import COMMANDS, VerifySession, spec_of
from services.identity import IdentityService
from worker.handlers import handler_table
from worker.processor import unhandled


def test_each_command_has_its_own_payload_type_that_finds_its_spec() -> None:
    specs = list(COMMANDS.values())
    assert len({spec.payload for spec in specs}) == len(specs)
    for spec in specs:
        assert spec_of(spec.payload) is spec


def test_the_handler_table_runs_each_command_with_a_method_that_returns_its_result(
    service: IdentityService,
) -> None:
    table = handler_table(service)
    assert set(table) == {spec.payload for spec in COMMANDS.values()}
    for payload, handler in table.items():
        hints = get_type_hints(handler)
        assert hints["cmd"] is payload
        assert hints["return"] is spec_of(payload).result, spec_of(payload).name


def test_a_table_without_a_command_is_found_wanting(service: IdentityService) -> None:
    table = dict(handler_table(service))
    assert unhandled(table) == []
    del table[VerifySession]
    assert unhandled(table) == ["session.verify"]
