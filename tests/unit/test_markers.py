"""FC's markers: the placer's pure decisions, the data plane's channel on a real
FIFO, and the control plane placing them in a worker's output on real pipes."""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

import supervisor.control.output as control_output
from supervisor import logs, marks
from supervisor.control.markers import MAX_OPEN, Marker, Placer
from supervisor.control.output import WorkerOutput, listen_for_marks, stop_listening
from supervisor.logs import configure_logging, emit_marker_line, emit_worker_line, get_logger

S = "start"
E = "end"


def m(phase: str, request_id: str, kind: str = "invoke") -> Marker:
    return Marker(kind, phase, request_id)


# --- the placer -------------------------------------------------------------------------


def test_start_goes_at_the_boundary_and_end_at_the_later_of_boundary_and_assertion() -> None:
    placer = Placer()
    placer.asserted_start("invoke", "r1")
    assert placer.began("r1") == [m(S, "r1")]
    assert placer.ended("r1") == []  # the data plane has not said it is over
    assert placer.asserted_end("r1", 2) == ([m(E, "r1")], False)
    placer.asserted_start("invoke", "r2")
    assert placer.began("r2") == [m(S, "r2")]
    assert placer.asserted_end("r2", 4) == ([], True)  # the worker's output must be read first
    assert placer.ended("r2") == [m(E, "r2")]
    assert placer.drained(4) == []  # shown already, once
    assert not placer.waiting


def test_nothing_the_worker_says_makes_a_marker_without_the_data_plane() -> None:
    placer = Placer()
    assert placer.began("victim") == [] and placer.ended("victim") == []
    placer.asserted_start("invoke", "r1")
    assert placer.began("r1") == [m(S, "r1")]
    assert placer.began("r1") == []  # a forged second start
    assert placer.ended("r1") == []  # a forged early end: not shown before the data plane says so
    assert placer.ended("r1") == []  # the real one, later
    assert placer.asserted_end("r1", 1) == ([m(E, "r1")], False)
    assert placer.asserted_end("r1", 2) == ([], False)  # a second end of nothing
    assert placer.began("r1") == [] and placer.drained(9) == [] and placer.expire() == []


def test_without_boundaries_the_end_comes_after_the_output_is_read_through() -> None:
    placer = Placer()
    placer.asserted_start("invoke", "r1")
    placer.asserted_start("pre_stop", "h1")
    assert placer.asserted_end("r1", 5) == ([], True)
    assert placer.drained(4) == []  # that read began before the end was known
    assert placer.drained(5) == [m(S, "r1"), m(E, "r1")]
    assert placer.asserted_end("h1", 6) == ([], True)
    assert placer.output_over() == [m(S, "h1", "pre_stop"), m(E, "h1", "pre_stop")]


def test_an_initializer_shows_markers_only_if_the_worker_ran_it() -> None:
    placer = Placer()
    placer.asserted_start("initialize", "init-w1")  # a reconnect: the worker does not run it again
    assert placer.asserted_end("init-w1", 1) == ([], True)
    assert placer.drained(1) == []
    placer.asserted_start("initialize", "init-w2")
    assert placer.began("init-w2") == [m(S, "init-w2", "initialize")]
    assert placer.asserted_end("init-w2", 2) == ([], True)
    assert placer.drained(2) == [m(E, "init-w2", "initialize")]


def test_once_the_output_is_over_ends_show_at_once_and_expire_ends_everything() -> None:
    placer = Placer()
    placer.asserted_start("invoke", "r1")
    placer.asserted_start("invoke", "r2")
    assert placer.began("r1") == [m(S, "r1")]
    assert placer.output_over() == []
    assert placer.asserted_end("r1", 1) == ([m(E, "r1")], False)
    assert placer.waiting
    assert placer.expire() == [m(S, "r2"), m(E, "r2")]
    assert not placer.waiting


def test_a_restarted_data_plane_ends_what_was_open() -> None:
    placer = Placer()
    placer.asserted_start("invoke", "r1")
    placer.asserted_start("invoke", "r2")
    assert placer.began("r1") == [m(S, "r1")] and placer.ended("r1") == []
    assert placer.all_over(7) == ([m(E, "r1")], True)  # r2's output must be read first
    assert placer.drained(7) == [m(S, "r2"), m(E, "r2")]


def test_the_same_request_id_twice_is_two_invocations() -> None:
    placer = Placer()
    placer.asserted_start("invoke", "dup")
    placer.asserted_start("invoke", "dup")
    assert placer.began("dup") == [m(S, "dup")] and placer.began("dup") == [m(S, "dup")]
    assert placer.ended("dup") == [] and placer.asserted_end("dup", 1) == ([m(E, "dup")], False)
    assert placer.asserted_end("dup", 2) == ([], True) and placer.ended("dup") == [m(E, "dup")]


def test_state_is_bounded() -> None:
    placer = Placer()
    for i in range(MAX_OPEN + 10):
        placer.asserted_start("invoke", f"r{i}")
    assert placer.began("r0") == []  # the oldest went, unshown
    assert placer.began(f"r{MAX_OPEN + 9}") == [m(S, f"r{MAX_OPEN + 9}")]
    assert len(placer.expire()) == 2 * MAX_OPEN - 1


ids = st.sampled_from(["a", "b", "c", "victim"])
steps = st.lists(st.one_of(
    st.tuples(st.just("assert_start"), ids, st.sampled_from(["invoke", "initialize"])),
    st.tuples(st.just("assert_end"), ids, st.just("")),
    st.tuples(st.just("began"), ids, st.just("")),
    st.tuples(st.just("ended"), ids, st.just("")),
    st.tuples(st.just("drained"), st.just(""), st.just("")),
    st.tuples(st.just("over"), st.just(""), st.just("")),
), max_size=60)


@settings(max_examples=500, deadline=None)
@given(steps)
def test_every_asserted_invocation_gets_one_start_then_one_end_and_nothing_else_does(
        script: list[tuple[str, str, str]]) -> None:
    placer = Placer()
    asserted: dict[str, list[str]] = {}  # id -> kinds asserted (in order)
    ends_asserted: dict[str, int] = {}
    worker_began: dict[str, int] = {}
    shown: list[Marker] = []
    position = 0
    for action, request_id, kind in script:
        position += 1
        if action == "assert_start" and request_id != "victim":
            asserted.setdefault(request_id, []).append(kind)
            placer.asserted_start(kind, request_id)
        elif action == "assert_end" and ends_asserted.get(request_id, 0) < len(asserted.get(request_id, [])):
            ends_asserted[request_id] = ends_asserted.get(request_id, 0) + 1
            shown += placer.asserted_end(request_id, position)[0]
        elif action == "began":
            worker_began[request_id] = worker_began.get(request_id, 0) + 1
            shown += placer.began(request_id)
        elif action == "ended":
            shown += placer.ended(request_id)
        elif action == "drained":
            shown += placer.drained(position)
        elif action == "over":
            shown += placer.output_over()
        # Never an End before the data plane said so, never more than it asserted.
        for rid in asserted:
            ends = [x for x in shown if x.request_id == rid and x.phase == E]
            starts = [x for x in shown if x.request_id == rid and x.phase == S]
            assert len(ends) <= ends_asserted.get(rid, 0)
            assert len(starts) <= len(asserted[rid])
    shown += placer.expire()
    assert not placer.waiting
    assert not [x for x in shown if x.request_id == "victim"]
    for rid, kinds in asserted.items():
        phases = [x.phase for x in shown if x.request_id == rid]
        # One Start and one End per asserted invocation (an initializer only when
        # the worker's start boundary was seen), no End before its Start: the same
        # id asserted twice is two invocations, which may overlap.
        for prefix in range(len(phases) + 1):
            assert phases[:prefix].count(E) <= phases[:prefix].count(S)
        pairs = phases.count(S)
        assert phases.count(E) == pairs
        assert kinds.count("invoke") <= pairs <= len(kinds)


# --- the data plane's channel, on a real FIFO ---------------------------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[tuple[marks.MarkReader, marks.MarkWriter]]:
    path = tmp_path / "marks.fifo"
    reader = marks.MarkReader.open(path)
    writer = marks.MarkWriter(path)
    try:
        yield reader, writer
    finally:
        writer.close()
        reader.close()


def test_records_round_trip_and_ends_wait_for_the_loop(fifo: tuple[marks.MarkReader, marks.MarkWriter]) -> None:
    reader, writer = fifo
    assert oct(os.stat(writer.path).st_mode & 0o777) == "0o600"

    async def main() -> list[marks.Record]:
        writer.start("fn-1-abc", "invoke", "r1")
        writer.end("fn-1-abc", "r1")
        first = reader.read()  # the end is not written yet: it leaves with the loop iteration
        await asyncio.sleep(0)
        return first + reader.read()

    got = asyncio.run(main())
    assert got == [marks.Record("H", str(os.getpid()), "", ""), marks.Record("S", "fn-1-abc", "invoke", "r1"),
                   marks.Record("E", "fn-1-abc", "", "r1")]
    assert reader.count == 3 and reader.read() == []


def test_bad_ids_and_kinds_are_never_written(fifo: tuple[marks.MarkReader, marks.MarkWriter]) -> None:
    reader, writer = fifo
    writer.start("fn 1", "invoke", "r1")
    writer.start("fn-1", "invoke", "r1\nS fn-1 invoke forged")
    writer.start("fn-1", "bogus", "r1")
    writer.start("fn-1", "invoke", "x" * 128)
    writer.start("fn-1", "invoke", "fine")
    assert [(r.op, r.request_id) for r in reader.read()] == [("H", ""), ("S", "fine")]


@pytest.mark.parametrize("line", [b"S a invoke", b"S a bogus r", b"E a", b"E a b c", b"H x", b"X a b", b"",
                                  b"S a/b invoke r", b"E a r\xff"])
def test_lines_that_are_not_records_are_ignored(line: bytes) -> None:
    assert marks.parse(line) is None


def test_a_reader_that_stopped_costs_records_never_a_block(fifo: tuple[marks.MarkReader, marks.MarkWriter]) -> None:
    reader, writer = fifo
    total = 100_000  # ~2.5 MB of records: more than the FIFO holds
    for i in range(total):
        writer.start("fn-1-abc", "invoke", f"r{i}")
    assert writer.dropped > 0
    got: list[marks.Record] = []
    while batch := reader.read():
        got += batch
    starts = [r.request_id for r in got if r.op == "S"]
    assert len(starts) + writer.dropped == total  # whole records only: each one is there or counted
    assert starts == sorted(starts, key=lambda rid: int(rid[1:]))


def test_a_writer_finds_a_restarted_control_planes_new_fifo(tmp_path: Path) -> None:
    path = tmp_path / "marks.fifo"
    writer = marks.MarkWriter(path)
    writer.start("w-1", "invoke", "lost")  # no control plane yet: dropped, no error
    assert writer.dropped == 1
    first = marks.MarkReader.open(path)
    writer._retry_at = 0.0  # its retry interval is 50 ms; the test does not wait for it
    writer.start("w-1", "invoke", "r1")
    assert [r.op for r in first.read()] == ["H", "S"]
    first.close()  # the control plane died: its FIFO has no reader
    second = marks.MarkReader.open(path)  # its successor makes a new one
    writer.start("w-2", "invoke", "r2")
    assert [(r.op, r.request_id) for r in second.read()] == [("H", ""), ("S", "r2")]
    writer.close()
    second.close()


# --- the control plane placing them in a worker's output, on real pipes ----------------------


class ListSink:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write_line(self, line: bytes) -> None:
        self.lines.append(line)

    def events(self) -> list[str]:
        out = []
        for line in self.lines:
            record = json.loads(line)
            out.append(f"<{record['marker']} {record['request_id']}>" if "marker" in record else record["event"])
        return out


class Worker:
    """A fake worker's two pipes, the control plane's WorkerOutput on them, and
    a data plane's writer: everything but the processes."""

    def __init__(self, path: Path, sink: ListSink, name: str = "fn-1-abc") -> None:
        self.name = name
        out_r, self.out = os.pipe()
        err_r, self.err = os.pipe()
        self.output = WorkerOutput(out_r, err_r, function="fn", worker=name, fmt="json")
        self.plane = marks.MarkWriter(path)
        self.sink = sink

    def stdout(self, data: bytes) -> None:
        os.write(self.out, data)

    def stderr(self, data: bytes) -> None:
        os.write(self.err, data)

    def exit(self) -> None:
        os.close(self.out)
        os.close(self.err)

    async def until(self, condition: Callable[[list[str]], bool]) -> list[str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not condition(events := self.sink.events()):
            assert loop.time() < deadline, events
            await asyncio.sleep(0.005)
        return events


def in_control_plane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     body: Callable[[Worker], Any]) -> list[str]:
    sink = ListSink()
    monkeypatch.setattr(control_output, "shared_sink", lambda component: sink)
    path = tmp_path / "marks.fifo"

    async def main() -> list[str]:
        listen_for_marks(path)
        worker = Worker(path, sink)
        try:
            result: list[str] = await body(worker)
            return result
        finally:
            worker.plane.close()
            stop_listening()

    return asyncio.run(main())


def test_markers_surround_the_invocations_lines_even_when_the_next_one_already_printed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(w: Worker) -> list[str]:
        # Everything happens before the control plane runs once: the worst case
        # for order (r1's end is asserted after r2 started and printed).
        w.plane.start(w.name, "invoke", "r1")
        w.stdout(b"\x1cS\x1fr1\n\x1er1\x1fone\nraw from C\n")
        w.stderr(b"raw stderr of r1\n")
        w.stdout(b"\x1cE\x1fr1\n")
        w.plane.end(w.name, "r1")
        w.plane.flush()
        w.plane.start(w.name, "invoke", "r2")
        w.stdout(b"\x1cS\x1fr2\n\x1er2\x1ftwo\nFC Invoke End RequestId: r2\n")
        return await w.until(lambda e: "FC Invoke End RequestId: r2" in e)

    events = in_control_plane(tmp_path, monkeypatch, body)
    assert events == ["<start r1>", "one", "raw from C", "raw stderr of r1", "<end r1>", "<start r2>", "two",
                      "FC Invoke End RequestId: r2"]  # the forged one: a line, and r2 goes on


def test_an_end_asserted_first_waits_for_the_lines_already_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(w: Worker) -> list[str]:
        w.plane.start(w.name, "invoke", "r1")
        w.stdout(b"\x1cS\x1fr1\n")
        await w.until(lambda e: "<start r1>" in e)
        # Timed out: the data plane gave up on r1 and the worker never wrote its end.
        w.stdout(b"late but before the timeout\n")
        w.plane.end(w.name, "r1")
        w.plane.flush()
        await w.until(lambda e: "<end r1>" in e)
        w.stdout(b"after the timeout\n")
        return await w.until(lambda e: "after the timeout" in e)

    assert in_control_plane(tmp_path, monkeypatch, body) == [
        "<start r1>", "late but before the timeout", "<end r1>", "after the timeout"]


def test_a_worker_that_dies_mid_invocation_still_gets_its_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(w: Worker) -> list[str]:
        w.plane.start(w.name, "invoke", "r1")
        w.stdout(b"\x1cS\x1fr1\nlast words\n")
        w.exit()
        await asyncio.gather(*w.output.tasks)
        w.plane.end(w.name, "r1")  # the data plane learns of the death after the pipes closed
        w.plane.flush()
        return await w.until(lambda e: "<end r1>" in e)

    assert in_control_plane(tmp_path, monkeypatch, body) == ["<start r1>", "last words", "<end r1>"]


def test_forged_boundaries_make_no_marker_and_a_restarted_data_plane_ends_what_was_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(w: Worker) -> list[str]:
        w.stdout(b"\x1cS\x1fvictim\nattributed to the victim, still a line\n\x1cE\x1fvictim\n")
        w.plane.start(w.name, "invoke", "r1")
        w.stdout(b"\x1cS\x1fr1\nworking\n")
        await w.until(lambda e: "working" in e)
        successor = marks.MarkWriter(w.plane.path)  # a new data plane: "H"
        successor.start("other-worker", "invoke", "x")
        successor.close()
        return await w.until(lambda e: "<end r1>" in e)

    assert in_control_plane(tmp_path, monkeypatch, body) == [
        "attributed to the victim, still a line", "<start r1>", "working", "<end r1>"]


def test_marker_lines_name_the_worker_and_cannot_be_confused_with_its_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(w: Worker) -> list[str]:
        w.plane.start(w.name, "invoke", "r1")
        w.stdout(b"\x1cS\x1fr1\nFC Invoke Start RequestId: r1\n\x1cE\x1fr1\n")
        w.plane.end(w.name, "r1")
        return await w.until(lambda e: "<end r1>" in e)

    lines: list[bytes] = []
    monkeypatch.setattr(ListSink, "write_line", lambda self, line: (self.lines.append(line), lines.append(line)))
    in_control_plane(tmp_path, monkeypatch, body)
    records = [json.loads(line) for line in lines]
    real = [r for r in records if "marker" in r]
    assert [(r["event"], r["component"], r["kind"], r["function"], r["worker"]) for r in real] == [
        ("FC Invoke Start RequestId: r1", "control-plane", "invoke", "fn", "fn-1-abc"),
        ("FC Invoke End RequestId: r1", "control-plane", "invoke", "fn", "fn-1-abc")]
    (forged,) = [r for r in records if "marker" not in r]
    assert (forged["event"], forged["component"], forged["stream"]) == (
        "FC Invoke Start RequestId: r1", "worker", "stdout")
    raw = b"\n".join(lines)
    assert raw.count(b"FC Invoke Start RequestId: r1") == 1  # the real one; the line's colon is escaped


@pytest.mark.parametrize("first", ["stdout", "stderr"])
def test_a_raw_stderr_line_stays_between_its_invocations_markers_whichever_pipe_wakes_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str) -> None:
    async def body(w: Worker) -> list[str]:
        w.plane.start(w.name, "invoke", "r1")
        w.stdout(b"\x1cS\x1fr1\nout\n")
        w.stderr(b"raw stderr of r1\n")  # fd 2: another pipe, no order with stdout's
        w.stdout(b"\x1cE\x1fr1\n")
        w.plane.end(w.name, "r1")
        w.plane.flush()
        # The loop's wake-ups, in the order under test (what the event loop would call).
        pumps = [w.output.stdout, w.output.stderr]
        for pump in pumps if first == "stdout" else pumps[::-1]:
            pump._on_readable()
        return await w.until(lambda e: "<end r1>" in e)

    events = in_control_plane(tmp_path, monkeypatch, body)
    assert events[0] == "<start r1>" and events[-1] == "<end r1>"
    assert sorted(events[1:-1]) == ["out", "raw stderr of r1"]
    assert [json.loads(line).get("request_id") for line in control_output._outputs["fn-1-abc"].sink.lines] == \
        ["r1"] * 4


# --- the lines themselves ---------------------------------------------------------------------


def test_a_marker_line_and_a_worker_line_with_the_same_text_differ_in_fields_and_in_raw_bytes() -> None:
    sink = ListSink()
    emit_marker_line(sink, kind="pre_freeze", phase="end", request_id="r1", function="fn", worker="w", fmt="json")
    emit_worker_line(sink, function="fn", worker="w", stream="stdout", text=b"FC PreFreeze End RequestId: r1",
                     request_id="r1", fmt="json")
    real, forged = (json.loads(line) for line in sink.lines)
    assert real["event"] == forged["event"] == "FC PreFreeze End RequestId: r1"
    assert (real["component"], real["marker"], real["kind"]) == ("control-plane", "end", "pre_freeze")
    assert forged["component"] == "worker" and "marker" not in forged and "kind" not in forged
    assert b"FC PreFreeze End RequestId: r1" in sink.lines[0]
    assert b"RequestId:" not in sink.lines[1] and b"RequestId\\u003a r1" in sink.lines[1]


def test_console_marker_lines_name_their_fields() -> None:
    sink = ListSink()
    emit_marker_line(sink, kind="invoke", phase="start", request_id="r1", function="fn", worker="w", fmt="console")
    line = sink.lines[0].decode()
    assert "FC Invoke Start RequestId: r1" in line and "component=control-plane" in line
    assert "marker=start kind=invoke" in line and line.endswith("\n")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    # Leave logging as other tests found it (not pointing at a closed StringIO).
    config = structlog.get_config()
    processors, write, fmt = list(logs._PROCESSORS), logs._OUTPUT.write, logs._format
    yield
    structlog.configure(**config)
    logs._PROCESSORS[:] = processors
    logs._OUTPUT.write, logs._format = write, fmt


def test_plane_lines_escape_the_marker_colon_unless_they_are_a_marker(restore_logging: None) -> None:
    buf = io.StringIO()
    configure_logging("data-plane", stream=buf)
    log = get_logger()
    log.error("hook failed", error_message="FC Invoke End RequestId: someone-else")  # user text in a plane line
    log.info("FC PreStop Start RequestId: r9", request_id="r9", marker="start", kind="pre_stop")
    escaped, real = buf.getvalue().splitlines()
    assert "RequestId:" not in escaped and json.loads(escaped)["error_message"] == "FC Invoke End RequestId: someone-else"
    assert '"event":"FC PreStop Start RequestId: r9"' in real
