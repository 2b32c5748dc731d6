"""A worker whose URLs and keys are given only as files (`IDENTITY_X_FILE`, contract v2,
section 5), as a Kubernetes secret volume or a Vault agent provides them: it migrates, signs
in and verifies through the broker as any other."""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import Isolated
from tests.integration.scenarios import Person, call_ok, sign_in, sign_up
from worker.settings import redacted_url

# Every URL and key the worker holds (worker.settings.secret_fields).
SECRET_VARIABLES = (
    "IDENTITY_AMQP_URL",
    "IDENTITY_DATABASE_URL",
    "IDENTITY_MIGRATION_DATABASE_URL",
    "IDENTITY_SIGNING_KEYS",
    "IDENTITY_HMAC_KEY",
    "IDENTITY_JWT_KEYS",
)


async def test_a_worker_with_its_urls_and_keys_only_in_files_processes_commands(
    isolated: Isolated, tmp_path: Path
) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    env: dict[str, str] = {}
    for variable in SECRET_VARIABLES:
        value = isolated.env[variable]
        assert value, f"{variable} must be set for this test to mean anything"
        path = secrets_dir / variable.removeprefix("IDENTITY_").lower().replace("_", "-")
        path.write_text(value + "\n")  # as `echo` or `kubectl create secret` leave it
        path.chmod(0o400)
        env[variable] = ""  # blank: unset, so only the file can say it
        env[variable + "_FILE"] = str(path)

    worker = isolated.start(**env)
    assert not any(worker.env[variable] for variable in SECRET_VARIABLES)
    bus = await isolated.bus()

    person = Person.new("from-files")
    account = await sign_up(bus, person)
    started = await sign_in(bus, person)
    verified = await call_ok(bus, "session.verify", {"token": started["token"]})
    assert verified["session"]["account_id"] == account["id"]
    assert started["access_token"].count(".") == 2  # signed with the JWT key from its file

    # The start-up log names the broker and the database it read from the files (their
    # passwords masked), and no key.
    (started_line,) = worker.log_entries("identity worker started")
    assert started_line["amqp"] == redacted_url(isolated.amqp_url)
    assert started_line["database"] == redacted_url(isolated.env["IDENTITY_DATABASE_URL"])
    log = worker.log_text()
    for variable in ("IDENTITY_SIGNING_KEYS", "IDENTITY_HMAC_KEY", "IDENTITY_JWT_KEYS"):
        for key in isolated.env[variable].split(","):
            assert key.rpartition(":")[2] not in log, f"{variable} in the log"
