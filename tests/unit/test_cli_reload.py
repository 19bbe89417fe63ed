"""`supervisor reload --wait [--timeout SECONDS]`: its arguments and its JSON.

`--timeout` takes positive seconds up to a day (anything else is a usage
error, exit 2); the JSON object carries `serving`/`not_serving` only when
the reload waited. Exit code 5 itself is tested end to end
(tests/e2e/test_reload_seed.py).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.cli import EXIT_NOT_SERVING, RELOAD_WAIT_S, build_parser, reload_document
from supervisor.v1 import control_pb2 as cpb


def test_wait_and_its_timeout_parse() -> None:
    args = build_parser().parse_args(["reload", "--wait", "--timeout", "2.5"])
    assert args.wait and args.timeout == 2.5
    args = build_parser().parse_args(["reload"])
    assert not args.wait and args.timeout == RELOAD_WAIT_S


@given(st.floats(0.001, 86400))
def test_any_positive_timeout_up_to_a_day_is_taken(seconds: float) -> None:
    assert build_parser().parse_args(["reload", "--wait", "--timeout", repr(seconds)]).timeout == seconds


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf", "86401", "1e400", "soon", ""])
def test_a_bad_timeout_is_a_usage_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["reload", "--wait", "--timeout", bad])
    assert exited.value.code == 2
    assert "--timeout" in capsys.readouterr().err


def test_the_json_says_whether_the_new_config_serves_only_when_it_waited() -> None:
    assert "serving" not in reload_document(cpb.ReloadReply(ok=True, changed=["f"], generation=2))
    document = reload_document(cpb.ReloadReply(ok=True, changed=["f"], generation=2, waited=True,
                                               not_serving="f: InitializationError: boom"))
    assert document["serving"] is False and document["not_serving"] == "f: InitializationError: boom"
    assert EXIT_NOT_SERVING == 5
