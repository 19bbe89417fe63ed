"""Handlers the end-to-end suite runs in real workers.

Behaviour is chosen by the event so that one function serves many tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

INITIALIZED_AT = None


def init(context: Any) -> None:
    global INITIALIZED_AT
    INITIALIZED_AT = time.time()
    print(f"init ran in {os.getpid()}")


def handler(event: bytes, context: Any) -> Any:
    """Event JSON {"op": ...} picks the behaviour; anything else is echoed."""
    try:
        req = json.loads(event) if event else {}
    except ValueError:
        return event  # bytes back as they came
    if not isinstance(req, dict):
        return req
    op = req.get("op")
    if op == "sleep":
        time.sleep(float(req.get("s", 0.2)))
        return {"slept": req.get("s"), "pid": os.getpid()}
    if op == "pid":
        return {"pid": os.getpid(), "ppid": os.getppid(), "initialized": INITIALIZED_AT is not None}
    if op == "raise":
        raise ValueError(req.get("msg", "boom"))
    if op == "crash":
        sys.stdout.flush()
        os._exit(int(req.get("code", 13)))
    if op == "hang":
        while True:
            time.sleep(1)
    if op == "print":
        for i in range(int(req.get("n", 1))):
            print(f"{req.get('text', 'line')} {i}")
        sys.stderr.write("to stderr\n")
        context.logger.info("structured", n=req.get("n", 1))
        return {"printed": req.get("n", 1)}
    if op == "context":
        return {
            "request_id": context.request_id,
            "function_name": context.function_name,
            "memory_limit_mb": context.memory_limit_mb,
            "timeout_s": context.timeout_s,
            "remaining_ms": context.remaining_time_ms(),
            "access_key_id": context.credentials.access_key_id,
            "access_key_secret": context.credentials.access_key_secret,
            "security_token": context.credentials.security_token,
            "headers": dict(context.headers),
            "env_greeting": os.environ.get("GREETING"),
            "env_home_leak": os.environ.get("SUPERVISOR_TEST_SECRET"),
            "fc_function_name": os.environ.get("FC_FUNCTION_NAME"),
        }
    if op == "orphan":
        # Leave a grandchild behind: it is re-parented to the nearest subreaper
        # (the supervisor, or PID 1 in a namespace), which must reap it.
        child = os.fork()
        if child == 0:
            if os.fork() == 0:
                time.sleep(float(req.get("s", 0.3)))
                os._exit(0)
            os._exit(0)
        os.waitpid(child, 0)
        return {"pid": os.getpid()}
    if op == "flood":
        sys.stdout.write("x" * (10 * 1024 * 1024) + "\n")  # one 10 MB line
        for i in range(int(req.get("n", 100_000))):
            print(f"flood {i}")
        print("flood done")
        return {"flooded": True}
    if op == "big":
        return b"b" * int(req.get("n", 0))
    if op == "fds":
        out = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                out[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass
        return out
    if op == "text":
        return "plain text"
    if op == "none":
        return None
    if op == "count":  # how many invocations this worker has run, this one included
        global _count
        _count += 1
        return {"count": _count, "pid": os.getpid()}
    if op == "random":
        return {"r": random.random(), "pid": os.getpid()}
    return req


_arrived = 0
_count = 0


async def async_handler(event: bytes, context: Any) -> Any:
    """{"barrier": N}: returns only once N invocations are in this worker at once."""
    global _arrived
    req = json.loads(event) if event else {}
    barrier = int(req.get("barrier", 0))
    if barrier:
        _arrived += 1
        deadline = time.monotonic() + 5.0
        while _arrived < barrier:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {_arrived} of {barrier} invocations ran at once")
            await asyncio.sleep(0.005)
    else:
        await asyncio.sleep(float(req.get("s", 0.01)))
    return {"pid": os.getpid(), "request_id": context.request_id}


def bad_init(context: Any) -> None:
    raise RuntimeError("initializer refuses to start")


def hook_file(context: Any, name: str) -> None:
    directory = os.environ.get("HOOK_DIR")
    if directory:
        Path(directory, f"{name}-{os.getpid()}").write_text(context.request_id)


def pre_freeze(context: Any) -> None:
    hook_file(context, "pre_freeze")


def pre_stop(context: Any) -> None:
    hook_file(context, "pre_stop")


def stubborn_init(context: Any) -> None:
    """A worker that ignores SIGTERM (a graceful stop cannot end it)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def slow_init(context: Any) -> None:
    time.sleep(float(os.environ.get("INIT_SECONDS", "1.5")))
