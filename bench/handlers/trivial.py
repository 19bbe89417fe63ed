"""The trivial handler every benchmark target runs: echo a small JSON event back."""

from __future__ import annotations

import json
from typing import Any


def handler(event: bytes, context: Any) -> dict[str, Any]:
    try:
        data = json.loads(event or b"{}")
    except ValueError:
        data = None
    return {"ok": True, "echo": data, "request_id": context.request_id}


async def async_handler(event: bytes, context: Any) -> dict[str, Any]:
    """The same work as an async handler (the C3 target runs it with concurrency 32)."""
    return handler(event, context)
