"""`identity-worker`: run the worker, migrate the database, and the tools around them.

identity-worker [run] [--no-migrate]   consume commands (the default)
identity-worker migrate                create the database if needed, apply migrations
identity-worker keys new               print a new signing key for IDENTITY_SIGNING_KEYS
identity-worker asyncapi               print the AsyncAPI document of contract v1
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence

from worker.settings import Settings, SettingsError, load_settings


def _settings_or_exit() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"identity-worker: bad settings: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    from worker.logs import configure_logging
    from worker.main import run_worker

    configure_logging(settings.log_level)
    if settings.use_uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(
        run_worker(settings, migrate_first=settings.migrate_on_start and not args.no_migrate)
    )
    return 0


def _migrate(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    from stores.migrate import migrate

    applied = asyncio.run(migrate(settings.database_url.get_secret_value()))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    from services.tokens import format_signing_key, new_signing_key

    print(format_signing_key(new_signing_key()))
    return 0


def _asyncapi(args: argparse.Namespace) -> int:
    from messages.asyncapi import render_asyncapi

    sys.stdout.write(render_asyncapi())
    return 0


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
    sub.add_parser("asyncapi", help="print the AsyncAPI document").set_defaults(func=_asyncapi)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:  # no subcommand: run
        args = parser.parse_args(["run", *(argv or sys.argv[1:])])
        func = args.func
    return func(args)


if __name__ == "__main__":
    raise SystemExit(main())
