"""Graceful shutdown on SIGTERM (and Ctrl-C): stop taking work, let what was accepted finish, exit 0.

On the first signal the status becomes "Shutting down": `/health*` answer 503 (so a load balancer stops
sending traffic) and every other new request is refused with 503, while the requests in flight run on.
When none is left, or after `--graceful-shutdown-timeout` seconds, whatever still runs is aborted (its
client gets the abort, as with /abort_request) and the server stops. A second signal stops at once.
Sanic's own signal handling is off (`register_sys_signals=False` in serving/main.py): it would close
the listener and cut the in-flight requests short.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from sanic import Sanic

from serving.engine import Engine

logger = logging.getLogger(__name__)

SHUTTING_DOWN = "Shutting down"


def install(app: Sanic, engine: Engine, grace_seconds: float) -> None:
    @app.after_server_start
    async def handle_signals(app: Sanic):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal, app, engine, grace_seconds)


def _on_signal(app: Sanic, engine: Engine, grace_seconds: float) -> None:
    if app.ctx.status == SHUTTING_DOWN:
        logger.warning("second signal: stopping now")
        engine.abort("", abort_all=True, cause="server shutdown")
        app.stop()
        return
    app.ctx.status = SHUTTING_DOWN
    logger.warning("shutting down: %d requests in flight get up to %g s to finish", engine.num_live_requests,
                   grace_seconds)
    app.ctx.drain = asyncio.ensure_future(_drain(app, engine, grace_seconds))


async def _drain(app: Sanic, engine: Engine, grace_seconds: float) -> None:
    deadline = time.monotonic() + grace_seconds
    while engine.num_live_requests and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    if engine.num_live_requests:
        logger.warning("grace period over: aborting %d requests", engine.num_live_requests)
        engine.abort("", abort_all=True, cause="server shutdown")
        while engine.num_live_requests and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.05)  # their handlers send the aborts before the connections close
    app.stop()
