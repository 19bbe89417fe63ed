"""An HTTP function as a plain WSGI application (no framework).

Every request to the CA port other than /invoke and the lifecycle paths
reaches ``app`` as it came; ``POST /invoke`` reaches it as ``POST /invoke``.
It runs in a pool of ``concurrency`` threads.

Routes:
- ``/stream?chunks=N``: N lines from a generator (``pause`` between two),
  each sent to the client as it is yielded.
- ``/upload``: reads ``wsgi.input`` chunk by chunk, never holding the body
  whole, and answers its size and SHA-256.
- anything else: JSON echo of the method, path, query, headers, body length
  and SHA-256.

``init`` is the initializer (a plain function: it runs in a thread).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

StartResponse = Callable[..., Any]

STREAM_DELAY_S = 0.05
MAX_CHUNKS = 1000
READ_SIZE = 64 * 1024


def init(context: Any) -> None:
    """The initializer: runs once in every worker before it serves."""
    context.logger.info("initialized", function=context.function_name)


def pause(index: int) -> None:
    """Between two streamed chunks: stands for the work that makes the next one."""
    time.sleep(STREAM_DELAY_S)


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/stream":
        return stream(environ, start_response)
    if path == "/upload":
        return upload(environ, start_response)
    return echo(environ, start_response)


def body_chunks(environ: dict[str, Any]) -> Iterator[bytes]:
    """The request body as it arrives: up to CONTENT_LENGTH when it is given
    (PEP 3333: never read past it), else until the input ends (chunked)."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH", "")
    remaining = int(length) if length.isdigit() else None
    while remaining is None or remaining > 0:
        chunk = stream.read(READ_SIZE if remaining is None else min(READ_SIZE, remaining))
        if not chunk:
            return
        if remaining is not None:
            remaining -= len(chunk)
        yield chunk


def digest_body(environ: dict[str, Any]) -> tuple[int, str]:
    """The request body's size and SHA-256, read as it arrives."""
    digest = hashlib.sha256()
    size = 0
    for chunk in body_chunks(environ):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def json_response(start_response: StartResponse, status: str, value: Any) -> list[bytes]:
    body = json.dumps(value).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def request_headers(environ: dict[str, Any]) -> list[list[str]]:
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append([key[5:].replace("_", "-").lower(), value])
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            headers.append([key.replace("_", "-").lower(), value])
    return headers


def echo(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
    length, sha256 = digest_body(environ)
    return json_response(start_response, "200 OK", {
        "method": environ["REQUEST_METHOD"],
        # WSGI strings are bytes as latin-1: the path's UTF-8 is decoded here.
        "path": environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace"),
        "query": environ.get("QUERY_STRING", ""),
        "headers": request_headers(environ),
        "body_length": length,
        "body_sha256": sha256,
    })


def numbered_lines(count: int) -> Iterator[bytes]:
    for index in range(count):
        yield f"chunk {index}\n".encode()
        if index + 1 < count:
            pause(index)


def stream(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    try:
        count = int(query.get("chunks", ["5"])[0])
    except ValueError:
        count = -1
    if not 1 <= count <= MAX_CHUNKS:
        return json_response(start_response, "400 Bad Request",
                             {"error": f"chunks must be a whole number from 1 to {MAX_CHUNKS}"})
    # No content-length: the response is sent as it is made.
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
    return numbered_lines(count)


def upload(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
    size, sha256 = digest_body(environ)
    return json_response(start_response, "200 OK", {"size": size, "sha256": sha256})
