"""An HTTP function as a raw ASGI 3 application (no framework).

Every request to the CA port other than /invoke and the lifecycle paths
reaches ``app`` as it came; ``POST /invoke`` reaches it as ``POST /invoke``.

Routes:
- ``/stream?chunks=N``: N lines, sent one by one as an async generator
  yields them (``pause`` between two), so the client sees each as it is made.
- ``/upload``: consumes the request body chunk by chunk, never holding it
  whole, and answers its size and SHA-256.
- anything else: JSON echo of the method, path, query, headers, body length
  and SHA-256, and the keys of the lifespan state.

Lifespan: startup puts ``started_at`` into the state (each request's scope
gets a copy); ``lifecycle`` counts what ran. ``init`` is the initializer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

STREAM_DELAY_S = 0.05
MAX_CHUNKS = 1000
# What the lifespan protocol has run in this process.
lifecycle = {"startup": 0, "shutdown": 0}


class Disconnected(Exception):
    """The client went away while the request body was being read."""


async def init(context: Any) -> None:
    """The initializer: runs once in every worker before it serves."""
    context.logger.info("initialized", function=context.function_name)


async def pause(index: int) -> None:
    """Between two streamed chunks: stands for the work that makes the next one."""
    await asyncio.sleep(STREAM_DELAY_S)


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(scope, receive, send)
        return
    if scope["type"] != "http":
        return  # websockets are not served here
    try:
        if scope["path"] == "/stream":
            await stream(scope, send)
        elif scope["path"] == "/upload":
            await upload(receive, send)
        else:
            await echo(scope, receive, send)
    except Disconnected:
        return  # nobody is left to answer


async def lifespan(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            scope["state"]["started_at"] = time.time()
            lifecycle["startup"] += 1
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            lifecycle["shutdown"] += 1
            await send({"type": "lifespan.shutdown.complete"})
            return


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as it arrives."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def digest_body(receive: Receive) -> tuple[int, str]:
    """The request body's size and SHA-256, read as it arrives."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in body_chunks(receive):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


async def send_json(send: Send, status: int, value: Any) -> None:
    body = json.dumps(value).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def echo(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    length, sha256 = await digest_body(receive)
    await send_json(send, 200, {
        "method": scope["method"],
        "path": scope["path"],
        "raw_path": scope["raw_path"].decode("latin-1"),
        "query": scope["query_string"].decode("latin-1"),
        "headers": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in scope["headers"]],
        "body_length": length,
        "body_sha256": sha256,
        "state": sorted(scope.get("state") or {}),
    })


async def numbered_lines(count: int) -> AsyncIterator[bytes]:
    for index in range(count):
        yield f"chunk {index}\n".encode()
        if index + 1 < count:
            await pause(index)


async def stream(scope: dict[str, Any], send: Send) -> None:
    query = parse_qs(scope["query_string"].decode("latin-1"))
    try:
        count = int(query.get("chunks", ["5"])[0])
    except ValueError:
        count = -1
    if not 1 <= count <= MAX_CHUNKS:
        await send_json(send, 400, {"error": f"chunks must be a whole number from 1 to {MAX_CHUNKS}"})
        return
    # No content-length: the response is sent as it is made.
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    async for line in numbered_lines(count):
        await send({"type": "http.response.body", "body": line, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def upload(receive: Receive, send: Send) -> None:
    size, sha256 = await digest_body(receive)
    await send_json(send, 200, {"size": size, "sha256": sha256})
