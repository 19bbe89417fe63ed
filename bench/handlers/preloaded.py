"""What the worker (or its seed) had imported before this module: for bench/python_start.py."""

from __future__ import annotations

import sys

PRELOADED = sorted(sys.modules)  # first: nothing of this module's own imports is counted

import json  # noqa: E402
from typing import Any  # noqa: E402

OURS = ("worker", "calink", "__main__")


def handler(event: bytes, context: Any) -> dict[str, Any]:
    outside = sorted({m.partition(".")[0] for m in PRELOADED} - set(sys.stdlib_module_names) - {*OURS, __name__})
    return {"modules": len(PRELOADED), "outside": outside, "echo": json.loads(event or b"{}")}
