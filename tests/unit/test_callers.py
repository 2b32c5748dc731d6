"""The caller policy (IDENTITY_CALLERS): its grammar, what it grants, where replies may go."""

from __future__ import annotations

import pytest

from messages import COMMANDS
from messages.commands import ActsOn
from worker.callers import OTHER, Access, CallerPolicy, PolicyError
from worker.settings import SettingsError, load_settings

WEB = (
    "web=session.start,session.verify,session.end,account.create,"
    "account.get@self,account.update@self,session.end_all@self"
)
POLICY = CallerPolicy.parse(f"{WEB};admin=*")


def test_a_grant_by_name_allows_that_command_only() -> None:
    assert POLICY.access("web", "session.start") is Access.ALLOWED
    assert POLICY.access("web", "account.change_password") is Access.DENIED


def test_star_allows_every_command() -> None:
    assert all(POLICY.access("admin", name) is Access.ALLOWED for name in COMMANDS)


def test_a_prefix_allows_the_commands_under_it_only() -> None:
    policy = CallerPolicy.parse("ops=session.*")

    allowed = {name for name in COMMANDS if policy.access("ops", name) is Access.ALLOWED}
    assert allowed == {name for name in COMMANDS if name.startswith("session.")}
    assert "session.end_all" in allowed
    assert "account.get" not in allowed


def test_a_self_grant_asks_for_proof() -> None:
    assert POLICY.access("web", "account.get") is Access.SELF


def test_the_widest_grant_wins() -> None:
    policy = CallerPolicy.parse("web=account.get@self,account.*")

    assert policy.access("web", "account.get") is Access.ALLOWED


def test_no_user_id_and_unknown_users_are_denied() -> None:
    assert POLICY.access(None, "session.verify") is Access.DENIED
    assert POLICY.access("mallory", "session.verify") is Access.DENIED
    # Names are the broker's user names: exact, case and all.
    assert POLICY.access("Admin", "session.verify") is Access.DENIED


def test_the_open_policy_allows_everyone_everything() -> None:
    policy = CallerPolicy.open()

    assert policy.is_open
    assert policy.access(None, "account.change_password") is Access.ALLOWED
    assert policy.access("anyone", "session.end_all") is Access.ALLOWED


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("web=sesion.start", "unknown command 'sesion.start'"),
        ("web=session.*,foo.*", "no command matches 'foo.*'"),
        ("web=account.create@self", "account.create@self"),
        ("web=session.verify@self", "session.verify@self"),
        ("web=session.end@self", "session.end@self"),
        ("web=session.start@self", "session.start@self"),
        ("web=*@self", "*@self"),
        ("web=session.*@self", "session.*@self"),
        ("web=*;web=*", "named twice"),
        ("web", "not of the form"),
        ("=*", "not of the form"),
        ("web=", "has no grant"),
        ("web=*,,session.start", "empty grant"),
        (";", "names no user"),
        ("we b=*", "not of the form"),
    ],
)
def test_a_bad_policy_is_refused_naming_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(PolicyError, match=problem.replace("*", r"\*").replace(".", r"\.")):
        CallerPolicy.parse(text)


def test_every_command_that_acts_on_an_account_may_be_granted_at_self_but_roles() -> None:
    for spec in COMMANDS.values():
        grant = f"u={spec.name}@self"
        if spec.acts_on is ActsOn.NO_ACCOUNT or not spec.self_grantable:
            with pytest.raises(PolicyError):
                CallerPolicy.parse(grant)
        else:
            assert CallerPolicy.parse(grant).access("u", spec.name) is Access.SELF


@pytest.mark.parametrize("command", ["account.grant_role", "account.revoke_role"])
def test_nobody_may_be_granted_a_role_of_their_own(command: str) -> None:
    with pytest.raises(PolicyError, match=rf"{command}@self"):
        CallerPolicy.parse(f"web={command}@self")
    with pytest.raises(PolicyError, match=r"account\.\*@self"):
        CallerPolicy.parse("web=account.*@self")
    assert CallerPolicy.parse(f"admin={command}").access("admin", command) is Access.ALLOWED


def test_a_bad_policy_is_a_settings_error_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match=r"^IDENTITY_CALLERS: user 'web': unknown command"):
        load_settings({"IDENTITY_CALLERS": "web=session.begin"})


def test_the_settings_give_the_policy_or_the_open_one() -> None:
    assert load_settings({"IDENTITY_DEV_MODE": "true"}).caller_policy().is_open
    policy = load_settings({"IDENTITY_DEV_MODE": "true", "IDENTITY_CALLERS": "admin=*"})
    assert policy.caller_policy().users == {"admin"}


def test_metric_labels_are_the_policy_users_or_other() -> None:
    assert POLICY.label("web") == "web"
    assert POLICY.label("mallory") == OTHER
    assert POLICY.label(None) == OTHER


@pytest.mark.parametrize(
    ("caller", "reply_to", "allowed"),
    [
        ("web", "amq.rabbitmq.reply-to", True),
        ("web", "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAzMjQ0NDg3OQAAAAAAAAAB.vz1PF5N6Bxg==", True),
        (None, "amq.rabbitmq.reply-to", True),
        ("web", "web.replies", True),
        ("web", "web", False),
        ("web", "webx.replies", False),
        ("web", "admin.replies", False),
        ("web", "events.subscriber", False),
        ("web", "identity.dead", False),
        ("web", "identity.worker.v2.fast", False),
        ("web", "amq.gen-abc", False),
        (None, "web.replies", False),
        ("identity", "identity.dead", False),
    ],
)
def test_with_a_policy_replies_go_to_direct_reply_to_or_the_callers_own_queues(
    caller: str | None, reply_to: str, allowed: bool
) -> None:
    policy = CallerPolicy.parse(f"{caller or 'web'}=*")
    assert policy.allows_reply_to(caller, reply_to) is allowed


@pytest.mark.parametrize(
    ("reply_to", "allowed"),
    [
        ("amq.rabbitmq.reply-to", True),
        ("amq.gen-abc", True),
        ("anything.at.all", True),
        ("identity.dead", False),
        ("identity.events", False),
    ],
)
def test_with_the_open_policy_replies_go_anywhere_but_the_services_own_queues(
    reply_to: str, allowed: bool
) -> None:
    assert CallerPolicy.open().allows_reply_to(None, reply_to) is allowed
