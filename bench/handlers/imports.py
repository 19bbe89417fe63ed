"""A handler that imports what a real function would at module level (bench/pools.py).

Spawned workers pay for these imports on every start; forked ones get them from
the seed, which imported this module once. Same work per invocation as trivial.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import email.parser
import email.policy
import hashlib
import http.client
import json
import logging
import urllib.parse
import urllib.request
import uuid
from typing import Any

import orjson
import pydantic

log = logging.getLogger("bench.imports")


class Order(pydantic.BaseModel):
    """A model built at import time, the way handlers declare their input."""

    id: uuid.UUID
    amount: decimal.Decimal
    created: datetime.datetime
    tags: list[str] = []


@dataclasses.dataclass
class Reply:
    ok: bool
    echo: Any
    request_id: str


_PARSER = email.parser.BytesHeaderParser(policy=email.policy.default)
_DIGEST = hashlib.sha256(b"bench").hexdigest()
_UNUSED = (http.client.OK, urllib.parse.quote, urllib.request.Request)


def handler(event: bytes, context: Any) -> bytes:
    try:
        data = json.loads(event or b"{}")
    except ValueError:
        data = None
    return orjson.dumps(dataclasses.asdict(Reply(True, data, context.request_id)))
