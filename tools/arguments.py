"""Argument types shared by the root parser and `send`'s own parser.

A module of its own, without aio-pika: the root parser imports it for every command, and the
tools' broker code loads only when a tool that needs it runs.
"""

from __future__ import annotations

import argparse


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above zero: {text!r}")
    return value
