"""The PostgreSQL store: the ports on an asyncpg pool, its SQL, its driver edge, and the
schema migrations it needs.

    store.py      PostgresIdentityStore: reads outside a transaction, claims, purge, ping
    unit.py       PostgresUnitOfWork: one connection, one transaction
    sql.py        every statement, as constants
    edge.py       asyncpg's exceptions become store errors; per-operation timing
    batching.py   KeyedBatcher: concurrent look-ups by key share one query
    migrate.py    numbered files in migrations/, applied once under an advisory lock
"""

from stores.postgres.migrate import migrate
from stores.postgres.store import PostgresIdentityStore

__all__ = ["PostgresIdentityStore", "migrate"]
