"""HTTP-trigger test apps: the same routes as a raw ASGI app (``app``) and a
WSGI app (``wsgi_app``). Used by tests/e2e/test_runtimes.py.

Routes: /echo (method, path, query, headers, body as hex), /stream?gate=PATH
(a first chunk, then the rest only once PATH exists), /upload (the body read
chunk by chunk: size, sha256, chunks), /boom (raises), /sleep?s=N, /crash
(the process dies mid-request), /pid, and POST /invoke (an event call: the
body reversed). The ASGI app also has /head?case=NAME (responses whose head
or length is wrong, see BAD_HEADS) and /big?mib=N (N MiB streamed in 64 KiB
chunks).
"""

import asyncio
import hashlib
import json
import os
import time
from urllib.parse import parse_qs

GATE_WAIT_S = 20.0
# /head?case=NAME: (status, headers, body chunks) that are not valid HTTP, or
# that the front must fix (a forged request id, a length on a 204).
BAD_HEADS = {
    "status": (1000, [], [b"x"]),
    "informational": (103, [], [b"x"]),
    "name": (200, [(b"bad name", b"v")], [b"x"]),
    "value": (200, [(b"x-v", b"a\r\nset-cookie: injected=1")], [b"x"]),
    "length": (200, [(b"content-length", b"ten")], [b"x"]),
    "two-lengths": (200, [(b"content-length", b"1"), (b"content-length", b"2")], [b"x"]),
    "non-latin-1": (200, [("x-name", "\u20ac")], [b"x"]),
    "longer": (200, [(b"content-length", b"3")], [b"abc", b"def"]),
    "shorter": (200, [(b"content-length", b"10")], [b"abc"]),
    "no-content": (204, [(b"content-length", b"3")], [b"abc"]),
    "request-id": (200, [(b"x-fc-request-id", b"forged")], [b"ok"]),
}


def _query(raw: bytes) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(raw.decode("latin-1")).items()}


def _echo(method, path, raw_path, query, headers, body):
    return {"method": method, "path": path, "raw_path": raw_path, "query": query,
            "headers": headers, "body_hex": body.hex(), "pid": os.getpid()}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    query = _query(scope["query_string"])

    async def respond(status, body, content_type=b"application/json"):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"x-app", b"asgi")]})
        await send({"type": "http.response.body", "body": body})

    async def read_all():
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                return b"".join(chunks), len(chunks)

    if path == "/upload":
        digest, size, chunks = hashlib.sha256(), 0, 0
        while True:
            message = await receive()
            data = message.get("body", b"")
            digest.update(data)
            size += len(data)
            chunks += 1
            if not message.get("more_body"):
                break
        await respond(200, json.dumps({"size": size, "sha256": digest.hexdigest(), "chunks": chunks}).encode())
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
        deadline = time.monotonic() + GATE_WAIT_S
        while not os.path.exists(query["gate"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"second\n", "more_body": False})
    elif path == "/boom":
        raise ValueError("boom from the asgi app")
    elif path == "/sleep":
        await asyncio.sleep(float(query.get("s", "1")))
        await respond(200, b"slept", b"text/plain")
    elif path == "/crash":
        os._exit(3)
    elif path == "/pid":
        await respond(200, str(os.getpid()).encode(), b"text/plain")
    elif path == "/head":
        status, headers, chunks = BAD_HEADS[query["case"]]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for i, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})
    elif path == "/big":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"b" * 65536
        for _ in range(int(query["mib"]) * 16):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    elif path == "/invoke":
        body, _ = await read_all()
        await respond(200, body[::-1], b"application/octet-stream")
    else:
        body, _ = await read_all()
        headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
        echo = _echo(scope["method"], path, scope["raw_path"].decode("latin-1"), scope["query_string"].decode(),
                     headers, body)
        await respond(200, json.dumps(echo).encode())


def wsgi_app(environ, start_response):
    path = environ["PATH_INFO"].encode("latin-1").decode("utf-8")  # PEP 3333: bytes as latin-1
    query = _query(environ.get("QUERY_STRING", "").encode("latin-1"))
    stream = environ["wsgi.input"]

    def respond(status, body, content_type="application/json"):
        start_response(status, [("Content-Type", content_type), ("X-App", "wsgi")])
        return [body]

    if path == "/upload":
        digest, size, chunks = hashlib.sha256(), 0, 0
        while True:
            data = stream.read(65536)
            if not data:
                break
            digest.update(data)
            size += len(data)
            chunks += 1
        return respond("200 OK", json.dumps({"size": size, "sha256": digest.hexdigest(), "chunks": chunks}).encode())
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])

        def chunks():
            yield b"first\n"
            deadline = time.monotonic() + GATE_WAIT_S
            while not os.path.exists(query["gate"]) and time.monotonic() < deadline:
                time.sleep(0.01)
            yield b"second\n"
        return chunks()
    if path == "/boom":
        raise ValueError("boom from the wsgi app")
    if path == "/sleep":
        time.sleep(float(query.get("s", "1")))
        return respond("200 OK", b"slept", "text/plain")
    if path == "/crash":
        os._exit(3)
    if path == "/pid":
        return respond("200 OK", str(os.getpid()).encode(), "text/plain")
    body = stream.read()
    if path == "/invoke":
        return respond("200 OK", body[::-1], "application/octet-stream")
    headers = [[k[5:].replace("_", "-").lower(), v] for k, v in environ.items() if k.startswith("HTTP_")]
    headers += [[k.replace("_", "-").lower(), environ[k]] for k in ("CONTENT_TYPE", "CONTENT_LENGTH") if environ.get(k)]
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or path
    echo = _echo(environ["REQUEST_METHOD"], path, raw.split("?")[0], environ.get("QUERY_STRING", ""), headers, body)
    return respond("200 OK", json.dumps(echo).encode())
