"""``[functions.X] event_loop``: "asyncio" (default) or "uvloop", python functions only.

Whether a function that asks for uvloop ships one is the handler check's to say (it
imports like a worker): tests/e2e/test_function_packages.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from supervisor.config import ConfigError, parse_config


def config(tmp_path: Path, **fn: Any) -> dict[str, Any]:
    return {"supervisor": {}, "functions": {"f": {"code_dir": str(tmp_path), **fn}}}


def test_python_functions_default_to_asyncio(tmp_path: Path) -> None:
    parsed = parse_config(config(tmp_path, handler="h:h"), tmp_path, {})
    assert parsed.functions["f"].event_loop == "asyncio"
    assert parse_config(config(tmp_path, handler="h:h", event_loop="uvloop"), tmp_path, {}).functions[
        "f"].event_loop == "uvloop"


@pytest.mark.parametrize(("fn", "says"), [
    ({"handler": "h:h", "event_loop": "trio"}, "'asyncio' or 'uvloop'"),
    ({"handler": "h:h", "event_loop": 1}, ""),
    ({"runtime": "custom", "command": ["./run"], "event_loop": "uvloop"}, "only python functions take event_loop"),
    ({"runtime": "lambda", "command": ["./bootstrap"], "event_loop": "asyncio"},
     "only python functions take event_loop"),
])
def test_other_values_and_runtimes_are_refused_naming_the_key(tmp_path: Path, fn: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config(tmp_path, **fn), tmp_path, {})
    problems = caught.value.problems
    assert [p.path for p in problems] == ["functions.f.event_loop"], problems
    assert says in problems[0].message
