"""The bundled example function: greets whoever the event names."""

from __future__ import annotations

import json
import os
from typing import Any

_greeting = "hello"


def init(context: Any) -> None:
    """Runs once in every worker before it serves."""
    global _greeting
    _greeting = os.environ.get("GREETING", "hello")
    context.logger.info("initialized", greeting=_greeting)


def handler(event: bytes, context: Any) -> dict[str, Any]:
    """Event {"name": "..."} (or anything else) -> {"hello": name, "request_id": ...}."""
    try:
        name = json.loads(event or b"{}").get("name", "world")
    except (ValueError, AttributeError):
        name = "world"
    return {"hello": name, "greeting": _greeting, "request_id": context.request_id}
