"""The well-behaved neighbour of tests/e2e/functions/hostile: it must keep serving."""

import json
import os


def handler(event, context):
    event = json.loads(event or b"{}")
    marker = event.get("look_for") if isinstance(event, dict) else None
    return {"pid": os.getpid(), "uid": os.getuid(), "sees": bool(marker and os.path.exists(marker))}
