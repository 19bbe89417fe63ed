"""An ASGI app that writes down every request it gets (one JSON line each in
``$RECORD_DIR/<pid>``), so a test can check what reached a worker."""

from __future__ import annotations

import json
import os
from typing import Any

_out: Any = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _out
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if _out is None:
        _out = open(os.path.join(os.environ["RECORD_DIR"], str(os.getpid())), "a", buffering=1)  # noqa: SIM115
    _out.write(json.dumps({"method": scope["method"], "path": scope["path"], "query": scope["query_string"].hex(),
                           "body": body.hex(), "headers": [[k.hex(), v.hex()] for k, v in scope["headers"]]}) + "\n")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"recorded"})
