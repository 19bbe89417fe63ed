"""A function that goes after another function's pull-runtime API
(tests/e2e/test_pull_private.py).

It is told the port (the test reads it from the runtime's environment: the
thief is given everything but a way in) and tries, over plain HTTP on
127.0.0.1:

- ``{"steal": {...}}``: long-poll the next event, and answer one it gets with
  a forged result (``api`` "lambda" or "scf"; ``mark`` is a file written once
  the poll is sent, so the test knows it is waiting in line);
- ``{"forge": {...}}``: post a forged result for the invocation ``request_id``
  in flight, again and again until one is accepted or ``for_s`` passes.

It answers what happened: each request's status (or the error that ended it)
and the event it got, if any.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path
from typing import Any

FORGED = b'{"forged": true}'
LAMBDA = "/2018-06-01/runtime"


def _request(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             timeout: float = 5.0, mark: str | None = None) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        if mark:
            Path(mark).write_text("polling")
        response = conn.getresponse()
        return {"status": response.status, "headers": {k.lower(): v for k, v in response.getheaders()},
                "body": response.read().decode(errors="replace")}
    except (OSError, http.client.HTTPException) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        if mark and not Path(mark).exists():
            Path(mark).write_text("failed before polling")
        conn.close()


def steal(port: int, api: str, mark: str, timeout: float) -> dict[str, Any]:
    path = f"{LAMBDA}/invocation/next" if api == "lambda" else "/runtime/invocation/next"
    got = _request(port, "GET", path, timeout=timeout, mark=mark)
    out: dict[str, Any] = {"poll": got}
    if got.get("status") == 200:  # an event: answer it with a forged result
        if api == "lambda":
            request_id = got["headers"].get("lambda-runtime-aws-request-id", "")
            out["answer"] = _request(port, "POST", f"{LAMBDA}/invocation/{request_id}/response", FORGED)
        else:
            out["answer"] = _request(port, "POST", "/runtime/invocation/response", FORGED,
                                     {"request_id": got["headers"].get("request_id", "")})
    return out


def forge(port: int, api: str, request_id: str, for_s: float) -> dict[str, Any]:
    tries = []
    deadline = time.monotonic() + for_s
    while time.monotonic() < deadline:
        if api == "lambda":
            got = _request(port, "POST", f"{LAMBDA}/invocation/{request_id}/response", FORGED, timeout=2.0)
        else:
            got = _request(port, "POST", "/runtime/invocation/response", FORGED, {"request_id": request_id},
                           timeout=2.0)
        tries.append(got.get("status") or got.get("error"))
        if isinstance(got.get("status"), int) and got["status"] < 300:
            return {"accepted": got, "tries": tries}
        time.sleep(0.05)
    return {"accepted": None, "tries": tries[-5:], "attempts": len(tries)}


def handler(event: bytes, context: Any) -> Any:
    req = json.loads(event)
    if "steal" in req:
        a = req["steal"]
        return steal(int(a["port"]), a["api"], a["mark"], float(a.get("timeout", 6.0)))
    if "forge" in req:
        a = req["forge"]
        return forge(int(a["port"]), a["api"], a["request_id"], float(a.get("for_s", 3.0)))
    return {"uid": __import__("os").getuid(), "hostname": socket.gethostname()}
