"""An AWS Lambda handler run by awslambdaric against the worker's Runtime API.

Run it with ``runtime = "lambda"`` (see supervisor.toml next to it) after
``pip install awslambdaric``. The event is the /invoke body, parsed as JSON.
"""

from __future__ import annotations

import os
from typing import Any


class RequestedFailure(Exception):
    """Raised on purpose when the event asks for it: shows how errors come back."""


def handler(event: Any, context: Any) -> dict[str, Any]:
    """{"name": "..."} -> a greeting; {"fail": "why"} -> RequestedFailure("why")."""
    if not isinstance(event, dict):
        event = {"event": event}
    if "fail" in event:
        raise RequestedFailure(str(event["fail"]))
    print(f"greeting {event.get('name', 'world')}")  # lands in the log, attributed to this request
    return {
        "hello": event.get("name", "world"),
        "request_id": context.aws_request_id,
        "function": context.function_name,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "region": os.environ.get("AWS_REGION", ""),
    }
