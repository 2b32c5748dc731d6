"""The in-memory store: the ports in dicts, for tests without a database. It passes the same
contract suite as the PostgreSQL store (tests/contract)."""

from stores.memory.store import MemoryIdentityStore

__all__ = ["MemoryIdentityStore"]
