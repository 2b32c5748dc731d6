"""Who may send what: the caller policy of `IDENTITY_CALLERS` (contract v2, section 1).

A caller is the AMQP `user_id` of a command. RabbitMQ refuses a publish whose `user_id` is not
the publishing connection's user (unless that user has the `impersonator` tag, which no user
of the identity vhost may have), so the worker can trust it.

    IDENTITY_CALLERS=web=session.start,session.verify,account.get@self;admin=*

A grant is a command name, a prefix (`session.*`: every command whose name starts with
`session.`), or `*`; a grant ending in `@self` lets the caller act only on the account whose
live session token it shows in `metadata.actor_token`. Mistakes are refused when the worker
starts, never discovered on the first command: an unknown command, a prefix no command has,
a user named twice, or `@self` on a command that acts on no account (or on one nobody may be
granted on their own account, such as granting oneself a role).

Without `IDENTITY_CALLERS` the policy is open (development only): anyone may send anything,
with or without a `user_id`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from messages.commands import COMMANDS
from messages.topology import DIRECT_REPLY_TO, IDENTITY_PREFIX

SELF_SUFFIX = "@self"
ANY = "*"
# The caller label of the metrics for a caller the policy does not name (or no user_id):
# metric labels stay a closed set whatever users publish.
OTHER = "other"


class PolicyError(ValueError):
    """`IDENTITY_CALLERS` does not describe a valid policy; the message says where."""


class Access(Enum):
    """What a caller may do with one command."""

    DENIED = "denied"
    ALLOWED = "allowed"
    # Allowed on the caller's own account only: the command must prove it (`@self`).
    SELF = "self"


@dataclass(frozen=True, slots=True)
class CallerPolicy:
    """Each user's access to each command, resolved once at start; `None`: the open policy."""

    table: Mapping[str, Mapping[str, Access]] | None

    @classmethod
    def open(cls) -> CallerPolicy:
        return cls(None)

    @classmethod
    def parse(cls, text: str) -> CallerPolicy:
        """The policy `text` describes (`user=grant,grant;user=grant`); PolicyError if none."""
        table: dict[str, dict[str, Access]] = {}
        for entry in (part.strip() for part in text.split(";")):
            if not entry:
                continue
            user, equals, grants = (piece.strip() for piece in entry.partition("="))
            if not equals or not user or any(char.isspace() for char in user):
                raise PolicyError(f"{entry!r} is not of the form user=grant,grant")
            if user in table:
                raise PolicyError(f"user {user!r} is named twice")
            table[user] = _access_of(user, grants)
        if not table:
            raise PolicyError("names no user (unset it for the open development policy)")
        return cls(table)

    @property
    def is_open(self) -> bool:
        return self.table is None

    @property
    def users(self) -> frozenset[str]:
        """The users the policy names (none for the open policy)."""
        return frozenset(self.table or ())

    def access(self, caller: str | None, command: str) -> Access:
        """What `caller` (an AMQP user_id, None when the message had none) may do with
        `command` (a name from COMMANDS)."""
        if self.table is None:
            return Access.ALLOWED
        if caller is None:
            return Access.DENIED
        return self.table.get(caller, {}).get(command, Access.DENIED)

    def allows_reply_to(self, caller: str | None, reply_to: str) -> bool:
        """Whether the worker may answer `caller` at `reply_to`: with a policy, RabbitMQ's
        direct reply-to or a queue in the caller's own namespace (`<user_id>.`); with the open
        policy, any queue but the identity service's own. Never a queue of the service: a
        reply there would be a message nobody sent it."""
        if reply_to.startswith(IDENTITY_PREFIX):
            return False
        if self.table is None:
            return True
        if reply_to == DIRECT_REPLY_TO or reply_to.startswith(DIRECT_REPLY_TO + "."):
            return True
        return caller is not None and reply_to.startswith(caller + ".")

    def label(self, caller: str | None) -> str:
        """`caller` as a metric label: a user the policy names, else "other"."""
        return caller if caller is not None and caller in self.users else OTHER


def _access_of(user: str, text: str) -> dict[str, Access]:
    """Every command's access for one user's grants: the widest grant wins (a plain grant
    over an `@self` one)."""
    access: dict[str, Access] = {}
    grants = [grant.strip() for grant in text.split(",")]
    if not any(grants):
        raise PolicyError(f"user {user!r} has no grant")
    for grant in grants:
        if not grant:
            raise PolicyError(f"user {user!r} has an empty grant")
        pattern = grant.removesuffix(SELF_SUFFIX)
        self_only = pattern != grant
        commands = _matching(user, pattern)
        if self_only:
            refused = [name for name in commands if not COMMANDS[name].allows_self_grant]
            if refused:
                raise PolicyError(
                    f"user {user!r}: {grant!r} grants @self on {', '.join(refused)}: "
                    "@self needs a command that acts on an account the caller may own"
                )
        for name in commands:
            if access.get(name) is not Access.ALLOWED:
                access[name] = Access.SELF if self_only else Access.ALLOWED
    return access


def _matching(user: str, pattern: str) -> list[str]:
    if pattern == ANY:
        return list(COMMANDS)
    if pattern.endswith(".*"):
        prefix = pattern[:-1]  # keeps the dot: `session.*` is not `sessions.x`
        matched = [name for name in COMMANDS if name.startswith(prefix)]
        if not matched or ANY in prefix:
            raise PolicyError(f"user {user!r}: no command matches {pattern!r}")
        return matched
    if pattern not in COMMANDS:
        raise PolicyError(f"user {user!r}: unknown command {pattern!r}")
    return [pattern]
