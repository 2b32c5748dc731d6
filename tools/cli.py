"""`identity-worker`: run the worker, migrate the database, and the tools around them.

identity-worker [run] [--no-migrate]   consume commands (the default)
identity-worker migrate                create the database if needed, apply migrations, move
                                       accounts to a changed canonical email (exit 1: some
                                       could not be, see the runbook)
identity-worker keys new               print a new signing key for IDENTITY_SIGNING_KEYS
identity-worker keys hmac              print a new key for IDENTITY_HMAC_KEY
identity-worker keys jwt               print a new access-token key for IDENTITY_JWT_KEYS
identity-worker asyncapi               print the AsyncAPI document of contract v1
identity-worker send COMMAND --FIELD V send one command, print its reply as JSON
identity-worker demo                   run a sign-up/sign-in story against a running worker
identity-worker dead list|republish    inspect or re-send the dead letters in identity.dead
identity-worker courier                send the mails of identity.courier over SMTP
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tools.arguments import positive_seconds
from worker.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from courier.settings import CourierSettings


def _settings_or_exit(*, keys_needed: bool = True) -> Settings:
    try:
        return load_settings(keys_needed=keys_needed)
    except SettingsError as exc:
        print(f"identity-worker: bad settings: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    from worker.audit import configure_audit
    from worker.logs import configure_logging
    from worker.main import run_worker

    configure_logging(settings.log_level)
    try:
        configure_audit(settings.audit_log)
    except OSError as exc:
        print(f"identity-worker: bad settings: IDENTITY_AUDIT_LOG: {exc}", file=sys.stderr)
        return 2
    if not _tracing_configured(settings, "identity-worker"):
        return 2
    if settings.use_uvloop:
        import uvloop

        uvloop.install()
    try:
        return asyncio.run(
            run_worker(settings, migrate_first=settings.migrate_on_start and not args.no_migrate)
        )
    except SettingsError as exc:  # found at start, e.g. a database role with too much power
        print(f"identity-worker: bad settings: {exc}", file=sys.stderr)
        return 2


def _courier(args: argparse.Namespace) -> int:
    from courier.settings import load_courier_settings

    try:
        settings = load_courier_settings()
    except SettingsError as exc:
        print(f"identity-worker courier: bad settings: {exc}", file=sys.stderr)
        return 2
    from courier.main import run_courier
    from worker.logs import configure_logging

    configure_logging(settings.log_level)
    if not _tracing_configured(settings, "identity-courier"):
        return 2
    if settings.use_uvloop:
        import uvloop

        uvloop.install()
    return asyncio.run(run_courier(settings))


def _tracing_configured(settings: Settings | CourierSettings, service_name: str) -> bool:
    """Install the span exporter when `IDENTITY_OTLP_TRACES_URL` is set; False (said on
    stderr) when it cannot."""
    url = settings.otlp_traces_url
    if not url:
        return True
    from worker.tracing import TracingUnavailable, configure

    try:
        configure(url, service_name, settings.traces_sample_ratio)
    except TracingUnavailable as exc:
        print(f"{service_name}: bad settings: {exc}", file=sys.stderr)
        return False
    return True


def _migrate(args: argparse.Namespace) -> int:
    # A migration job needs the database URLs and the mode, never the worker's keys.
    settings = _settings_or_exit(keys_needed=False)
    from worker.main import migrate_database

    applied, emails = asyncio.run(
        migrate_database(
            settings.migration_dsn, worker_role=settings.worker_role, dev_mode=settings.dev_mode
        )
    )
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    print(f"accounts moved to their new canonical email: {len(emails.moved)}")
    for ids in emails.collisions:
        print("one canonical email, several accounts (not moved): " + ", ".join(ids))
    if emails.refused:
        print("stored email the rule refuses (not moved): " + ", ".join(emails.refused))
    return 1 if emails.collisions or emails.refused else 0


def _keys_new(args: argparse.Namespace) -> int:
    from services.tokens import format_signing_key, new_signing_key

    print(format_signing_key(new_signing_key()))
    return 0


def _keys_hmac(args: argparse.Namespace) -> int:
    from services.keys import new_hmac_key

    print(new_hmac_key())
    return 0


def _keys_jwt(args: argparse.Namespace) -> int:
    from services.access_tokens import format_jwt_key, new_jwt_key

    print(format_jwt_key(new_jwt_key()))
    return 0


def _asyncapi(args: argparse.Namespace) -> int:
    from messages.asyncapi import render_asyncapi

    sys.stdout.write(render_asyncapi())
    return 0


def _send(args: argparse.Namespace) -> int:
    from tools.send import run_send

    return run_send(args)


def _demo(args: argparse.Namespace) -> int:
    from tools.demo import run_demo

    return run_demo(args)


def _dead(args: argparse.Namespace) -> int:
    from tools.dead import run_dead

    return run_dead(args)


def _add_tool_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The operator's tools; their modules (and `messages`, `aio_pika`) load only when used."""
    url_help = "broker URL (default: IDENTITY_AMQP_URL)"
    send = sub.add_parser(
        "send",
        help="send one command and print its reply",
        description="Send COMMAND with its payload fields as flags (`send account.create --help`"
        " lists them); the reply is printed as JSON. Exit 0 ok, 1 error reply, 2 bad usage,"
        " 3 no reply (send again with the same --idempotency-key: it is safe).",
    )
    send.add_argument("command", metavar="COMMAND", help="e.g. account.create, session.verify")
    # The flags depend on COMMAND's payload model, so they are parsed by tools.send.
    send.add_argument("fields", nargs=argparse.REMAINDER, help="--field value ... (see above)")
    send.set_defaults(func=_send)
    demo = sub.add_parser("demo", help="run a sign-up/sign-in story against a running worker")
    demo.add_argument("--amqp-url", help=url_help)
    demo.add_argument(
        "--timeout", type=positive_seconds, default=15.0, help="seconds per step (15)"
    )
    demo.set_defaults(func=_demo)
    dead = sub.add_parser("dead", help="dead letters in identity.dead").add_subparsers(
        dest="dead_command"
    )
    dead.required = True
    listing = dead.add_parser("list", help="print dead letters, leaving them in the queue")
    republish = dead.add_parser(
        "republish", help="send complete dead-lettered commands again, removing them"
    )
    for parser in (listing, republish):
        parser.add_argument("--amqp-url", help=url_help)
        parser.add_argument("--limit", type=int, default=100, help="at most N (100)")
        parser.add_argument("--reason", help="only dead letters with this reason")
        parser.set_defaults(func=_dead)
    republish.add_argument("--yes", action="store_true", help="do it (default: a dry run)")
    republish.add_argument(
        "--timeout", type=positive_seconds, default=10.0, help="seconds per reply (10)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="identity-worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="consume commands (default)")
    run.add_argument("--no-migrate", action="store_true", help="do not apply migrations first")
    run.set_defaults(func=_run)
    sub.add_parser("migrate", help="create the database and apply migrations").set_defaults(
        func=_migrate
    )
    keys = sub.add_parser("keys", help="signing keys").add_subparsers(dest="keys_command")
    keys.required = True
    keys.add_parser("new", help="print a new signing key").set_defaults(func=_keys_new)
    keys.add_parser("hmac", help="print a new HMAC key").set_defaults(func=_keys_hmac)
    keys.add_parser("jwt", help="print a new access-token (Ed25519) key").set_defaults(
        func=_keys_jwt
    )
    sub.add_parser("asyncapi", help="print the AsyncAPI document").set_defaults(func=_asyncapi)
    sub.add_parser(
        "courier",
        help="send the mails of identity.courier over SMTP (the mail sender)",
        description="Consume identity.courier and send each message as a mail over SMTP"
        " (IDENTITY_SMTP_URL, IDENTITY_MAIL_FROM; see docs/runbook.md). Exit 2 on bad settings"
        " or templates, 1 when the broker cannot be reached.",
    ).set_defaults(func=_courier)
    _add_tool_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or (words[0].startswith("-") and words[0] not in ("-h", "--help")):
        words = ["run", *words]  # no subcommand: run, with run's flags (`--no-migrate`)
    args = parser.parse_args(words)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:  # a group without its subcommand, e.g. `identity-worker dead`
        parser.error(f"{words[0]}: a subcommand is required (see --help)")
    return func(args)


if __name__ == "__main__":
    raise SystemExit(main())
