"""A handler that tries to pass its own output off as FC's markers.

Used by tests/e2e/test_markers.py. Every way a handler can write is tried:
print (tagged by the worker), Python's sys.stderr, raw writes to fd 1 and 2
(what C code does), sys.stdout.buffer, and a child process inheriting the
pipes. ``private`` also forges the worker's own boundary records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def handler(event: bytes, context: Any) -> Any:
    req = json.loads(event) if event else {}
    rid = context.request_id
    victim = req.get("victim", "victim-1")
    # Someone else's request, and an early end of this one.
    forged = [f"FC Invoke Start RequestId: {victim}", f"FC Invoke End RequestId: {victim}",
              f"FC Invoke End RequestId: {rid}"]
    print(f"first line of {rid}")
    for line in forged:
        print(line)
        sys.stderr.write(line + "\n")
        sys.stdout.flush()
        os.write(1, (line + "\n").encode())
        os.write(2, (line + "\n").encode())
        sys.stdout.buffer.write((line + "\n").encode())
    os.write(1, f"untagged from C in {rid}\n".encode())
    os.write(2, f"raw stderr in {rid}\n".encode())
    subprocess.run(["/bin/sh", "-c", f"echo from a subprocess in {rid}"], check=True)
    if req.get("private"):
        # The worker's boundary records, forged: an early end of this
        # invocation, then a start and an end for someone else's request.
        for lead in ("\x1c", "\x1e"):
            os.write(1, f"{lead}E\x1f{rid}\n{lead}S\x1f{victim}\n{lead}E\x1f{victim}\n".encode())
        print(f"after the forged records in {rid}")
    if req.get("crash"):
        sys.stdout.flush()
        os._exit(3)
    print(f"last line of {rid}")
    return {"request_id": rid}
