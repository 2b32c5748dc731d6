"""Email canonicalisation: one canonical form per mailbox, invisible tricks refused."""

import pytest
from hypothesis import given
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


def test_sharp_s_is_lowered_not_folded() -> None:
    assert canonical_email("STRAßE@example.com") == "straße@example.com"


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
    assert once == once.lower()


@given(raw=st.text(max_size=80) | st.from_regex(r"[^@]{1,20}@[^@]{1,20}", fullmatch=True))
def test_any_input_is_canonical_or_a_validation_error(raw: str) -> None:
    try:
        once = canonical_email(raw)
    except InvalidInputError:
        return
    assert canonical_email(once) == once
