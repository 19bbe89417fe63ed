"""A Python handler's return value as the /invoke body: always valid JSON."""

from __future__ import annotations

import json
import math

from hypothesis import given
from hypothesis import strategies as st

from worker.python.host import encode_value

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


def _strict(text: str) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_infinities_are_null() -> None:
    body, content_type = encode_value({"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": (math.nan,)})
    assert content_type == "application/json"
    assert _strict(body.decode()) == {"a": None, "b": [None, None, 1.5], "c": [None]}


@given(st.dictionaries(st.text(max_size=5), values, max_size=4))
def test_every_body_is_strict_json(value: dict[str, object]) -> None:
    body, _ = encode_value(value)
    _strict(body.decode())
