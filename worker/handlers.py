"""The explicit table from command name to the service method that handles it."""

from __future__ import annotations

from services.identity import IdentityService
from worker.processor import Handler


def handler_table(service: IdentityService) -> dict[str, Handler]:
    return {
        "account.create": service.create_account,
        "account.get": service.get_account,
        "account.update": service.update_account,
        "account.change_password": service.change_password,
        "session.start": service.start_session,
        "session.verify": service.verify_session,
        "session.end": service.end_session,
        "session.end_all": service.end_all_sessions,
    }
