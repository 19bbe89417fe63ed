"""An async handler that waits 100 ms (bench/pools.py, burst from idle).

With ``concurrency = 4`` a worker really has 4 of these in flight at once.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def handler(event: bytes, context: Any) -> dict[str, Any]:
    await asyncio.sleep(0.1)
    return {"ok": True, "request_id": context.request_id}
