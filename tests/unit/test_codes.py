"""One-time codes: their shape, how they are read back, keyed and sealed."""

from __future__ import annotations

import re

import pytest

from services.codes import CodeKeys, new_code, read_code, show_code


def test_a_code_is_eight_crockford_characters_shown_in_two_halves() -> None:
    code = new_code()
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{8}", code)
    assert re.fullmatch(r"[0-9A-Z]{4}-[0-9A-Z]{4}", show_code(code))


def test_codes_do_not_repeat() -> None:
    assert len({new_code() for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    "typed", ["ab1d-ef0h", "AB1DEF0H", " ab1d ef0h ", "abId-efOh", "ABLD-EFoH"]
)
def test_case_dashes_spaces_and_look_alikes_are_ignored(typed: str) -> None:
    assert read_code(typed) == "AB1DEF0H"


def test_the_mac_binds_purpose_address_and_code_and_needs_the_key() -> None:
    keys = CodeKeys(b"k" * 32)
    mac = keys.mac("recovery", "ada@example.com", "AB1DEF0H")
    assert keys.mac("recovery", "ada@example.com", "ab1d-ef0h") == mac
    assert keys.mac("verification", "ada@example.com", "AB1DEF0H") != mac
    assert keys.mac("recovery", "bob@example.com", "AB1DEF0H") != mac
    assert keys.mac("recovery", "ada@example.com", "AB1DEF0J") != mac
    assert CodeKeys(b"j" * 32).mac("recovery", "ada@example.com", "AB1DEF0H") != mac


def test_a_sealed_code_opens_only_under_its_message_id_and_key() -> None:
    keys = CodeKeys(b"k" * 32)
    sealed = keys.seal("msg_1", "AB1DEF0H")
    assert b"AB1DEF0H" not in sealed
    assert keys.unseal("msg_1", sealed) == "AB1DEF0H"
    assert keys.seal("msg_2", "AB1DEF0H") != sealed
    try:
        opened: str | None = CodeKeys(b"j" * 32).unseal("msg_1", sealed)
    except UnicodeDecodeError:
        opened = None
    assert opened != "AB1DEF0H"


def test_keys_refuse_a_short_secret_and_never_print_it() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        CodeKeys(b"short")
    assert "k" * 8 not in repr(CodeKeys(b"k" * 32))
