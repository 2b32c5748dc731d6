"""Run one mail sender process until it is told to stop."""

from __future__ import annotations

import asyncio
import logging
import signal

import aiormq.exceptions

from courier.app import Courier
from courier.render import TemplateProblem
from courier.settings import CourierSettings
from worker.logs import redact_text

log = logging.getLogger("identity.courier")

EXIT_NO_BROKER = 1
EXIT_BAD_TEMPLATES = 2
# What failing to reach the broker at start looks like from aio-pika (a ConnectionError
# subclass, or the protocol's own errors).
BROKER_ERRORS = (ConnectionError, OSError, aiormq.exceptions.AMQPError)


async def run_courier(settings: CourierSettings) -> int:
    """Start (templates checked, broker connected, queue found), then send until SIGTERM or
    SIGINT; the exit status. A signal during start-up (waiting for the worker to declare the
    queue, say) abandons it at once: nothing is in flight yet."""
    starting = asyncio.current_task()
    assert starting is not None
    stopped_by: list[int] = []
    courier = Courier(settings)
    started = False

    def on_signal(signum: int) -> None:
        stopped_by.append(signum)
        if started:
            courier.request_stop()
        else:
            starting.cancel()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await courier.start()
    except TemplateProblem as problem:
        log.error("mail templates do not render", extra={"problem": str(problem)})
        await courier.stop()
        return EXIT_BAD_TEMPLATES
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        log.info("stopped while starting", extra={"signal": stopped_by[0]})
        await courier.stop()
        return 128 + stopped_by[0]
    except BROKER_ERRORS as exc:
        # aiormq may quote the URL: its password is masked.
        reason = redact_text(str(exc)) or type(exc).__name__
        log.error("broker unreachable", extra={"error": reason})
        await courier.stop()
        return EXIT_NO_BROKER
    except BaseException:
        await courier.stop()
        raise
    started = True
    if stopped_by:
        courier.request_stop()
    await courier.serve()  # replaces the handlers with its own: drain, then exit
    return 0
