"""Accounts written when canonical emails were lower-cased, moved to the case-folded form by the
migration step; two accounts that turn out to be one mailbox are reported, not merged."""

from __future__ import annotations

import asyncio
import secrets
import unicodedata
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.emails import canonical_email, recanonicalised
from stores import PostgresIdentityStore
from stores.postgres import recanonicalise_emails
from tests.conftest import migrated_database
from tests.contract.builders import account
from tools import cli
from worker.main import migrate_database


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    """A database of the test's own: the step reads every account."""
    async with migrated_database() as made:
        yield made


def lowered(email: str) -> str:
    """What the earlier rule made of an address (NFKC, then lower-casing)."""
    local, _, domain = unicodedata.normalize("NFKC", email).rpartition("@")
    return f"{unicodedata.normalize('NFKC', local.lower())}@{domain.lower()}"


async def insert(dsn: str, email: str) -> str:
    """An account as the earlier rule stored it."""
    record = account(email=email, email_canonical=lowered(email))
    store = await PostgresIdentityStore.connect(dsn)
    try:
        async with store.unit_of_work() as uow:
            await uow.insert_account(record)
    finally:
        await store.close()
    return record.id


async def canonical_of(dsn: str, account_id: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        found: str = await conn.fetchval(
            "SELECT email_canonical FROM accounts WHERE id = $1", account_id
        )
    finally:
        await conn.close()
    return found


async def test_an_account_is_moved_to_its_folded_form_and_found_by_any_case(dsn: str) -> None:
    tag = secrets.token_hex(4)
    greek = await insert(dsn, f"{tag}.οδος.νικος@example.com")
    german = await insert(dsn, f"{tag}.Straße@Example.com")
    ascii_only = await insert(dsn, f"{tag}.Ada@Example.com")

    report = await recanonicalise_emails(dsn, recanonicalised)

    assert sorted(report.moved) == sorted([greek, german])
    assert (report.collisions, report.refused) == ([], [])
    store = await PostgresIdentityStore.connect(dsn)
    try:
        for typed in (f"{tag}.οδος.νικος@example.com", f"{tag}.ΟΔΟΣ.ΝΙΚΟΣ@EXAMPLE.COM"):
            found = await store.get_account_by_email(canonical_email(typed))
            assert found is not None
            assert found.id == greek
            assert found.version == 1  # nothing its owner sees has changed
        found = await store.get_account_by_email(canonical_email(f"{tag}.STRASSE@example.com"))
        assert found is not None
        assert found.id == german
    finally:
        await store.close()
    assert await canonical_of(dsn, ascii_only) == f"{tag}.ada@example.com"
    assert (await recanonicalise_emails(dsn, recanonicalised)).moved == []  # idempotent


async def test_accounts_that_were_one_mailbox_are_reported_and_left(dsn: str) -> None:
    tag = secrets.token_hex(4)
    # The two accounts for one person: typed in capitals, the first sigma came out
    # medial and the last final; typed in small letters, as typed. Neither is the folded form,
    # and both would move to it.
    capitals = await insert(dsn, f"{tag}.ΟΔΟΣ.ΝΙΚΟΣ@example.com")
    small = await insert(dsn, f"{tag}.οδος.νικος@example.com")
    # Two spellings of one German address: one already holds the folded form.
    holder = await insert(dsn, f"{tag}.STRASSE@example.com")
    sharp = await insert(dsn, f"{tag}.Straße@example.com")
    # An address today's rule refuses (a special-use domain).
    refused = await insert(dsn, f"{tag}.ålice@localhost")

    report = await recanonicalise_emails(dsn, recanonicalised)

    assert report.moved == []
    assert sorted(report.collisions) == sorted([sorted([capitals, small]), sorted([holder, sharp])])
    assert report.refused == [refused]
    assert await canonical_of(dsn, capitals) == f"{tag}.οδοσ.νικος@example.com"
    assert await canonical_of(dsn, small) == f"{tag}.οδος.νικος@example.com"
    assert await canonical_of(dsn, sharp) == f"{tag}.straße@example.com"

    # Resolved by an operator (the holder gives its address up): the next pass moves the other.
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "UPDATE accounts SET email = 'gone.' || id || '@example.com',"
            " email_canonical = 'gone.' || id || '@example.com' WHERE id = $1",
            holder,
        )
    finally:
        await conn.close()
    again = await recanonicalise_emails(dsn, recanonicalised)
    assert again.moved == [sharp]
    assert await canonical_of(dsn, sharp) == f"{tag}.strasse@example.com"


async def test_the_migrate_step_applies_the_schema_then_moves_accounts(dsn: str) -> None:
    tag = secrets.token_hex(4)
    account_id = await insert(dsn, f"{tag}.ΝΙΚΟΣ@example.com")  # a final sigma, lowered

    applied, report = await migrate_database(dsn)

    assert applied == []  # the schema was up to date
    assert report.moved == [account_id]
    assert await canonical_of(dsn, account_id) == canonical_email(f"{tag}.νικοσ@example.com")


def test_identity_worker_migrate_lists_what_it_could_not_move(
    dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tag = secrets.token_hex(4)
    capitals = asyncio.run(insert(dsn, f"{tag}.ΟΔΟΣ.ΝΙΚΟΣ@example.com"))
    small = asyncio.run(insert(dsn, f"{tag}.οδος.νικος@example.com"))
    monkeypatch.setenv("IDENTITY_DATABASE_URL", dsn)

    assert cli.main(["migrate"]) == 1

    out = capsys.readouterr().out
    assert "applied: nothing (up to date)" in out
    assert "accounts moved to their new canonical email: 0" in out
    together = ", ".join(sorted([capitals, small]))
    assert f"one canonical email, several accounts (not moved): {together}" in out
    assert tag not in out  # ids only: no address is printed
