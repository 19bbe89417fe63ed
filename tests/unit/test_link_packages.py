"""calink and cahttp stand on their own: what each imports, and the bytes cahttp answers with.

calink is the standard library only (a worker imports it before the
function's code); cahttp needs uvicorn and httptools but never the
``supervisor`` package, orjson or structlog (a worker's runtime API server
uses it). Each is imported in a fresh interpreter and its ``sys.modules``
read. The JSON of cahttp's own answers is byte for byte what it was with
orjson (the contract's error bodies did not change with the move).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cahttp.server import ERROR_TYPES, error_response

ROOT = Path(__file__).resolve().parents[2]


def modules_after(statement: str, *, isolated: bool) -> set[str]:
    """Top-level names of the modules a fresh interpreter holds after ``statement``."""
    flags = ["-I", "-S"] if isolated else ["-I"]  # -S: no site-packages at all
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); {statement}; "
            "import json; print(json.dumps(sorted({m.partition('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd="/")
    assert done.returncode == 0, done.stderr
    names: list[str] = json.loads(done.stdout)
    return set(names)


def test_calink_needs_the_standard_library_only() -> None:
    names = modules_after("import calink.frames, calink.messages", isolated=True)
    assert names - sys.stdlib_module_names - {"__main__"} == {"calink"}


def test_importing_calink_alone_imports_nothing_else() -> None:
    baseline = modules_after("pass", isolated=True)
    assert modules_after("import calink", isolated=True) - baseline == {"calink"}


def test_cahttp_needs_neither_supervisor_nor_orjson_nor_structlog() -> None:
    names = modules_after("import cahttp.server, cahttp.request_ids", isolated=False)
    assert "cahttp" in names and "uvicorn" in names
    assert not names & {"supervisor", "worker", "orjson", "structlog", "pydantic", "google", "grpc"}


def test_the_workers_runtime_api_server_takes_cahttp_not_supervisor() -> None:
    names = modules_after("import worker.runtimes.gate", isolated=False)
    assert "cahttp" in names and "supervisor" not in names


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(ERROR_TYPES)), st.text(max_size=200), st.from_regex(r"[A-Za-z0-9._:-]{1,40}",
                                                                                fullmatch=True))
def test_error_bodies_are_the_bytes_orjson_wrote(status: int, message: str, request_id: str) -> None:
    response = error_response(status, message, request_id)
    body = response.partition(b"\r\n\r\n")[2]
    assert body == orjson.dumps({"errorType": ERROR_TYPES[status], "errorMessage": message})
    assert f"content-length: {len(body)}\r\n".encode() in response


def test_the_default_report_is_a_warning_on_std_logging(caplog: pytest.LogCaptureFixture) -> None:
    from cahttp.server import log_report

    with caplog.at_level("WARNING", logger="cahttp"):
        log_report("clients refused, shed or timed out", {"port": "ca", "shed": 2})
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("cahttp", "WARNING", "clients refused, shed or timed out (port=ca, shed=2)")]
