"""What a Python handler logs is one record per call, at its own level, with its
fields as JSON keys (issue 12, item 5: ``context.logger`` and stdlib ``logging``).

On real processes (a forked worker and a spawned one): ``context.logger``'s
fields are keys of the record (not one flattened string), sensitive ones
redacted, the supervisor's own keys never overwritten; ``logging.error`` from
a handler is level error, ``logging.info`` level info (the root logger is at
INFO, as in FC's Python runtime); an exception logged with its traceback is
one record with the trace in one field; records are attributed to their
request like printed lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Running, function, started, wait_for

CODE = '''
import logging


def handler(event, context):
    context.logger.info("structured", n=3, nested={"a": [1, 2]}, password="hunter2", function="forged")
    logging.error("stdlib error %s", "x")
    logging.getLogger("mylib").warning("lib warning")
    logging.info("stdlib info")
    logging.debug("stdlib debug")
    try:
        1 / 0
    except ZeroDivisionError:
        context.logger.exception("failed", step=2)
    context.logger.bind(user="u1").warning("bound")
    context.logger.debug("context debug")
    print("plain print")
    return "ok"
'''


def records_of(sup: Running, request_id: str) -> list[dict[str, Any]]:
    mine = [r for r in sup.logs() if r.get("request_id") == request_id and r.get("component") == "worker"]
    return mine if any(r.get("event") == "plain print" for r in mine) else []


@pytest.mark.parametrize("seed", [True, False])
def test_handler_logs_are_records_with_levels_and_fields(tmp_path: Path, seed: bool) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "logs_fn.py").write_text(CODE)
    with started(tmp_path, {"fn": function("logs_fn:handler", code_dir=str(code), seed=seed)}) as sup:
        answer = sup.invoke(headers={"x-fc-request-id": "req-logs-1"})
        assert answer.status_code == 200, answer.text
        mine = wait_for(lambda: records_of(sup, "req-logs-1"), 30, "the handler's records")
        by_event = {r["event"]: r for r in mine}
        expected = {"structured", "stdlib error x", "lib warning", "stdlib info", "context debug", "failed", "bound"}
        assert expected <= set(by_event), mine

        structured = by_event["structured"]
        assert structured["level"] == "info" and structured["n"] == 3 and structured["nested"] == {"a": [1, 2]}
        assert structured["password"] == "[REDACTED]"
        assert structured["function"] == "fn" and structured["user_function"] == "forged"
        assert structured["worker"] and structured["component"] == "worker"

        assert by_event["stdlib error x"]["level"] == "error"
        assert by_event["lib warning"]["level"] == "warning" and by_event["lib warning"]["logger"] == "mylib"
        assert by_event["stdlib info"]["level"] == "info"
        assert "stdlib debug" not in by_event  # the root logger is at INFO
        assert by_event["context debug"]["level"] == "debug"  # context.logger logs every level

        failed = by_event["failed"]
        assert failed["level"] == "error" and failed["step"] == 2
        assert "ZeroDivisionError" in failed["exception"] and "Traceback" in failed["exception"]
        assert not [r for r in mine if str(r["event"]).startswith(("Traceback", "ZeroDivisionError"))]

        assert by_event["bound"]["level"] == "warning" and by_event["bound"]["user"] == "u1"
        assert by_event["plain print"]["level"] == "info" and by_event["plain print"]["stream"] == "stdout"
        assert "hunter2" not in sup.log_path.read_text()
