"""The ASGI lifespan protocol for an app hosted by ``http.HttpAppHost``.

Run once per worker: ``startup`` before the worker takes requests,
``shutdown`` (bounded) when it exits. An app that does not speak the
protocol is served without it, as uvicorn's ``lifespan = "auto"`` does.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from worker.host import StartupError
from worker.output import log_error
from worker.python.host import cancelled_from_outside

Message = dict[str, Any]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Lifespan:
    """An ASGI app's lifespan protocol, run as one task from start to close.

    Like uvicorn's ``lifespan = "auto"``: an app that raises (or returns)
    before it takes ``lifespan.startup``, or that answers the lifespan scope
    with a message of another protocol, does not support lifespan and is
    served without it. One that fails after taking ``lifespan.startup`` (or
    says ``lifespan.startup.failed``) failed to start.
    """

    def __init__(self, app: ASGIApp, state: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        self._app = app
        self._state = state
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        # None when it completed, else the app's failure message.
        self._started: asyncio.Future[str | None] = loop.create_future()
        self._stopped: asyncio.Future[str | None] = loop.create_future()
        self._task: asyncio.Task[None] | None = None
        self._listening = False  # the app took lifespan.startup
        self._refused = False  # the app sent a message that is not lifespan's
        self.error: BaseException | None = None  # what the app raised, if it did

    async def startup(self) -> bool:
        """Runs ``startup``; False when the app does not speak lifespan.

        Raises ``StartupError`` on ``lifespan.startup.failed`` and the app's
        own exception when it fails while starting up.
        """
        self._inbox.put_nowait({"type": "lifespan.startup"})
        task = self._task = asyncio.ensure_future(self._main())
        await asyncio.wait((task, self._started), return_when=asyncio.FIRST_COMPLETED)
        if self._started.done():
            failure = self._started.result()
            if failure is None:
                return True
            task.cancel()
            await asyncio.wait((task,), timeout=1.0)
            raise StartupError("LifespanStartupFailed",
                               f"the application's lifespan startup failed: {failure or '(no message)'}")
        if self.error is not None and self._listening and not self._refused:
            raise self.error
        return False

    async def shutdown(self, timeout: float) -> None:
        """Runs ``shutdown`` for at most ``timeout`` seconds, then ends the task."""
        task = self._task
        if task is None or task.done():
            return
        self._inbox.put_nowait({"type": "lifespan.shutdown"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await asyncio.wait((task, self._stopped), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._stopped.done():
            failure = self._stopped.result()
            if failure is not None:
                log_error(f"the application's lifespan shutdown failed: {failure or '(no message)'}")
            # Let the app's coroutine return on its own, within what is left of the budget.
            await asyncio.wait((task,), timeout=max(0.0, deadline - loop.time()))
        elif not task.done():
            log_error(f"the application's lifespan shutdown did not finish within {timeout:g}s; cancelled it")
        if self.error is not None:
            sys.stderr.write("".join(traceback.format_exception(self.error)))
        if not task.done():
            task.cancel()
            await asyncio.wait((task,), timeout=1.0)  # an app that swallows cancellation is left behind

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self._state}
        try:
            await self._app(scope, self._receive, self._send)
        except BaseException as exc:  # kept for startup() and shutdown() to judge (SystemExit too)
            if cancelled_from_outside(exc):
                raise
            self.error = exc

    async def _receive(self) -> Message:
        message = await self._inbox.get()
        self._listening = True
        return message

    async def _send(self, message: Message) -> None:
        kind = message.get("type")
        outcome: asyncio.Future[str | None]
        if kind in ("lifespan.startup.complete", "lifespan.startup.failed"):
            outcome = self._started
        elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            outcome = self._stopped
        else:
            self._refused = True
            raise RuntimeError(f"unexpected ASGI message {kind!r} in the lifespan scope")
        if outcome.done():
            raise RuntimeError(f"ASGI message {kind!r} sent twice")
        outcome.set_result(None if str(kind).endswith("complete") else str(message.get("message", "")))
