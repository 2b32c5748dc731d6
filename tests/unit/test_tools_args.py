"""The command line before any connection: what it runs, and what it refuses as usage (exit 2);
and what `send` says when the broker connection drops under a command."""

from __future__ import annotations

import argparse
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiormq.exceptions import ChannelInvalidStateError

from tools import cli, send
from tools.common import EXIT_NO_REPLY, EXIT_USAGE

CREATE = ["--email", "ada@example.com", "--password", "a long enough passphrase"]
CREATE += ["--display-name", "Ada"]


def test_run_is_the_default_with_its_own_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[argparse.Namespace] = []
    monkeypatch.setattr(cli, "_run", lambda args: ran.append(args) or 0)  # read at parse time

    assert cli.main(["--no-migrate"]) == 0
    assert cli.main([]) == 0
    assert cli.main(["run", "--no-migrate"]) == 0
    assert [args.no_migrate for args in ran] == [True, False, True]


@pytest.mark.parametrize(
    "argv",
    [
        ["send", "account.get", "--account-id", "acct_x", "--timeout", "0"],
        ["demo", "--timeout", "-1"],
        ["dead", "republish", "--timeout", "soon"],
        ["dead"],
    ],
    ids=["send-timeout-zero", "demo-timeout-negative", "republish-timeout-text", "dead-alone"],
)
def test_bad_usage_exits_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == EXIT_USAGE


@pytest.mark.parametrize("key", ["", "k" * 201, "a\x00b"], ids=["empty", "too-long", "nul"])
def test_a_key_the_contract_refuses_is_bad_usage(
    key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["send", "account.create", *CREATE, "--idempotency-key", key]) == EXIT_USAGE
    assert "--idempotency-key must be 1 to 200 characters" in capsys.readouterr().err


class _DroppedClient:
    """Connects, then loses its channel while the command is out."""

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, url: str, *, timeout: float, ssl_context: object
    ) -> AsyncIterator[_DroppedClient]:
        yield cls()

    async def send(self, *args: Any, **kwargs: Any) -> Any:
        raise ChannelInvalidStateError("<Channel: 1> closed")


def test_a_connection_lost_under_a_command_names_its_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(send, "IdentityClient", _DroppedClient)
    argv = ["send", "account.create", *CREATE, "--idempotency-key", "signup-42"]
    argv += ["--amqp-url", "amqp://guest:guest@127.0.0.1/"]

    assert cli.main(argv) == EXIT_NO_REPLY
    err = capsys.readouterr().err
    assert "it may have taken effect" in err
    assert "--idempotency-key signup-42" in err


def test_send_builds_the_recovery_flags_from_the_payload_and_reads_a_code_from_stdin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = send.COMMANDS["account.recovery.complete"]
    options = send.command_parser(spec).parse_args(
        ["--email", "ada@example.com", "--code", "-", "--new-password", "a long passphrase"]
    )
    monkeypatch.setattr("sys.stdin", io.StringIO("ABCD-EFGH\n"))
    assert send.payload_from(spec, options) == {
        "email": "ada@example.com",
        "code": "ABCD-EFGH",
        "new_password": "a long passphrase",
    }
    with pytest.raises(SystemExit):
        send.command_parser(spec).parse_args(["--email", "ada@example.com"])
