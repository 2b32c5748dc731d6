"""The shipped broker permissions (deploy/rabbitmq/definitions.json), loaded into a fresh vhost
of the local RabbitMQ with real users, each with a random password.

The users get a prefix of the run's own (users are global to the broker, and runs must not
meet), and each caller's own namespace in the permission patterns follows its new name;
nothing else of the file changes. The load goes through `rabbitmqctl import_definitions`,
as a deployment's does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.vhosts import rabbitmqctl

ROOT = Path(__file__).resolve().parents[2]
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
HOST = "127.0.0.1:5672"


def rabbit_password_hash(password: str) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


@dataclass(frozen=True)
class Deployment:
    """The vhost and the users (shipped name -> real name, password) loaded on the broker."""

    vhost: str
    users: dict[str, tuple[str, str]]

    def user(self, shipped: str) -> str:
        """The broker user name of the shipped user `shipped` (e.g. "web-gateway")."""
        return self.users[shipped][0]

    def url(self, shipped: str) -> str:
        name, password = self.users[shipped]
        return f"amqp://{name}:{password}@{HOST}/{self.vhost}"


def _renamed(definitions: dict[str, Any], vhost: str, names: dict[str, str]) -> dict[str, Any]:
    text = json.dumps(definitions)
    loaded: dict[str, Any] = json.loads(text)
    for item in loaded.get("permissions", []) + loaded.get("topic_permissions", []):
        for kind in ("configure", "write", "read"):
            pattern = item[kind]
            for shipped, name in names.items():
                pattern = re.sub(rf"\^{re.escape(shipped)}\\\.", f"^{name}\\\\.", pattern)
            item[kind] = pattern
        item["user"] = names[item["user"]]
        item["vhost"] = vhost
    for key in ("exchanges", "queues", "bindings"):
        for item in loaded.get(key, []):
            item["vhost"] = vhost
    loaded["vhosts"] = [{"name": vhost}]
    return loaded


@contextmanager
def shipped_deployment() -> Iterator[Deployment]:
    """The shipped definitions on a fresh vhost, real users with random passwords; all of it
    deleted afterwards."""
    tag = f"sec{secrets.token_hex(3)}"
    vhost = f"identity-security-{tag}"
    definitions = json.loads(DEFINITIONS.read_text())
    names = {user["name"]: f"{tag}-{user['name']}" for user in definitions["users"]}
    passwords = {shipped: secrets.token_urlsafe(18) for shipped in names}
    loaded = _renamed(definitions, vhost, names)
    for user in loaded["users"]:
        shipped = user["name"]
        user["name"] = names[shipped]
        user["password_hash"] = rabbit_password_hash(passwords[shipped])
        user["hashing_algorithm"] = "rabbit_password_hashing_sha256"
    try:
        _import(loaded)
        _wait_loaded(vhost, set(names.values()), len(loaded["exchanges"]))
        users = {shipped: (names[shipped], passwords[shipped]) for shipped in names}
        yield Deployment(vhost, users)
    finally:
        rabbitmqctl("delete_vhost", vhost)
        for name in names.values():
            rabbitmqctl("delete_user", name)


def _import(definitions: dict[str, Any]) -> None:
    # rabbitmqctl re-runs as the rabbitmq OS user: the file must be readable by it.
    folder = Path(tempfile.mkdtemp(prefix="identity-definitions-"))
    folder.chmod(0o755)
    path = folder / "definitions.json"
    try:
        path.write_text(json.dumps(definitions))
        path.chmod(0o644)
        rabbitmqctl("import_definitions", str(path))
    finally:
        path.unlink(missing_ok=True)
        folder.rmdir()


def _wait_loaded(vhost: str, users: set[str], exchanges: int, timeout: float = 60) -> None:
    """The import runs asynchronously: wait for every user's permissions and the exchanges."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = rabbitmqctl("list_vhosts", "name", "--silent")
        if vhost in listing.split():
            permitted = rabbitmqctl("list_permissions", "-p", vhost, "--silent")
            declared = rabbitmqctl("list_exchanges", "-p", vhost, "name", "--silent")
            got = {line.split("\t")[0] for line in permitted.splitlines()}
            ours = [name for name in declared.split() if name.startswith("identity.")]
            if users <= got and len(ours) >= exchanges:
                return
        time.sleep(0.2)
    raise AssertionError(f"the definitions were not loaded into {vhost} within {timeout}s")
