"""A steady, realistic mix of every command, for the fault suite.

Simulated users each run a story: sign up, then sign in, verify, read, rename, change the
password, sign out, sign out everywhere, with the odd wrong password and duplicate sign-up.
Each step waits for the reply of the one before (it needs the account id, version or token),
so a stalled worker stalls the stories instead of piling up commands. A global pace spreads
`total` commands over `duration_s`.

Every command is published with confirms through `Bus.publish_confirmed`, which re-sends an
unconfirmed publication (after a broker cut) with the same key. With `duplicate_rate`, a
command is published a second time, same key, new correlation id, after a random delay.

Everything is derived from `seed`: the same seed gives the same emails, passwords and story.
"""

from __future__ import annotations

import asyncio
import random
import string
import time
from dataclasses import dataclass, field
from typing import Any

from tests.support.bus import Bus, Sent

STATE_CHANGING = {
    "account.create",
    "account.update",
    "account.change_password",
    "session.start",
    "session.end",
    "session.end_all",
}
SECRET_FIELDS = ("password", "current_password", "new_password", "token")


@dataclass
class LoadStats:
    commands: int = 0
    duplicates: int = 0
    republished: int = 0
    abandoned_stories: int = 0
    by_command: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0


class MissingReplies(AssertionError):
    """Some commands never got a reply: the message lists each one precisely."""


class LoadGenerator:
    def __init__(
        self,
        bus: Bus,
        *,
        seed: int,
        total: int = 400,
        duration_s: float = 15.0,
        users: int = 24,
        duplicate_rate: float = 0.0,
        step_timeout_s: float = 90.0,
    ) -> None:
        self.bus = bus
        self.seed = seed
        self.total = total
        self.duration_s = duration_s
        self.users = users
        self.duplicate_rate = duplicate_rate
        self.step_timeout_s = step_timeout_s
        self.stats = LoadStats()
        self.secrets: set[str] = set()  # every password and token this load sent or got
        self._rng = random.Random(seed)
        self._started = 0.0
        self._issued = 0
        self._pace_lock = asyncio.Lock()
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._serial = 0

    # -- the run --------------------------------------------------------------------------

    async def run(self) -> LoadStats:
        """Issue the whole budget (or stop at the deadline); replies are awaited by stories."""
        self._started = time.monotonic()
        stories = [
            asyncio.create_task(self._story(user), name=f"story-{user}")
            for user in range(self.users)
        ]
        await asyncio.gather(*stories)
        if self._side_tasks:
            await asyncio.gather(*self._side_tasks)
        self.stats.elapsed_s = time.monotonic() - self._started
        return self.stats

    def issued_fraction(self) -> float:
        return self._issued / self.total

    async def reached(self, fraction: float, timeout: float = 120.0) -> None:
        """Wait until `fraction` of the budget has been issued (to time a fault)."""
        deadline = time.monotonic() + timeout
        while self.issued_fraction() < fraction:
            if time.monotonic() > deadline:
                raise AssertionError(f"load stuck at {self._issued}/{self.total} commands")
            await asyncio.sleep(0.05)

    async def wait_replies(self, timeout: float = 90.0) -> None:
        """Until every published command has a reply; else a precise report of what is
        missing (command, key, correlation id, whether it was a duplicate)."""
        try:
            await self.bus.wait_for(lambda: not self.missing(), timeout)
        except TimeoutError:
            lines = [
                f"  {s.command} key={s.key} correlation_id={s.correlation_id}"
                + (f" (duplicate of {s.duplicate_of})" if s.duplicate_of else "")
                for s in self.missing()
            ]
            raise MissingReplies(
                f"{len(lines)} of {len(self.bus.sent)} commands got no reply within "
                f"{timeout:g}s:\n" + "\n".join(lines[:50])
            ) from None

    def missing(self) -> list[Sent]:
        return [s for s in self.bus.sent if not self.bus.replies.get(s.correlation_id)]

    # -- pacing and publishing --------------------------------------------------------------

    async def _permit(self) -> bool:
        """One command's slot in the schedule; False once the budget or the time is spent."""
        async with self._pace_lock:
            if self._issued >= self.total:
                return False
            due = self._started + self._issued * self.duration_s / self.total
            self._issued += 1
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return True

    def _next_id(self, kind: str) -> str:
        self._serial += 1
        return f"{kind}-{self.seed}-{self._serial}-{self._rng.getrandbits(48):012x}"

    async def _send(self, command: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        """Publish one command (maybe twice) and wait for its reply; None if none came."""
        if not await self._permit():
            return None
        key = self._next_id("key")
        correlation_id = self._next_id("cid")
        body = {"idempotency_key": key, "payload": payload}
        for name in SECRET_FIELDS:
            if isinstance(payload.get(name), str):
                self.secrets.add(payload[name])
        self.stats.commands += 1
        self.stats.by_command[command] = self.stats.by_command.get(command, 0) + 1
        if self._rng.random() < self.duplicate_rate:
            delay = self._rng.uniform(0.0, 1.5)
            task = asyncio.create_task(self._duplicate(command, body, correlation_id, delay))
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)
        self.stats.republished += await self.bus.publish_confirmed(
            command, body, correlation_id=correlation_id
        )
        try:
            reply = await self.bus.reply(correlation_id, timeout=self.step_timeout_s)
        except TimeoutError:
            return None
        token = (reply.get("result") or {}).get("token")
        if isinstance(token, str):
            self.secrets.add(token)
        return reply

    async def _duplicate(
        self, command: str, body: dict[str, Any], original: str, delay: float
    ) -> None:
        await asyncio.sleep(delay)
        self.stats.duplicates += 1
        self.stats.republished += await self.bus.publish_confirmed(
            command, body, correlation_id=self._next_id("dup"), duplicate_of=original
        )

    # -- the stories ------------------------------------------------------------------------

    def _password(self, context: list[str]) -> str:
        alphabet = string.ascii_letters + string.digits
        while True:
            word = "".join(self._rng.choice(alphabet) for _ in range(22))
            candidate = f"Pw{word}!"
            if not any(c.casefold() in candidate.casefold() for c in context if c):
                return candidate

    async def _story(self, user: int) -> None:
        """One user's life; ends when the budget is spent or a reply never came."""
        local = f"u{self.seed}x{user}"
        email = f"{local}@load.example"
        name = f"Load User {user}"
        context = [local, "load", name, "identity"]
        password = self._password(context)
        reply = await self._send(
            "account.create", {"email": email, "password": password, "display_name": name}
        )
        if reply is None:
            return self._abandon(user)
        if not reply["ok"]:
            return None  # e.g. a duplicate story: nothing more to do for this user
        account = reply["result"]["account"]
        account_id, version = account["id"], account["version"]
        tokens: list[str] = []
        wrong_left = 2
        while True:
            step = self._rng.choices(
                ["start", "verify", "get", "update", "change", "end", "end_all", "wrong", "taken"],
                weights=[22, 22, 14, 12, 6, 8, 4, 6, 3],
            )[0]
            if step == "start" or (step in {"verify", "end"} and not tokens):
                reply = await self._send("session.start", {"email": email, "password": password})
                if reply is not None and reply["ok"]:
                    tokens.append(reply["result"]["token"])
            elif step == "verify":
                reply = await self._send("session.verify", {"token": self._rng.choice(tokens)})
            elif step == "get":
                reply = await self._send("account.get", {"account_id": account_id})
            elif step == "update":
                payload = {
                    "account_id": account_id,
                    "expected_version": version,
                    "display_name": f"{name} v{version + 1}",
                }
                reply = await self._send("account.update", payload)
                if reply is not None and reply["ok"]:
                    version = reply["result"]["account"]["version"]
            elif step == "change":
                new = self._password(context)
                payload = {
                    "account_id": account_id,
                    "current_password": password,
                    "new_password": new,
                }
                reply = await self._send("account.change_password", payload)
                if reply is not None and reply["ok"]:
                    password, version = new, reply["result"]["account"]["version"]
                    tokens.clear()
            elif step == "end":
                reply = await self._send("session.end", {"token": tokens.pop()})
            elif step == "end_all":
                reply = await self._send("session.end_all", {"account_id": account_id})
                if reply is not None and reply["ok"]:
                    tokens.clear()
            elif step == "wrong":
                # A few wrong passwords, well below the throttle's free failures.
                wrong = self._password(context) if wrong_left > 0 else password
                wrong_left -= 1
                reply = await self._send("session.start", {"email": email, "password": wrong})
                if reply is not None and reply["ok"]:
                    tokens.append(reply["result"]["token"])
            else:
                other = self._password(context)
                payload = {"email": email.upper(), "password": other, "display_name": "Taken"}
                reply = await self._send("account.create", payload)
            if reply is None:
                if self._issued < self.total:
                    self._abandon(user)
                return None

    def _abandon(self, user: int) -> None:
        if self._issued < self.total:
            self.stats.abandoned_stories += 1
