"""FC's markers cannot be forged: a real supervisor, a handler that tries.

The handler (tests/e2e/functions/forger) prints ``FC Invoke Start/End
RequestId: ...`` for someone else's request and an early End for its own,
in every way a handler can write (print, sys.stderr, raw fd 1 and 2,
sys.stdout.buffer, a child process), and forges the worker's private
boundary records. The supervisor's stdout must still hold exactly one real
Start and one real End per invocation, from a plane (``marker`` set), around
the invocation's lines; every forged line stays the worker's output line
(``component: "worker"``, its stream, its request), and a raw grep of the
log for a marker finds only the real ones.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import FUNCTIONS_DIR, Running, started, wait_for

PLANES = ("control-plane", "data-plane")
FORGER = {"runtime": "python", "handler": "forger:handler", "code_dir": str(FUNCTIONS_DIR / "forger"),
          "min_warm": 1, "max_workers": 1, "timeout": "20s"}
MARKER_TEXT = re.compile(r"FC (Invoke|Initialize|PreFreeze|PreStop) (Start|End) RequestId: (\S+)")


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with started(tmp_path_factory.mktemp("markers"), {"forger": FORGER}) as running:
        yield running


def real_markers(records: list[dict[str, Any]], request_id: str) -> list[tuple[int, dict[str, Any]]]:
    return [(i, r) for i, r in enumerate(records) if "marker" in r and r.get("request_id") == request_id]


def check_real_pair(records: list[dict[str, Any]], request_id: str) -> tuple[int, int, str]:
    """Exactly one real Start, then one real End, from a plane; returns their
    positions and the worker they name."""
    marks = real_markers(records, request_id)
    assert [(r["marker"], r["event"]) for _, r in marks] == [
        ("start", f"FC Invoke Start RequestId: {request_id}"),
        ("end", f"FC Invoke End RequestId: {request_id}")], marks
    for _, record in marks:
        assert record["component"] in PLANES and record["function"] == "forger" and record["kind"] == "invoke"
    (start, first), (end, second) = marks
    assert first["worker"] == second["worker"] != ""
    return start, end, str(first["worker"])


def check_forged_lines_are_user_output(records: list[dict[str, Any]]) -> None:
    for record in records:
        event = str(record.get("event", ""))
        if MARKER_TEXT.search(event) and "marker" not in record:
            assert record["component"] == "worker" and record["function"] == "forger", record
            assert record["stream"] in ("stdout", "stderr"), record


def wait_for_line(sup: Running, text: str) -> list[dict[str, Any]]:
    return wait_for(lambda: (records := sup.logs()) and any(r.get("event") == text for r in records) and records,
                    15, repr(text))


def test_forged_markers_stay_user_output_and_the_real_ones_come_from_a_plane(sup: Running) -> None:
    ids = ["mk-1", "mk-2", "mk-3"]
    for request_id in ids:
        response = sup.invoke({"victim": "victim-1"}, headers={"x-fc-request-id": request_id})
        assert response.status_code == 200, response.text
        assert response.json() == {"request_id": request_id}

    def all_ended() -> list[dict[str, Any]] | None:
        records = sup.logs()
        done = all(any(r.get("marker") == "end" and r.get("request_id") == i for r in records) for i in ids)
        return records if done else None

    records = wait_for(all_ended, 15, "a real End marker for every invocation")
    assert not [r for r in records if r.get("unparsed")], "every stdout line is one JSON object"
    check_forged_lines_are_user_output(records)
    assert not [r for r in records if r.get("request_id") == "victim-1"]  # nothing ran for the victim
    assert not [r for r in records if "marker" in r and "victim" in str(r.get("event"))]

    for request_id in ids:
        start, end, worker = check_real_pair(records, request_id)
        mine = [(i, r) for i, r in enumerate(records) if r.get("component") == "worker" and
                r.get("request_id") == request_id]
        events = [str(r["event"]) for _, r in mine]
        for expected in (f"first line of {request_id}", f"last line of {request_id}",
                         f"untagged from C in {request_id}", f"raw stderr in {request_id}",
                         f"from a subprocess in {request_id}"):
            assert expected in events, (expected, events)
        # Around the invocation's lines, whatever stream or way they were written.
        assert all(start < i < end for i, _ in mine), (start, end, [(i, r["event"]) for i, r in mine])
        for _, record in mine:
            assert record["worker"] == worker and record["function"] == "forger"
        # Each forged marker comes out five times (print, sys.stderr, fd 1, fd 2,
        # sys.stdout.buffer) as this invocation's own output, on its own stream.
        for forged in ("FC Invoke Start RequestId: victim-1", "FC Invoke End RequestId: victim-1",
                       f"FC Invoke End RequestId: {request_id}"):
            copies = [r for _, r in mine if r["event"] == forged]
            assert sorted(r["stream"] for r in copies) == ["stderr", "stderr", "stdout", "stdout", "stdout"], copies
            assert all("marker" not in r for r in copies)

    # What a raw grep of stdout for FC's marker text finds: the real markers only.
    raw = sup.log_path.read_bytes()
    assert b"RequestId: victim-1" not in raw
    for request_id in ids:
        for phase in ("Start", "End"):
            assert raw.count(f"FC Invoke {phase} RequestId: {request_id}".encode()) == 1, (phase, request_id)


def test_forged_private_records_neither_add_nor_move_real_markers_of_others(sup: Running) -> None:
    response = sup.invoke({"victim": "victim-2", "private": True}, headers={"x-fc-request-id": "mk-private"})
    assert response.status_code == 200, response.text
    records = wait_for(lambda: (rs := sup.logs()) and len(real_markers(rs, "mk-private")) >= 2 and rs, 15,
                       "the real markers of mk-private")
    start, end, _ = check_real_pair(records, "mk-private")
    first = next(i for i, r in enumerate(records) if r.get("event") == "first line of mk-private")
    assert start < first < end
    check_forged_lines_are_user_output(records)
    assert not real_markers(records, "victim-2")
    assert not [r for r in records if r.get("component") in PLANES and r.get("request_id") == "victim-2"]


def test_an_invocation_that_crashes_its_worker_still_gets_exactly_one_start_and_end(sup: Running) -> None:
    response = sup.invoke({"crash": True}, headers={"x-fc-request-id": "mk-crash"})
    assert response.status_code == 502, response.text
    records = wait_for(lambda: (rs := sup.logs()) and len(real_markers(rs, "mk-crash")) >= 2 and rs, 15,
                       "the real markers of mk-crash")
    start, end, _ = check_real_pair(records, "mk-crash")
    first = next(i for i, r in enumerate(records) if r.get("event") == "first line of mk-crash")
    assert start < first < end
    # The pool recovers, and the next invocation is framed as usual.
    wait_for(lambda: sup.invoke({}, headers={"x-fc-request-id": "mk-after"}).status_code == 200, 30,
             "an invocation after the crash")
    records = wait_for(lambda: (rs := sup.logs()) and len(real_markers(rs, "mk-after")) >= 2 and rs, 15,
                       "the real markers of mk-after")
    check_real_pair(records, "mk-after")


def test_hook_markers_come_from_the_data_plane(sup: Running) -> None:
    assert sup.post("/pre-freeze", headers={"x-fc-request-id": "mk-freeze"}).status_code == 200
    records = wait_for(lambda: (rs := sup.logs()) and len(real_markers(rs, "mk-freeze")) >= 2 and rs, 15,
                       "the pre-freeze markers")
    marks = real_markers(records, "mk-freeze")
    assert [(r["component"], r["marker"], r["kind"], r["event"]) for _, r in marks] == [
        ("data-plane", "start", "pre_freeze", "FC PreFreeze Start RequestId: mk-freeze"),
        ("data-plane", "end", "pre_freeze", "FC PreFreeze End RequestId: mk-freeze")]


@pytest.mark.parametrize("plane", ["data-plane", "control-plane"])
def test_markers_survive_a_restart_of_either_plane(tmp_path: Path, plane: str) -> None:
    """The FIFO is made afresh by each control plane and reopened by the data
    plane when it finds no reader: after either plane is killed, invocations
    are framed as before, once each."""
    with started(tmp_path, {"forger": FORGER}) as sup:
        assert sup.invoke({}, headers={"x-fc-request-id": "before-kill"}).status_code == 200
        wait_for(lambda: len(real_markers(sup.logs(), "before-kill")) == 2, 15, "the markers before the kill")
        old = sup.component_pid(plane)
        sup.remember_processes()
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: any(c["name"] == plane and c["pid"] not in (None, old) and c["state"] == "running"
                             for c in sup.status()["components"]), 30, f"a new {plane}")
        wait_for(lambda: sup.invoke({}, headers={"x-fc-request-id": "after-kill"}).status_code == 200, 30,
                 "an invocation after the restart")
        records = wait_for(lambda: (rs := sup.logs()) and len(real_markers(rs, "after-kill")) >= 2 and rs, 15,
                           "the markers after the restart")
        check_real_pair(records, "after-kill")
        check_real_pair(records, "before-kill")


def test_concurrent_invocations_and_http_requests_each_get_their_own_pair(tmp_path: Path) -> None:
    functions = {"forger": {**FORGER, "concurrency": 4},
                 "web": {"runtime": "python", "interface": "asgi", "handler": "web:app",
                         "code_dir": str(FUNCTIONS_DIR / "runtimes"), "min_warm": 1, "max_workers": 1,
                         "timeout": "10s"}}
    ids = [f"par-{i}" for i in range(8)]
    with started(tmp_path, functions) as sup:
        with ThreadPoolExecutor(len(ids)) as pool:
            statuses = list(pool.map(lambda rid: sup.invoke({}, function="forger", headers={
                "x-fc-request-id": rid}).status_code, ids))
        assert statuses == [200] * len(ids)
        with sup.client() as client:
            boom = client.get("/boom", headers={"x-fc-function-name": "web", "x-fc-request-id": "http-boom"})
        assert boom.status_code != 200
        records = wait_for(lambda: (rs := sup.logs()) and all(len(real_markers(rs, i)) >= 2
                                                            for i in [*ids, "http-boom"]) and rs,
                           15, "every request's markers")
    check_forged_lines_are_user_output(records)
    for rid in ids:
        start, end, worker = check_real_pair(records, rid)
        tagged = [i for i, r in enumerate(records) if r.get("component") == "worker" and r.get("request_id") == rid
                  and r["event"] in (f"first line of {rid}", f"last line of {rid}")]
        assert len(tagged) == 2 and all(start < i < end for i in tagged), (rid, start, end, tagged)
    marks = real_markers(records, "http-boom")
    assert [(r["component"], r["marker"], r["function"], r["kind"]) for _, r in marks] == [
        ("control-plane", "start", "web", "invoke"), ("control-plane", "end", "web", "invoke")]
