"""Session tokens and signing keys: forgeries fail without a store, rotation keeps working."""

import base64
import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.errors import InvalidTokenError
from services.ids import new_session_id
from services.tokens import (
    SigningKey,
    TokenSigner,
    format_signing_key,
    new_signing_key,
    parse_signing_keys,
)

OLD = SigningKey("k-old", secrets.token_bytes(32))
NEW = SigningKey("k-new", secrets.token_bytes(32))


def legacy_fingerprint(key: SigningKey, material: bytes) -> str:
    """A fingerprint as idempotency records kept it before the HMAC key: `<kid>:<hex>`, under
    the signing key's fingerprint subkey."""
    subkey = hmac.digest(key.secret, b"identity-worker/idempotency-fingerprint", "sha256")
    return f"{key.kid}:{hmac.digest(subkey, material, 'sha256').hex()}"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_a_signed_token_verifies_to_its_session_and_key() -> None:
    signer = TokenSigner([NEW])
    session_id = new_session_id()
    token = signer.sign(session_id)
    assert re.fullmatch(r"v1\.k-new\.ses_[0-9a-z]{32}\.[A-Za-z0-9_-]{43}", token)
    assert signer.verify(token) == (session_id, "k-new")


def test_signing_is_deterministic_so_a_replay_returns_the_same_token() -> None:
    session_id = new_session_id()
    assert TokenSigner([NEW]).sign(session_id) == TokenSigner([NEW]).sign(session_id)


def test_a_forged_token_is_rejected_without_any_store() -> None:
    genuine = TokenSigner([NEW])
    forger = TokenSigner([SigningKey("k-new", b"f" * 32)])
    with pytest.raises(InvalidTokenError):
        genuine.verify(forger.sign(new_session_id()))


def test_a_token_with_a_tampered_session_id_is_rejected() -> None:
    signer = TokenSigner([NEW])
    version, kid, _, mac = signer.sign(new_session_id()).split(".")
    with pytest.raises(InvalidTokenError):
        signer.verify(f"{version}.{kid}.{new_session_id()}.{mac}")


def test_a_token_with_a_tampered_signature_is_rejected() -> None:
    signer = TokenSigner([NEW])
    token = signer.sign(new_session_id())
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    with pytest.raises(InvalidTokenError):
        signer.verify(flipped)


def test_a_token_relabelled_with_another_configured_kid_is_rejected() -> None:
    signer = TokenSigner([NEW, OLD])
    token = signer.sign(new_session_id())
    with pytest.raises(InvalidTokenError):
        signer.verify(token.replace(".k-new.", ".k-old.", 1))


def test_key_rotation_keeps_old_tokens_valid_and_signs_with_the_first_key() -> None:
    session_id = new_session_id()
    old_token = TokenSigner([OLD]).sign(session_id)
    rotated = TokenSigner([NEW, OLD])
    assert rotated.verify(old_token) == (session_id, "k-old")
    assert rotated.current_kid == "k-new"
    assert rotated.sign(new_session_id()).split(".")[1] == "k-new"


def test_a_token_for_a_removed_key_is_rejected() -> None:
    token = TokenSigner([OLD]).sign(new_session_id())
    with pytest.raises(InvalidTokenError):
        TokenSigner([NEW]).verify(token)


def test_sign_reuses_a_configured_kid_and_falls_back_to_the_current_one() -> None:
    signer = TokenSigner([NEW, OLD])
    session_id = new_session_id()
    assert signer.sign(session_id, "k-old") == TokenSigner([OLD]).sign(session_id)
    assert signer.sign(session_id, "k-gone").split(".")[1] == "k-new"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "v1",
        "garbage",
        "v1.k-new.ses_x.abc",
        "v2.k-new.ses_" + "a" * 32 + ".abc",
        "v1.k-new.ses_" + "a" * 32,
        "v1.k-new.ses_" + "a" * 32 + ".abc.extra",
        "v1.k-new.acct_" + "a" * 26 + ".abc",
        "v1.k-new.ses_" + "A" * 32 + ".abc",
        "v1.k-new.ses_" + "a" * 32 + ".é€",
        "v1..ses_" + "a" * 32 + ".abc",
        "v1.k-new.ses_" + "a" * 32 + "." + "A" * 600,
    ],
)
def test_malformed_tokens_are_rejected(token: str) -> None:
    with pytest.raises(InvalidTokenError):
        TokenSigner([NEW]).verify(token)


def test_a_session_id_with_a_trailing_newline_is_rejected() -> None:
    signer = TokenSigner([NEW])
    version, kid, session_id, _ = signer.sign(new_session_id()).split(".")
    forged_id = session_id + "\n"
    mac = signer.sign(session_id).split(".")[3]
    with pytest.raises(InvalidTokenError):
        signer.verify(f"{version}.{kid}.{forged_id}.{mac}")


def test_signing_refuses_something_that_is_not_a_session_id() -> None:
    with pytest.raises(ValueError, match="session id"):
        TokenSigner([NEW]).sign("acct_" + "a" * 26)


def test_legacy_fingerprints_match_the_same_material_only() -> None:
    signer = TokenSigner([NEW])
    stored = legacy_fingerprint(NEW, b'{"command":"account.create"}')
    assert re.fullmatch(r"k-new:[0-9a-f]{64}", stored)
    assert signer.fingerprint_matches(b'{"command":"account.create"}', stored)
    assert not signer.fingerprint_matches(b'{"command":"account.get"}', stored)


def test_legacy_fingerprints_match_while_their_key_is_configured() -> None:
    material = b"payload"
    stored = legacy_fingerprint(OLD, material)
    assert TokenSigner([NEW, OLD]).fingerprint_matches(material, stored)
    assert not TokenSigner([NEW]).fingerprint_matches(material, stored)


@pytest.mark.parametrize("stored", ["", "k-new", "k-new:", "k-new:zz", "k-new:é", ":abc"])
def test_malformed_fingerprints_do_not_match(stored: str) -> None:
    assert not TokenSigner([NEW]).fingerprint_matches(b"payload", stored)


def test_tokens_and_fingerprints_use_different_subkeys() -> None:
    signer = TokenSigner([NEW])
    session_id = new_session_id()
    message = f"v1.k-new.{session_id}".encode()
    token_mac = signer.sign(session_id).split(".")[3]
    fingerprint_mac = bytes.fromhex(legacy_fingerprint(NEW, message).split(":")[1])
    assert token_mac != b64(fingerprint_mac)


def test_the_raw_secret_is_not_the_mac_key() -> None:
    session_id = new_session_id()
    message = f"v1.k-new.{session_id}".encode()
    raw_mac = b64(hmac.new(NEW.secret, message, hashlib.sha256).digest())
    assert TokenSigner([NEW]).sign(session_id).split(".")[3] != raw_mac


def test_signing_key_repr_hides_the_secret() -> None:
    key = SigningKey("k1", b"s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t")
    assert "s3cr3t" not in repr(key)
    assert "s3cr3t" not in str(key)
    assert "k1" in repr(key)
    assert "s3cr3t" not in repr(TokenSigner([key]))


@pytest.mark.parametrize("kid", ["", "-k", "K1", "k.1", "k:1", "k_1", "k" * 33, "k1\n"])
def test_signing_key_rejects_bad_kids(kid: str) -> None:
    with pytest.raises(ValueError, match="key id"):
        SigningKey(kid, b"x" * 32)


def test_signing_key_rejects_short_secrets() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        SigningKey("k1", b"x" * 31)


def test_signer_needs_at_least_one_key_and_distinct_kids() -> None:
    with pytest.raises(ValueError, match="at least one"):
        TokenSigner([])
    with pytest.raises(ValueError, match="twice"):
        TokenSigner([NEW, SigningKey("k-new", b"z" * 32)])


def test_parse_signing_keys_keeps_the_order_and_accepts_padding_and_spaces() -> None:
    spec = f"k-new:{b64(NEW.secret)}=, k-old:{b64(OLD.secret)} "
    assert parse_signing_keys(spec) == [NEW, OLD]


def test_format_and_parse_round_trip() -> None:
    keys = [new_signing_key(), new_signing_key()]
    spec = ",".join(format_signing_key(key) for key in keys)
    assert parse_signing_keys(spec) == keys


def test_new_signing_keys_are_dated_and_random() -> None:
    first = new_signing_key(datetime(2026, 11, 22, 23, 0, tzinfo=UTC))
    second = new_signing_key(datetime(2026, 11, 22, 23, 0, tzinfo=UTC))
    assert re.fullmatch(r"k20261122-[0-9a-f]{4}", first.kid)
    assert len(first.secret) == 32
    assert first.secret != second.secret


SECRET_TEXT = b64(b"T" * 40)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("", "no signing key"),
        ("   ", "no signing key"),
        (SECRET_TEXT, "expected 'kid:base64url-secret'"),
        (f"k1:{SECRET_TEXT},", "expected 'kid:base64url-secret'"),
        (f"{SECRET_TEXT}:k1", "key id is not valid"),
        (f"K1:{SECRET_TEXT}", "key id is not valid"),
        ("k1:" + SECRET_TEXT[:-2] + "!!", "not base64url"),
        (f"k1:{b64(b'short')}", "at least 32 bytes"),
        (f"k1:{SECRET_TEXT},k1:{SECRET_TEXT}", "listed twice"),
    ],
)
def test_bad_key_specs_name_the_problem_but_never_the_secret(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)) as caught:
        parse_signing_keys(spec)
    message = str(caught.value)
    assert SECRET_TEXT[:10] not in message
    assert caught.value.__cause__ is None or SECRET_TEXT[:10] not in str(caught.value.__cause__)


@given(token=st.text(max_size=200) | st.from_regex(r"v1\.k-new\.ses_[0-9a-z]{32}\.[\w-]{43}"))
def test_any_garbage_is_an_invalid_token_never_a_crash(token: str) -> None:
    with pytest.raises(InvalidTokenError):
        TokenSigner([NEW]).verify(token)
