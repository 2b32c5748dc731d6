"""The one table from a command to the service method that runs it, keyed by the type of the
command's payload (its name lives in messages.commands). A new command adds one line here."""

from __future__ import annotations

from messages import (
    ChangePassword,
    CompleteRecovery,
    ConfirmVerification,
    CreateAccount,
    DeleteAccount,
    DisableAccount,
    EnableAccount,
    EndAllSessions,
    EndSession,
    GetAccount,
    GetJwks,
    GrantRole,
    ListSessions,
    RefreshSession,
    RequestRecovery,
    RequestVerification,
    RevokeRole,
    RevokeSession,
    StartSession,
    UpdateAccount,
    VerifySession,
)
from services.identity import IdentityService
from worker.processor import Handlers


def handler_table(service: IdentityService) -> Handlers:
    return {
        CreateAccount: service.create_account,
        GetAccount: service.get_account,
        UpdateAccount: service.update_account,
        ChangePassword: service.change_password,
        StartSession: service.start_session,
        VerifySession: service.verify_session,
        EndSession: service.end_session,
        EndAllSessions: service.end_all_sessions,
        RequestRecovery: service.flows.request_recovery,
        CompleteRecovery: service.flows.complete_recovery,
        RequestVerification: service.flows.request_verification,
        ConfirmVerification: service.flows.confirm_verification,
        DisableAccount: service.lifecycle.disable_account,
        EnableAccount: service.lifecycle.enable_account,
        DeleteAccount: service.lifecycle.delete_account,
        ListSessions: service.sessions_admin.list_sessions,
        RevokeSession: service.sessions_admin.revoke_session,
        RefreshSession: service.tokens.refresh_session,
        GetJwks: service.tokens.jwks,
        GrantRole: service.roles.grant_role,
        RevokeRole: service.roles.revoke_role,
    }
