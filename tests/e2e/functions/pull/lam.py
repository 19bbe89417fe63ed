"""Lambda handlers for tests/e2e/test_pull_runtimes.py, run by awslambdaric.

The event picks the behaviour: {"op": "echo"} returns what the runtime saw,
{"op": "fail"} raises, {"op": "sleep", "s": N} sleeps, {"op": "crash"} kills
the runtime mid-invocation, {"op": "pid"} returns the runtime's pid.
"""

import os
import time


class DeliberateError(Exception):
    pass


def handler(event, context):
    op = event.get("op", "echo")
    if op == "fail":
        raise DeliberateError("asked to fail")
    if op == "sleep":
        time.sleep(float(event.get("s", 1)))
        return {"slept": event.get("s", 1)}
    if op == "crash":
        os._exit(9)
    if op == "pid":
        return {"pid": os.getpid()}
    print(f"echo for {context.aws_request_id}")
    return {"event": event, "request_id": context.aws_request_id, "function": context.function_name,
            "memory": context.memory_limit_in_mb, "remaining_ms": context.get_remaining_time_in_millis(),
            "handler_env": os.environ.get("_HANDLER"), "secret": os.environ.get("SUPERVISOR_SECRET")}
