"""A traceback a worker prints is one log record (issue 12, item 5).

On a real supervisor: ``traceback.print_exc()`` of a chained exception, an
uncaught exception in a thread, a Python child process that crashes on the
worker's fd 2, and a thread that raises after its invocation ended (nothing
follows its trace: it must still come out). Each is one record with level
``error``, the exception's line as ``event`` and the whole trace in
``exception``; no record holds a single line of it; the lines around it
are their own records, in order, and FC's End marker comes after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Running, function, started, wait_for

CODE = '''
import subprocess
import sys
import threading
import time
import traceback


def inner():
    {}["missing"]


def handler(event, context):
    op = event.decode()
    if op == "print_exc":
        print("before the trace")
        try:
            try:
                inner()
            except KeyError as exc:
                raise ValueError("outer failure") from exc
        except ValueError:
            traceback.print_exc()
        print("after the trace")
    elif op == "thread":
        thread = threading.Thread(target=lambda: 1 / 0, name="bg")
        thread.start()
        thread.join()
    elif op == "child":
        subprocess.run([sys.executable, "-c", "def f():\\n    raise RuntimeError('child crashed')\\nf()"])
    elif op == "late":
        def later():
            time.sleep(0.3)
            raise LookupError("after the invocation")
        threading.Thread(target=later, daemon=True).start()
    return op
'''


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("tracebacks")
    code = tmp / "code"
    code.mkdir()
    (code / "tracer.py").write_text(CODE)
    with started(tmp, {"tracer": function("tracer:handler", code_dir=str(code))}) as running:
        yield running


def looks_like_a_trace_line(event: object) -> bool:
    text = str(event)
    return text.startswith(("Traceback (", '  File "', "    ", "During handling", "The above exception")) or (
        text.startswith(("KeyError:", "ValueError:", "ZeroDivisionError:", "RuntimeError:", "LookupError:")))


def invoked(sup: Running, op: str) -> list[dict[str, Any]]:
    """The worker's and the markers' records of one invocation, once its End marker is logged."""
    request_id = f"req-trace-{op}"
    assert sup.invoke(op, headers={"x-fc-request-id": request_id}).status_code == 200

    def mine() -> list[dict[str, Any]]:
        # Not the data plane's access record: it is written in batches, and may follow the End marker.
        found = [r for r in sup.logs() if r.get("request_id") == request_id and r.get("function") == "tracer"
                 and r.get("event") != "access"]
        return found if any(r.get("marker") == "end" for r in found) else []

    return wait_for(mine, 10, f"the records of {request_id}")  # type: ignore[no-any-return]


def the_trace(records: list[dict[str, Any]]) -> dict[str, Any]:
    traces = [r for r in records if "exception" in r]
    assert len(traces) == 1, traces
    assert not [r for r in records if "exception" not in r and looks_like_a_trace_line(r["event"])], records
    trace = traces[0]
    assert trace["level"] == "error" and trace["component"] == "worker" and trace["worker"]
    assert trace["exception"].startswith(("Traceback (most recent call last):", "Exception in thread"))
    return trace


def test_print_exc_of_a_chained_exception_is_one_record_between_its_neighbours(sup: Running) -> None:
    records = invoked(sup, "print_exc")
    trace = the_trace(records)
    assert trace["event"] == "ValueError: outer failure" and trace["stream"] == "stderr"
    assert "KeyError: 'missing'" in trace["exception"] and "direct cause" in trace["exception"]
    events = [r["event"] for r in records]
    assert events.index("before the trace") < events.index(trace["event"]) < events.index("after the trace")
    assert records[-1].get("marker") == "end"


def test_an_uncaught_exception_in_a_thread_is_one_record(sup: Running) -> None:
    trace = the_trace(invoked(sup, "thread"))
    assert trace["event"] == "ZeroDivisionError: division by zero"
    assert trace["exception"].startswith("Exception in thread bg:\nTraceback (most recent call last):\n")
    assert trace["exception"].count("\n") >= 3


def test_a_crashing_child_process_on_fd_2_is_one_record(sup: Running) -> None:
    records = invoked(sup, "child")
    trace = the_trace(records)
    assert trace["event"] == "RuntimeError: child crashed" and trace["stream"] == "stderr"
    # Written straight to fd 2 by another process, logged before the invocation's End.
    assert records.index(trace) < next(i for i, r in enumerate(records) if r.get("marker") == "end")


def test_a_trace_nothing_follows_still_comes_out(sup: Running) -> None:
    invoked(sup, "late")

    def late() -> list[dict[str, Any]]:
        return [r for r in sup.logs() if r.get("function") == "tracer"
                and "LookupError: after the invocation" in str(r.get("exception", r.get("event")))]

    found = wait_for(late, 10, "the late thread's traceback")
    assert len(found) == 1 and found[0]["event"] == "LookupError: after the invocation"
    assert not [r for r in sup.logs() if r.get("function") == "tracer" and "exception" not in r
                and str(r["event"]).startswith(("Exception in thread", '  File "'))]


def test_records_stay_one_json_object_per_line(sup: Running, tmp_path: Path) -> None:
    for line in sup.log_path.read_text().splitlines():
        assert line.startswith("{") and line.endswith("}"), line
