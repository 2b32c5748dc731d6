"""Display names show what they are (issue 13, finding 12): no invisible fillers, one line, no
towers of combining marks; real names of every script still pass."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from messages import CreateAccount
from messages.models import MAX_COMBINING_RUN


def create(display_name: str) -> CreateAccount:
    return CreateAccount.model_validate(
        {"email": "ada@example.com", "password": "p" * 20, "display_name": display_name}
    )


@pytest.mark.parametrize(
    "name",
    [
        "Ada Lovelace",
        "Zoë Saldaña",
        "Nguyễn Văn A",  # Vietnamese: a letter with two diacritics
        "홍길동",
        "山田　太郎",  # an ideographic space between family and given name
        "Ολυμπία",
        "Дмитрий",
        "محمد",
        "श्रीनिवास",  # Devanagari: vowel signs and viramas are marks
        "e\u0301\u0302\u0303",  # three combining marks on one letter
        "O'Brien-Smith Jr.",
    ],
)
def test_real_names_pass(name: str) -> None:
    assert create(name).display_name == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("\u3164", "invisible"),  # HANGUL FILLER
        ("A\u115f", "invisible"),  # HANGUL CHOSEONG FILLER
        ("A\u1160", "invisible"),  # HANGUL JUNGSEONG FILLER
        ("A\uffa0B", "invisible"),  # HALFWIDTH HANGUL FILLER
        ("\u2800", "invisible"),  # BRAILLE PATTERN BLANK
        ("A\u2800B", "invisible"),
        ("Ada\ufe0f", "invisible"),  # VARIATION SELECTOR-16
        ("A\u034fB", "invisible"),  # COMBINING GRAPHEME JOINER
        ("A\U000e0100", "invisible"),  # VARIATION SELECTOR-17
        ("Ada\u2028Admin", "line or paragraph"),
        ("Ada\u2029Admin", "line or paragraph"),
        ("e\u0301\u0302\u0303\u0304", "combining marks"),
        ("Z" + "\u0336\u0337\u0338\u0335" * 5, "combining marks"),
        ("\u0301Ada", "start with a combining mark"),
        ("Ada\u200b", "control, format or invisible"),  # ZERO WIDTH SPACE (Cf)
    ],
)
def test_invisible_and_overstacked_names_are_refused(name: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        create(name)


def _default_ignorable_letters_and_marks() -> list[str]:
    # Default_Ignorable_Code_Point members that are not format characters: the fillers a
    # category check alone lets through.
    return [chr(c) for c in (0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x3164,
                             0xFFA0, *range(0xFE00, 0xFE10))]  # fmt: skip


@pytest.mark.parametrize("filler", _default_ignorable_letters_and_marks())
def test_every_default_ignorable_filler_is_refused(filler: str) -> None:
    assert unicodedata.category(filler) not in {"Cf", "Cc"}
    with pytest.raises(ValidationError):
        create(f"Ada{filler}")


@given(st.integers(min_value=MAX_COMBINING_RUN + 1, max_value=40))
def test_any_run_above_the_cap_is_refused(length: int) -> None:
    with pytest.raises(ValidationError, match="combining marks"):
        create("a" + "\u0300" * length)
