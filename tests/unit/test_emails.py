"""Email canonicalisation: one canonical form per mailbox, invisible tricks refused."""

import sys
import unicodedata

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from services.emails import canonical_email
from services.errors import InvalidInputError


def problem_of(raw: str, field: str = "payload.email") -> str:
    with pytest.raises(InvalidInputError) as caught:
        canonical_email(raw, field=field)
    [error] = caught.value.fields
    assert error.field == field
    return error.message


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("alice@example.com", "alice@example.com"),
        ("Alice@Example.COM", "alice@example.com"),
        ("ALICE@EXAMPLE.COM", "alice@example.com"),
        ("  alice@example.com \t\n", "alice@example.com"),
        ("alice@Bücher.example", "alice@xn--bcher-kva.example"),
        ("alice@BÜCHER.example", "alice@xn--bcher-kva.example"),
        ("alice@xn--bcher-kva.example", "alice@xn--bcher-kva.example"),
        ("\uff21\uff4c\uff49\uff43\uff45@example.com", "alice@example.com"),  # full-width
        ("alice\uff20example.com", "alice@example.com"),  # full-width at-sign
        ("Jörg@Bücher.de", "jörg@xn--bcher-kva.de"),
        ("first.last+tag@sub.example.org", "first.last+tag@sub.example.org"),
    ],
)
def test_addresses_map_to_one_canonical_form(raw: str, canonical: str) -> None:
    assert canonical_email(raw) == canonical


def test_decomposed_and_composed_accents_are_the_same_address() -> None:
    assert canonical_email("jo\u0308rg@example.com") == canonical_email("j\u00f6rg@example.com")


def test_greek_final_sigma_is_one_letter_whatever_the_case() -> None:
    # Lower-casing turns a capital sigma into a final sigma at the end of a word and into a
    # medial one elsewhere, so the same mailbox typed in capitals and in small letters had two
    # canonical forms; case folding gives one.
    capitals = canonical_email("ΟΔΟΣ.ΝΙΚΟΣ@example.com")
    assert capitals == canonical_email("οδος.νικος@example.com") == "οδοσ.νικοσ@example.com"
    assert canonical_email("Οδος.Νικος@example.com") == capitals


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("STRAßE@example.com", "strasse@example.com"),
        ("STRASSE@example.com", "straße@example.com"),
        ("\u1e9eTRASSE@example.com", "sstrasse@example.com"),  # capital sharp s
        ("\u13a0\u13a1@example.com", "\uab70\uab71@example.com"),  # Cherokee, both cases
        ("\u1fb3\u03b2@example.com", "\u0391\u0399\u0392@example.com"),  # iota subscript
    ],
)
def test_full_case_folding_makes_one_address(one: str, other: str) -> None:
    assert canonical_email(one) == canonical_email(other)


@pytest.mark.parametrize(
    "raw",
    [
        "ali\u200bce@example.com",  # zero-width space
        "ali\u200dce@example.com",  # zero-width joiner
        "alice@exa\u202emple.com",  # right-to-left override
        "\u2066alice@example.com",  # left-to-right isolate
        "ali\u00adce@example.com",  # soft hyphen
        "ali\x00ce@example.com",  # NUL
        "alice@example.com\x7f",  # DEL
        "ali\ue000ce@example.com",  # private use
        "ali\U000e0001ce@example.com",  # language tag
    ],
)
def test_invisible_and_bidi_code_points_are_rejected(raw: str) -> None:
    assert "invisible" in problem_of(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "alice",
        "alice@",
        "@example.com",
        "alice@@example.com",
        "alice@example",
        "a..b@example.com",
        '"alice smith"@example.com',
        "alice@[192.0.2.1]",
        "alice@localhost",
        "alice@host.test",
        "ali ce@example.com",
        "x" * 250 + "@example.com",  # over the 254-octet path limit
    ],
)
def test_malformed_addresses_are_rejected(raw: str) -> None:
    assert problem_of(raw)


def test_empty_and_blank_addresses_are_rejected() -> None:
    assert problem_of("") == "must not be empty"
    assert problem_of("   ") == "must not be empty"


def test_overlong_input_is_refused_before_any_work() -> None:
    assert problem_of("a" * 10_000 + "@example.com") == "is too long"


def test_the_error_names_the_field_given() -> None:
    assert problem_of("nope", field="payload.new_email")


def test_the_default_field_is_payload_email() -> None:
    with pytest.raises(InvalidInputError) as caught:
        canonical_email("nope")
    assert [f.field for f in caught.value.fields] == ["payload.email"]


LOCAL_CHARS = st.sampled_from(
    [*"abcXYZ019._+-", "ö", "Ö", "ß", "İ", "\u0308", "\uff21", "\u2168", "\u01c5", "\ufb03"]
)
DOMAINS = st.sampled_from(["example.com", "EXAMPLE.org", "Bücher.example", "ÉCOLE.fr"])


@given(local=st.text(LOCAL_CHARS, min_size=1, max_size=20), domain=DOMAINS)
def test_canonical_form_is_a_fixed_point(local: str, domain: str) -> None:
    try:
        once = canonical_email(f"{local}@{domain}")
    except InvalidInputError:
        return
    assert canonical_email(once) == once
    assert once == unicodedata.normalize("NFKC", once.casefold())


@given(raw=st.text(max_size=80) | st.from_regex(r"[^@]{1,20}@[^@]{1,20}", fullmatch=True))
def test_any_input_is_canonical_or_a_validation_error(raw: str) -> None:
    try:
        once = canonical_email(raw)
    except InvalidInputError:
        return
    assert canonical_email(once) == once


def _nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _allowed(char: str) -> bool:
    return unicodedata.category(char) not in {"Cc", "Cf", "Cs", "Co", "Cn"}


# Every character that lower() and casefold() map differently (255 in Unicode 15: ß, final
# sigma, Cherokee, Greek with iota subscript, Cyrillic rounded letters...), computed rather
# than listed, so a newer Unicode in a newer Python is covered too.
FOLDED_APART = sorted(
    char
    for char in map(chr, range(sys.maxunicode + 1))
    if _allowed(char) and _nfkc(_nfkc(char).lower()) != _nfkc(_nfkc(char).casefold())
)
# Upper-casing loses one distinction that case folding keeps: the dotless i of Turkish and
# Azerbaijani (and its mathematical variant) upper-cases to I, which folds to a dotted i.
UPPER_CASE_LOSES = {"\u0131", "\U0001d6a4"}
LOCAL_PARTS = st.text(
    st.sampled_from(FOLDED_APART)
    | st.characters(categories=("Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Nd"))
    | st.sampled_from([*"abcXYZ019._+-", "\u03a3", "\u03c3", "\u03c2", "İ", "ß", "ẞ"]),
    min_size=1,
    max_size=12,
)


def _canonical_or_none(raw: str) -> str | None:
    try:
        return canonical_email(raw)
    except InvalidInputError:
        return None


def test_lower_and_casefold_differ_where_the_property_looks() -> None:
    assert len(FOLDED_APART) > 200
    assert {"ß", "ς", "\u13a0", "\u1f80"} <= set(FOLDED_APART)


@given(local=LOCAL_PARTS, domain=DOMAINS)
@example(local="ΟΔΟΣ.ΝΙΚΟΣ", domain="example.com")
@example(local="Straße", domain="example.com")
def test_the_case_it_is_typed_in_never_makes_another_address(local: str, domain: str) -> None:
    canonical = _canonical_or_none(f"{local}@{domain}")
    if canonical is None:
        return
    assert canonical_email(canonical) == canonical
    lower = _canonical_or_none(f"{local.lower()}@{domain}")
    assert lower in (None, canonical)
    if not UPPER_CASE_LOSES.intersection(_nfkc(local)):
        upper = _canonical_or_none(f"{local.upper()}@{domain}")
        assert upper in (None, canonical)
