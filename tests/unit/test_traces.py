"""Grouping a worker's printed tracebacks (``supervisor.control.traces``), with
traces Python itself formats: plain, chained both ways, exception groups,
SyntaxErrors, recursion, a thread's and an unraisable exception's headers."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.control.traces import Out, TraceGrouper, may_start

Key = tuple[str, str | None]


def lines_of(text: str) -> list[bytes]:
    return [line.encode() for line in text.splitlines()]


def formatted(make: Callable[[], None]) -> list[bytes]:
    try:
        make()
    except BaseException as exc:  # noqa: BLE001 - formatting whatever it raised
        return lines_of("".join(traceback.format_exception(exc)))
    raise AssertionError("did not raise")


def plain() -> None:
    def inner() -> None:
        {}["missing"]  # noqa: B018
    inner()


def context() -> None:
    try:
        plain()
    except KeyError:
        raise ValueError("while handling")  # noqa: B904 - the implicit chain is the point


def cause() -> None:
    try:
        plain()
    except KeyError as exc:
        raise RuntimeError("caused") from exc


def group() -> None:
    try:
        raise ExceptionGroup("outer", [ValueError(1), ExceptionGroup("inner", [TypeError(2), KeyError(3)])])
    except* ValueError:
        raise RuntimeError("during the group") from None


def recursion() -> None:
    def down(n: int) -> int:
        return down(n + 1) + 1
    down(0)


def syntax() -> None:
    compile("def (:\n", "<handler>", "exec")


def multiline_free_message() -> None:
    raise OSError(2, "No such file or directory")


def thread_trace() -> list[bytes]:
    """What threading's excepthook prints for an uncaught exception in a thread."""
    seen: list[str] = []

    def hook(args: threading.ExceptHookArgs) -> None:
        assert args.exc_value is not None
        seen.append(f"Exception in thread {args.thread.name if args.thread else '?'}:\n"
                    + "".join(traceback.format_exception(args.exc_value)))

    old, threading.excepthook = threading.excepthook, hook
    try:
        thread = threading.Thread(target=plain, name="worker-thread")
        thread.start()
        thread.join()
    finally:
        threading.excepthook = old
    return lines_of(seen[0])


TRACES = {
    "plain": formatted(plain),
    "context": formatted(context),
    "cause": formatted(cause),
    "group": formatted(group),
    "recursion": formatted(recursion),
    "syntax": formatted(syntax),
    "oserror": formatted(multiline_free_message),
    "thread": thread_trace(),
    "unraisable": [b"Exception ignored in: <function Thing.__del__ at 0x7f00>", *formatted(plain)],
    "bare_syntax": lines_of("".join(traceback.format_exception_only(SyntaxError(
        "invalid syntax", ("app.py", 3, 5, "def (:\n", 3, 6))))),
}


def event_of(trace: list[bytes]) -> bytes:
    """The line a trace's record is about: the raised exception's line."""
    if trace[0].strip().startswith(b"+ Exception Group") or any(b"+ Exception Group" in t for t in trace):
        return next(line[4:] for line in trace if line.startswith(b"  | ") and not line[4:5].isspace())
    return [line for line in trace if line and not line[:1].isspace()][-1]


def run(grouper: TraceGrouper, lines: list[tuple[Key, bytes]]) -> list[Out]:
    out: list[Out] = []
    for (stream, request_id), text in lines:
        out += grouper.feed(stream, request_id, text)
    return out + grouper.flush()


def flattened(out: list[Out]) -> list[tuple[Key, bytes]]:
    return [((o.stream, o.request_id), line) for o in out for line in o.lines]


@pytest.mark.parametrize("name", sorted(TRACES))
def test_each_kind_of_trace_is_one_record_about_its_exception(name: str) -> None:
    trace = TRACES[name]
    out = run(TraceGrouper(), [(("stderr", "r1"), line) for line in trace])
    assert out == [Out("stderr", "r1", tuple(trace), 0, True, event_of(trace))]


def test_the_examples_are_what_the_rules_talk_about() -> None:
    assert any(line.startswith(b"During handling") for line in TRACES["context"])
    assert any(line.startswith(b"The above exception was the direct cause") for line in TRACES["cause"])
    assert TRACES["group"][-1].startswith(b"  ") and any(b"Exception Group" in line for line in TRACES["group"])
    assert any(b"Previous line repeated" in line for line in TRACES["recursion"])
    assert TRACES["bare_syntax"][0].startswith(b'  File "app.py"')
    assert event_of(TRACES["cause"]).startswith(b"RuntimeError: caused")
    assert event_of(TRACES["group"]).startswith(b"ExceptionGroup")


def test_a_carriage_return_does_not_hide_a_trace() -> None:
    trace = [line + b"\r" for line in TRACES["cause"]]
    (out,) = run(TraceGrouper(), [(("stdout", None), line) for line in trace])
    assert out.trace and out.lines == tuple(trace) and out.event.startswith(b"RuntimeError: caused")


# --- what is not merged --------------------------------------------------------------

noise_text = st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=30).map(str.encode).filter(
    lambda b: not (b.startswith((b"Traceback", b"Exception in thread", b"Exception ignored in", b"  File \"",
                                 b"  + Exception Group", b"During handling", b"The above exception"))
                   or (b[:1] == b" " and b.lstrip(b" ")[:1] in (b"|", b"+"))))
keys = st.sampled_from([("stdout", None), ("stderr", None), ("stderr", "r1"), ("stdout", "r2")])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("trace"), st.sampled_from(sorted(TRACES)), keys),
                          st.tuples(st.just("noise"), noise_text, keys)), max_size=12))
def test_traces_among_other_lines_are_one_record_each_and_nothing_else_is_merged(
        script: list[tuple[str, object, Key]]) -> None:
    lines: list[tuple[Key, bytes]] = []
    expected: list[Out] = []
    for kind, what, key in script:
        if kind == "trace":
            trace = TRACES[str(what)]
            lines += [(key, line) for line in trace]
            expected.append(Out(key[0], key[1], tuple(trace), 0, True, event_of(trace)))
        else:
            assert isinstance(what, bytes)
            lines.append((key, what))
            expected.append(Out(key[0], key[1], (what,), 0, False, what))
    assert run(TraceGrouper(), lines) == expected


def test_an_empty_line_after_an_exception_not_followed_by_a_chain_is_its_own_line() -> None:
    trace = TRACES["plain"]
    key = ("stderr", None)
    out = run(TraceGrouper(), [(key, line) for line in [*trace, b"", b"next thing"]])
    assert [o.lines for o in out] == [tuple(trace), (b"",), (b"next thing",)]
    assert [o.trace for o in out] == [True, False, False]


def test_a_header_without_a_trace_is_its_own_line() -> None:
    key = ("stderr", None)
    out = run(TraceGrouper(), [(key, b"Exception in thread main:"), (key, b"just text")])
    assert [(o.lines, o.trace) for o in out] == [((b"Exception in thread main:",), False), ((b"just text",), False)]


def test_another_stream_or_request_ends_the_trace() -> None:
    trace = TRACES["plain"]
    lines = [(("stderr", "r1"), line) for line in trace[:3]] + [(("stdout", "r1"), b"printed")]
    lines += [(("stderr", "r1"), line) for line in trace[3:]]
    out = run(TraceGrouper(), lines)
    assert flattened(out) == lines
    assert out[0].trace and out[0].lines == tuple(trace[:3]) and out[1] == Out("stdout", "r1", (b"printed",), 0,
                                                                                False, b"printed")


def test_a_cut_line_starts_nothing_and_its_count_is_kept() -> None:
    grouper = TraceGrouper()
    assert grouper.feed("stderr", None, b"Traceback (most recent call last):", 10) == [
        Out("stderr", None, (b"Traceback (most recent call last):",), 10, False,
            b"Traceback (most recent call last):")]
    assert not grouper.open
    trace = TRACES["plain"]
    out: list[Out] = []
    for index, line in enumerate(trace):
        out += grouper.feed("stderr", None, line, 5 if index == 1 else 0)
    assert out + grouper.flush() == [Out("stderr", None, tuple(trace), 5, True, event_of(trace))]


def test_flush_gives_out_a_trace_cut_short() -> None:
    grouper = TraceGrouper()
    trace = TRACES["cause"]
    cut = trace.index(b"") + 2  # the separator and the empty line after it are held
    out: list[Out] = []
    for line in trace[:cut]:
        out += grouper.feed("stderr", None, line)
    assert out == [] and grouper.open
    flushed = grouper.flush()
    assert flushed == [Out("stderr", None, tuple(trace[:cut]), 0, True, event_of(TRACES["plain"]))]
    assert not grouper.open and grouper.flush() == []


# --- bounds and order ------------------------------------------------------------------


def test_a_trace_over_the_bounds_is_several_records_none_lost() -> None:
    trace = [b"Traceback (most recent call last):"]
    for i in range(50):
        trace += [f'  File "app.py", line {i}, in f{i}'.encode(), b"    " + b"x" * 60]
    trace.append(b"RecursionError: deep")
    grouper = TraceGrouper(max_lines=16, max_bytes=500)
    out = run(grouper, [(("stderr", None), line) for line in trace])
    assert all(o.trace for o in out) and len(out) > 1
    assert [line for o in out for line in o.lines] == trace
    assert all(len(o.lines) <= 16 and sum(map(len, o.lines)) <= 500 for o in out)
    assert out[-1].event == b"RecursionError: deep" and out[0].event == trace[0]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(keys, st.one_of(
    st.sampled_from([line for trace in TRACES.values() for line in trace] + [b"", b"x"]),
    st.binary(max_size=20).map(lambda b: b.replace(b"\n", b" ")))), max_size=60),
    st.integers(2, 10), st.integers(1, 300))
def test_every_line_comes_out_once_in_order_within_the_bounds(lines: list[tuple[Key, bytes]], max_lines: int,
                                                              max_bytes: int) -> None:
    grouper = TraceGrouper(max_lines=max_lines, max_bytes=max_bytes)
    out = run(grouper, lines)
    assert flattened(out) == lines
    assert not grouper.open
    for record in out:
        assert record.lines and (record.trace or len(record.lines) == 1)
        assert len(record.lines) <= max_lines
        assert len(record.lines) == 1 or sum(map(len, record.lines)) <= max_bytes
        assert record.event in record.lines or any(line.endswith(record.event) for line in record.lines)


def test_may_start_is_the_cheap_gate() -> None:
    for trace in TRACES.values():
        assert may_start(trace[0])
    assert not may_start(b"hello") and not may_start(b"") and not may_start(b"\x1a{}")


def test_bounds_must_make_sense() -> None:
    with pytest.raises(ValueError):
        TraceGrouper(max_lines=1)
    with pytest.raises(ValueError):
        TraceGrouper(max_bytes=0)
