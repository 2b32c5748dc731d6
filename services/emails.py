"""Email canonicalisation: the one function that decides when two addresses are the same.

Policy (applied identically on account creation, sign-in, email change and lookup):

1. Trim surrounding white space.
2. Unicode NFKC, so that full-width letters and other compatibility forms mean the plain
   letters they look like.
3. Reject control, format (bidi overrides, zero-width joiners), surrogate, private-use and
   unassigned code points: they make an address that renders as another one.
4. Check the syntax with `email-validator` (no DNS: deliverability is the verification
   flow's business, and a network call here would make sign-in depend on a resolver).
   Quoted local parts, IP-literal domains and special-use domains (``.test``, ``.local``,
   ``localhost``...) are refused, as the library does by default.
5. Write the domain in its IDNA (punycode) form: ``Bücher.example`` -> ``xn--bcher-kva.example``.
6. Case-fold the whole address, local part included, with Unicode full case folding
   (`str.casefold`), then NFKC again. RFC 5321 lets a mail server treat ``Alice`` and
   ``alice`` as different mailboxes, but no mainstream provider does, and Kratos, Keycloak
   and GoTrue all fold the whole address; doing the same means one person cannot hold two
   accounts that differ only in case. Lower-casing is not case folding: it writes a capital
   sigma as a final sigma (U+03C2) at the end of a word and as a small sigma (U+03C3)
   elsewhere, so ``ΟΔΟΣ.ΝΙΚΟΣ`` typed in capitals and in small letters came out different;
   it keeps ``ß`` while ``STRASSE`` lowers to ``strasse``; and so on for some 250 characters
   (Cherokee, Greek with iota subscript...). Folding maps every case variant of a letter to
   one form. It keeps the dotless i of Turkish (U+0131) apart from ``i``, as Unicode's
   default folding does: they are different letters.

The canonical form is what uniqueness is enforced on; the address as given is stored next
to it and shown back to the owner. The function is idempotent: a canonical address maps to
itself.
"""

from __future__ import annotations

import unicodedata

from email_validator import EmailNotValidError, validate_email

from services.errors import InvalidInputError

# Categories that never belong in an address: Cc control, Cf format (bidi, zero-width),
# Cs surrogate, Co private use, Cn unassigned.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})
# RFC 5321 caps a path at 256 octets; the wire contract at 320 characters. Refusing longer
# input before normalising keeps the work per command small.
_MAX_RAW_LENGTH = 320


def _invalid(field: str, problem: str) -> InvalidInputError:
    return InvalidInputError.for_field(field, problem)


def _check_code_points(text: str, field: str) -> None:
    for char in text:
        if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            raise _invalid(field, "must not contain control, format or invisible characters")


def canonical_email(raw: str, *, field: str = "payload.email") -> str:
    """The canonical form of `raw`, or `InvalidInputError` naming `field` and the problem."""
    if len(raw) > _MAX_RAW_LENGTH:
        raise _invalid(field, "is too long")
    text = unicodedata.normalize("NFKC", raw.strip())
    if not text:
        raise _invalid(field, "must not be empty")
    _check_code_points(text, field)
    try:
        valid = validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        raise _invalid(field, str(exc)) from exc
    # Folding can leave a sequence that is no longer in NFKC; normalising again keeps the
    # function idempotent. The domain is ASCII by now (IDNA), where folding is lower-casing.
    local_part = unicodedata.normalize("NFKC", valid.local_part.casefold())
    return f"{local_part}@{valid.ascii_domain.lower()}"


def recanonicalised(stored: str) -> str | None:
    """The canonical form of an address stored as its owner gave it, under today's rule; None
    if the rule no longer accepts it. What the migration step moves existing accounts to."""
    try:
        return canonical_email(stored)
    except InvalidInputError:
        return None
