"""Request ids on the CA port.

Every answer carries ``x-fc-request-id``: the caller's when it is 1-127
characters of ``[A-Za-z0-9._:-]`` (FC's ids are), else a generated one, so
an id can never forge or break a log line.
"""

from __future__ import annotations

import itertools
import os
import re

SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,127}")


class RequestIds:
    """Unique ids without a getrandom() per request: a random per-process prefix
    (a restarted plane gets a new one) and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"
