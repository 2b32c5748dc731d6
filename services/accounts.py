"""The words a password must not be built from: who the account is, and what this is. Shared
by every service module that sets a password."""

from __future__ import annotations

SERVICE_NAME = "identity"


def context_words(email_canonical: str, display_name: str) -> list[str]:
    """Words a password must not be built from: who the account is, and what this is."""
    local, _, domain = email_canonical.partition("@")
    return [local, domain.split(".")[0], display_name, SERVICE_NAME]
