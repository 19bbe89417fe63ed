"""A function whose workers die right after they are ready, every time.

The initializer arms a timer that ends the process (``os._exit``) shortly
after the worker reports READY, whether or not it has work, and the handler
takes longer than that: the true crash loop of tests/e2e/test_crash_loops.py,
whose workers never complete an invocation. ``DIE_AFTER_S`` in the environment
sets the delay.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any


def init(context: Any) -> None:
    delay = float(os.environ.get("DIE_AFTER_S", "0.2"))
    timer = threading.Timer(delay, os._exit, (3,))
    timer.daemon = True
    timer.start()


def handler(event: bytes, context: Any) -> Any:
    time.sleep(10)  # longer than a worker lives: it never completes an invocation
    return {"pid": os.getpid()}
