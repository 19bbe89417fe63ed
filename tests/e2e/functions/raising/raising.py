"""Handlers, hooks and HTTP apps that raise what ``Exception`` does not cover
(tests/e2e/test_user_exceptions.py).

An event (or an HTTP app's query string, or the JSON body of ``/invoke``)
says what to do:

- ``{"raise": NAME}`` raises the exception class ``NAME`` (a builtin, or
  ``CancelledError`` for ``asyncio.CancelledError``);
- ``{"hold": DIR}`` writes ``DIR/entered-<request id>``, then waits (at most
  20 s) until ``DIR/release`` exists: a neighbour that is certainly in flight
  in the same worker while another invocation raises;
- anything else answers ``{"pid": <the worker's pid>}``.

The hooks raise the class named by the environment variable ``HOOK_RAISE``
(when set), after printing a line naming their request.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

HOLD_LIMIT_S = 20.0


def exception(name: str) -> BaseException:
    cls = asyncio.CancelledError if name == "CancelledError" else getattr(builtins, name)
    assert isinstance(cls, type) and issubclass(cls, BaseException), name
    return cls(f"raised on purpose: {name}")


def _entered(req: dict[str, Any], request_id: str) -> Path:
    hold = Path(req["hold"])
    (hold / f"entered-{request_id}").write_text(str(os.getpid()))
    return hold / "release"


def act(req: dict[str, Any], request_id: str) -> dict[str, Any]:
    if "raise" in req:
        raise exception(req["raise"])
    if "hold" in req:
        release, deadline = _entered(req, request_id), time.monotonic() + HOLD_LIMIT_S
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    return {"pid": os.getpid()}


async def async_act(req: dict[str, Any], request_id: str) -> dict[str, Any]:
    await asyncio.sleep(0)
    if "raise" in req:
        raise exception(req["raise"])
    if "hold" in req:
        release, deadline = _entered(req, request_id), time.monotonic() + HOLD_LIMIT_S
        while not release.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    return {"pid": os.getpid()}


def handler(event: bytes, context: Any) -> Any:
    return act(json.loads(event) if event else {}, context.request_id)


async def async_handler(event: bytes, context: Any) -> Any:
    return await async_act(json.loads(event) if event else {}, context.request_id)


def _hook(context: Any) -> None:
    print(f"hook {context.request_id} in {os.getpid()}")
    name = os.environ.get("HOOK_RAISE")
    if name:
        raise exception(name)


def init(context: Any) -> None:
    _hook(context)


def pre_freeze(context: Any) -> None:
    _hook(context)


def pre_stop(context: Any) -> None:
    _hook(context)


async def async_pre_freeze(context: Any) -> None:
    await asyncio.sleep(0)
    _hook(context)


async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """An ASGI app without lifespan (it raises for any other scope, as many apps do)."""
    if scope["type"] != "http":
        raise RuntimeError("no lifespan here")
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    req = json.loads(body) if scope["path"] == "/invoke" and body else dict(parse_qsl(scope["query_string"].decode()))
    rid = dict(scope["headers"]).get(b"x-fc-request-id", b"-").decode()
    answer = json.dumps(await async_act(req, rid)).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": answer})


def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = environ["wsgi.input"].read()
    req = json.loads(body) if environ["PATH_INFO"] == "/invoke" and body else dict(parse_qsl(environ["QUERY_STRING"]))
    answer = json.dumps(act(req, environ.get("HTTP_X_FC_REQUEST_ID", "-"))).encode()
    start_response("200 OK", [("content-type", "application/json")])
    return [answer]
