"""Baselines A and B: a raw ASGI app running the bench handler in-process.

No framework: POST /invoke reads the body, calls ``handler(event, context)``
from ``bench/handlers/trivial.py`` with a minimal context (the same attribute
names as the supervisor's), and answers its result as JSON (orjson, like the
supervisor's worker host). Anything else is 404.

    uvicorn baseline_app:app --app-dir bench --http httptools --loop uvloop
    gunicorn --chdir bench -w 2 -k baseline_app.Worker baseline_app:app
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any

import orjson

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "handlers"))

from trivial import handler  # noqa: E402


class _Context:
    """The least a handler may use: FC's attribute names, nothing lazy."""

    __slots__ = ("request_id", "function_name", "memory_limit_mb", "timeout_s", "headers",
                 "credentials", "_deadline")

    def __init__(self, request_id: str, headers: dict[str, str]) -> None:
        self.request_id = request_id
        self.function_name = "trivial"
        self.memory_limit_mb = 256
        self.timeout_s = 60.0
        self.headers = headers
        self.credentials = None
        self._deadline = time.monotonic() + 60.0

    def remaining_time_ms(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


_NOT_FOUND = b'{"errorType":"NotFound","errorMessage":"only POST /invoke"}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["method"] != "POST" or scope["path"] != "/invoke":
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": _NOT_FOUND})
        return
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    request_id = headers.get("x-fc-request-id") or uuid.uuid4().hex
    result = handler(body, _Context(request_id, headers))
    payload = orjson.dumps(result)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"x-fc-request-id", request_id.encode())]})
    await send({"type": "http.response.body", "body": payload})


try:  # only gunicorn (target B) needs this; uvicorn.workers warns that it is deprecated
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from uvicorn.workers import UvicornWorker

    class Worker(UvicornWorker):
        """Same server settings as target A: httptools + uvloop, no access log."""

        CONFIG_KWARGS = {"loop": "uvloop", "http": "httptools", "access_log": False}
except ImportError:  # pragma: no cover - gunicorn missing
    pass
