"""Keys published in this repository are refused in production (services.keys), and none
gets in unlisted: every key-shaped literal in the repository's text files must be on the list.

Key-shaped: `kid:<base64url of 32+ bytes>` (IDENTITY_SIGNING_KEYS' form) anywhere, and a
base64url value of 32+ bytes given to a name ending in KEY or KEYS (`IDENTITY_HMAC_KEY=...`,
`SIGNING_KEYS: "..."`). Hex digests (`sha256:<hex>`, as in lock files) are not keys.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from services.keys import PUBLISHED_KEY_DIGESTS, decode_base64url, is_published, key_digest

ROOT = Path(__file__).resolve().parents[2]
KID_AND_SECRET = re.compile(r"\b[a-z0-9][a-z0-9-]{0,31}:([A-Za-z0-9_-]{43,}={0,2})(?![\w-])")
NAMED_KEY = re.compile(
    r"[A-Za-z_]*KEYS?\b[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9_-]{43,}={0,2})(?![\w-])"
)
HEX = re.compile(r"[0-9a-f]+")


def repository_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    files = []
    for name in listed:
        path = ROOT / name
        if path.is_file() and b"\0" not in path.read_bytes()[:4096]:
            files.append(path)
    return files


def key_shaped_literals(text: str) -> list[bytes]:
    """The secrets of every key-shaped literal in `text`."""
    found = []
    for pattern in (KID_AND_SECRET, NAMED_KEY):
        for match in pattern.finditer(text):
            value = match.group(1)
            if HEX.fullmatch(value):
                continue
            try:
                secret = decode_base64url(value)
            except ValueError:
                continue
            if len(secret) >= 32:
                found.append(secret)
    return found


def test_every_key_in_the_repository_is_on_the_published_list() -> None:
    files = repository_text_files()
    assert len(files) > 50, "the scan found no repository to look at"
    unlisted = {
        f"{path.relative_to(ROOT)}: sha256 {key_digest(secret)}"
        for path in files
        for secret in key_shaped_literals(path.read_text(errors="replace"))
        if not is_published(secret)
    }
    assert not unlisted, (
        "keys written in the repository must be listed in services.keys.PUBLISHED_KEY_DIGESTS"
        " (so that production refuses them), or better, not written at all: "
        + "; ".join(sorted(unlisted))
    )


@pytest.mark.parametrize(
    "text",
    [
        'IDENTITY_SIGNING_KEYS: "prod-1:{k}"',
        "IDENTITY_HMAC_KEY={k}",
        "export SIGNING_KEYS='{k}='",
        "keys = 'a:{k},b:{k}'",
    ],
)
def test_the_scan_sees_key_shaped_literals(text: str) -> None:
    key = "Zm9yLWEtdGVzdC1vZi10aGUtc2Nhbm5lci1vbmx5LW5vdC1hLWtleQ"
    assert key_shaped_literals(text.format(k=key))


@pytest.mark.parametrize(
    "text",
    [
        "--hash=sha256:" + "0123456789abcdef" * 4,
        "IDENTITY_SIGNING_KEYS=<new kid:key>,<old kid:key>",
        "k1:c2hvcnQ",
        "https://example.com/a-very-long-path-that-is-not-a-key-at-all-really",
    ],
)
def test_the_scan_ignores_what_is_not_a_key(text: str) -> None:
    assert key_shaped_literals(text) == []


def test_the_keys_published_before_contract_v2_are_listed() -> None:
    compose = "ZGV2ZWxvcG1lbnQtb25seS1rZXktZG8tbm90LXVzZS1pbi1wcm9k"
    tests = "dGVzdC1zaWduaW5nLWtleS0wMTIzNDU2Nzg5YWJjZGVmZ2hpams"
    assert {key_digest(decode_base64url(k)) for k in (compose, tests)} <= PUBLISHED_KEY_DIGESTS
