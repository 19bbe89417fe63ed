"""The pull runtimes' JSON (worker/runtimes/events.py): the standard library's, read strictly.

What a runtime posts is untrusted: a document json_loads refuses is a
ValueError (never a RecursionError or UnicodeDecodeError escaping into the
runtime API's handler), and an error report that is not JSON is kept as
text. A client context is re-encoded as ASCII JSON, safe in a header.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.runtimes.events import error_info_from_body, json_dumps, json_loads
from worker.runtimes.lambda_api import _compact_json

documents = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@pytest.mark.parametrize("data", [b"NaN", b"[Infinity]", b'{"a": -Infinity}', b'"\xff"', b"[" * 100_000, b"{",
                                  "[1,]"])
def test_what_is_not_strict_json_is_a_value_error(data: bytes | str) -> None:
    with pytest.raises(ValueError):
        json_loads(data)


def test_an_error_report_nested_too_deep_is_kept_as_text() -> None:
    body = b'{"errorType": ' + b"[" * 100_000
    info = error_info_from_body(body, None, "Fallback")
    assert info.error_type == "Fallback" and info.error_message.startswith('{"errorType"')


@settings(max_examples=200, deadline=None)
@given(documents)
def test_documents_round_trip_compact(document: object) -> None:
    assert json_loads(json_dumps(document)) == document


@settings(max_examples=200, deadline=None)
@given(documents)
def test_a_client_context_becomes_ascii_json(document: object) -> None:
    # (orjson's bytes decoded with backslashreplace gave \xc3\xa9 for "é": not JSON any more)
    compact = _compact_json(json.dumps(document))
    assert compact is not None and compact.isascii() and "\n" not in compact
    assert json.loads(compact) == document
