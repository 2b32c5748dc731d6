"""The PostgreSQL store: the ports on an asyncpg pool, its SQL, its driver edge, and the
schema migrations it needs.

    store.py      PostgresIdentityStore: reads outside a transaction, claims, purge, ping
    unit.py       PostgresUnitOfWork: one connection, one transaction
    sql.py        every statement, as constants
    edge.py       asyncpg's exceptions become store errors; per-operation timing
    batching.py   KeyedBatcher: concurrent look-ups by key share one query
    migrate.py    numbered files in migrations/, applied once under an advisory lock
    emails.py     accounts moved to a changed rule's canonical email, collisions reported
"""

from stores.postgres.emails import EmailReport, recanonicalise_emails
from stores.postgres.migrate import migrate
from stores.postgres.store import PostgresIdentityStore

__all__ = ["EmailReport", "PostgresIdentityStore", "migrate", "recanonicalise_emails"]
