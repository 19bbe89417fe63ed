"""Handlers for the pool tests (tests/e2e/test_pools.py).

At import, when ``IMPORT_LOG`` names a file, one JSON line is appended to it
with the importing process's pid and argv: the tests count imports with it
(a worker forked from the seed must not import this module again).

``VERSION`` is rewritten by a test in a copy of this file, to check that a
worker started after a code change runs the new code.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

VERSION = "v1"

if os.environ.get("PRINT_AT_IMPORT"):
    print(os.environ["PRINT_AT_IMPORT"], flush=True)

_import_log = os.environ.get("IMPORT_LOG")
if _import_log:
    with open(_import_log, "a") as _f:
        _f.write(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv}) + "\n")


_hog: list[bytearray] = []


def handler(event: bytes, context: Any) -> Any:
    """Event JSON {"op": ...} picks the behaviour; every answer carries the worker's pid."""
    req = json.loads(event) if event else {}
    op = req.get("op")
    out: dict[str, Any] = {"pid": os.getpid(), "ppid": os.getppid()}
    if req.get("mark"):  # the invocation is in the handler now
        Path(req["mark"]).write_text(str(os.getpid()))
    if op == "sleep":
        time.sleep(float(req.get("s", 0.2)))
    elif op == "random":
        time.sleep(float(req.get("s", 0.0)))
        out["r"] = random.random()
    elif op == "version":
        out["version"] = VERSION
    elif op == "hog":  # keeps this many MiB resident in this worker until it goes
        _hog.append(bytearray(b"\x01") * (int(req["mib"]) << 20))
    elif op == "env":
        out["value"] = os.environ.get(req.get("name", "VERSION"))
    return out
