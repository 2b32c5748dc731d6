"""Mail texts: a subject, a plain-text and an HTML part per kind, rendered with Jinja2.

Templates ship in this package (`courier/templates/`): for each kind `<kind>.subject.txt`,
`<kind>.txt` and `<kind>.html`, and the pieces the HTML ones share (`_layout.html`,
`_code.html`). An operator overrides any of them by putting a file of the same name in
`IDENTITY_MAIL_TEMPLATES_DIR`: it is looked up there first, then in the package.

- HTML templates (`.html`) are autoescaped, so a display name such as `<script>` arrives as
  `&lt;script&gt;`; the subject and the plain-text part are not HTML and are not escaped.
- Templates run in Jinja2's sandbox, with undefined names an error: an operator's template is
  code, and a typo must fail at start, not print an empty code. `MailRenderer.check()`
  renders every kind once with sample values; the mail sender calls it before consuming.

What a template sees:

    display_name, email         the recipient, as the account holds them
    code                        the one-time code shown as ABCD-EFGH (None in notices)
    expires_at, expires_at_text the code's expiry (datetime, UTC) and as "2026-12-04 18:30 UTC"
    expires_in_minutes          whole minutes left when the mail is rendered (at least 1)
    occurred_at, occurred_at_text  when the worker acted (the change a notice reports)
    kind, service_name          the message kind, and who the mail is from (the display
                                name of IDENTITY_MAIL_FROM, else its domain)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from jinja2 import (
    BaseLoader,
    ChoiceLoader,
    FileSystemLoader,
    PackageLoader,
    StrictUndefined,
    TemplateError,
    select_autoescape,
)
from jinja2.sandbox import SandboxedEnvironment
from pydantic import SecretStr

from messages.courier import CODE_KINDS, COURIER_KINDS, CourierMessage

PARTS = ("subject.txt", "txt", "html")
SHARED = ("_layout.html", "_code.html")
MAX_SUBJECT_CHARS = 200


class TemplateProblem(Exception):
    """A template is missing, does not compile or does not render; says which file, never the
    values it was rendered with."""


@dataclass(frozen=True, slots=True)
class RenderedMail:
    subject: str
    text: str
    html: str


def template_names(kind: str) -> list[str]:
    """The three templates of `kind`, in PARTS order."""
    return [f"{kind}.{part}" for part in PARTS]


def display_code(code: SecretStr) -> str:
    """The code as a person reads it: upper case, in groups of four (`ABCD-EFGH`)."""
    plain = code.get_secret_value().replace("-", "").upper()
    return "-".join(plain[i : i + 4] for i in range(0, len(plain), 4))


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


class MailRenderer:
    """Renders a CourierMessage into its subject and two parts."""

    def __init__(self, *, service_name: str, override_dir: str | None = None) -> None:
        loaders: list[BaseLoader] = []
        if override_dir is not None:
            loaders.append(FileSystemLoader(override_dir))
        loaders.append(PackageLoader("courier", "templates"))
        self.override_dir = Path(override_dir) if override_dir is not None else None
        self.service_name = service_name
        self._env = SandboxedEnvironment(
            loader=ChoiceLoader(loaders),
            autoescape=select_autoescape(
                enabled_extensions=("html",), default_for_string=False, default=False
            ),
            undefined=StrictUndefined,
            keep_trailing_newline=True,
            auto_reload=False,
        )

    def overridden(self) -> list[str]:
        """The names of the templates that the override directory replaces (for the log)."""
        if self.override_dir is None:
            return []
        names = [*SHARED, *(name for kind in COURIER_KINDS for name in template_names(kind))]
        return [name for name in names if (self.override_dir / name).is_file()]

    def render(self, message: CourierMessage, now: datetime) -> RenderedMail:
        """The mail for `message` at `now`; TemplateProblem if a template fails."""
        context = self._context(message, now)
        subject_name, text_name, html_name = template_names(message.kind)
        subject = " ".join(self._render(subject_name, context).split())
        if not subject:
            raise TemplateProblem(f"{subject_name} rendered an empty subject")
        return RenderedMail(
            subject=subject[:MAX_SUBJECT_CHARS],
            text=self._render(text_name, context),
            html=self._render(html_name, context),
        )

    def check(self, now: datetime | None = None) -> None:
        """Render every kind once with sample values: a broken or missing template (an
        override with a typo) stops the mail sender at start, naming the file."""
        moment = now or datetime.now(UTC)
        for kind in COURIER_KINDS:
            has_code = kind in CODE_KINDS
            sample = CourierMessage(
                message_id="sample",
                kind=kind,
                to="someone@example.com",
                account_id="acct_" + "0" * 26,
                display_name="Sample <Name> & Co",
                code=SecretStr("ABCDEFGH") if has_code else None,
                expires_at=moment + timedelta(minutes=15) if has_code else None,
                occurred_at=moment,
            )
            self.render(sample, moment)

    def _context(self, message: CourierMessage, now: datetime) -> dict[str, Any]:
        expires_in = None
        if message.expires_at is not None:
            seconds = (message.expires_at - now).total_seconds()
            expires_in = max(1, math.ceil(seconds / 60))
        return {
            "kind": message.kind,
            "display_name": message.display_name,
            "email": message.to,
            "code": display_code(message.code) if message.code is not None else None,
            "expires_at": message.expires_at,
            "expires_at_text": _utc_text(message.expires_at) if message.expires_at else None,
            "expires_in_minutes": expires_in,
            "occurred_at": message.occurred_at,
            "occurred_at_text": _utc_text(message.occurred_at),
            "service_name": self.service_name,
        }

    def _render(self, name: str, context: dict[str, Any]) -> str:
        try:
            return self._env.get_template(name).render(context)
        except TemplateError as exc:
            # Jinja's own messages name templates, lines and variables, not their values.
            detail = f"{type(exc).__name__}: {exc.message or ''}".rstrip(": ")
            raise TemplateProblem(f"{name}: {detail}") from None
        except Exception as exc:
            # Anything else a template's expression raised may quote what it was given.
            raise TemplateProblem(f"{name}: {type(exc).__name__}") from None
