"""The log pump's pure parts (splitting, attribution), the pump on a pipe, and
the worker-side stream that produces what the pump parses."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import termios
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import worker.output as wo
from supervisor.control.logpump import Attributor, LineSplitter, Pump, _stderr_as_tagged, parse_boundary, pump
from worker.output import TaggedStream, current_request_id, marker


class ListSink:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write_line(self, line: bytes) -> None:
        self.lines.append(line)

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines]


def reference(data: bytes, max_line: int) -> list[tuple[bytes, int]]:
    """What splitting the whole input at once must give."""
    pieces = data.split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()
    return [(p[:max_line], max(0, len(p) - max_line)) for p in pieces]


def feed_all(splitter: LineSplitter, chunks: list[bytes]) -> list[tuple[bytes, int]]:
    out: list[tuple[bytes, int]] = []
    for chunk in chunks:
        out += splitter.feed(chunk)
    return out + splitter.flush()


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# --- LineSplitter -----------------------------------------------------------------

line_bytes = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"x"))


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.one_of(line_bytes, st.just(b"\n"), st.just(b"\r\n"), st.binary(max_size=8)), max_size=40),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
    st.integers(min_value=1, max_value=24),
)
def test_any_chunking_gives_the_lines_of_splitting_at_once(
    parts: list[bytes], cuts: list[int], max_line: int
) -> None:
    data = b"".join(parts)
    assert feed_all(LineSplitter(max_line), chunked(data, cuts)) == reference(data, max_line)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=7))
def test_byte_by_byte_feeding(data: bytes, max_line: int) -> None:
    splitter = LineSplitter(max_line)
    assert feed_all(splitter, [data[i : i + 1] for i in range(len(data))]) == reference(data, max_line)


def test_truncation_counts_are_exact() -> None:
    splitter = LineSplitter(10)
    out = splitter.feed(b"0123456789ABCDEF\nshort\n" + b"y" * 25)
    out += splitter.feed(b"y" * 5 + b"\ntail")
    assert out == [(b"0123456789", 6), (b"short", 0), (b"y" * 10, 20)]
    assert splitter.flush() == [(b"tail", 0)]
    assert splitter.flush() == []


def test_a_line_of_exactly_max_line_is_not_truncated() -> None:
    splitter = LineSplitter(4)
    assert splitter.feed(b"abcd\nabcde\n") == [(b"abcd", 0), (b"abcd", 1)]


def test_empty_lines_are_lines() -> None:
    assert LineSplitter().feed(b"\n\n") == [(b"", 0), (b"", 0)]


def test_ten_megabytes_without_newline_stay_in_o_max_line() -> None:
    max_line = 16 * 1024
    splitter = LineSplitter(max_line)
    chunk = b"z" * 65536
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(160):  # 10 MiB, no newline
            assert splitter.feed(chunk) == []
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 4 * max_line
    ((line, truncated),) = splitter.feed(b"end\n")
    assert line == b"z" * max_line and truncated == 160 * 65536 + 3 - max_line


def test_flood_of_short_lines() -> None:
    splitter = LineSplitter(64)
    data = b"".join(b"line %d\n" % i for i in range(50_000))
    got = feed_all(splitter, [data[i : i + 65536] for i in range(0, len(data), 65536)])
    assert [line for line, _ in got] == [b"line %d" % i for i in range(50_000)]


def test_max_line_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LineSplitter(0)


# --- Attributor and boundary records ---------------------------------------------


def test_tagged_lines_carry_their_request() -> None:
    attr = Attributor()
    assert attr.attribute(b"\x1ereq-1\x1fhello") == ("req-1", b"hello")
    assert attr.attribute(b"\x1eA.b:c_9-0\x1f") == ("A.b:c_9-0", b"")
    assert attr.attribute(b"\x1e" + b"a" * 127 + b"\x1fx") == ("a" * 127, b"x")


@pytest.mark.parametrize(
    "line",
    [
        b"\x1e\x1fempty id",
        b"\x1e" + b"a" * 128 + b"\x1ftoo long",
        b"\x1eno separator at all",
        b"\x1ebad id\x1fspace",
        b"\x1ebad/id\x1fslash",
        b"\x1e\xff\x1fbinary",
        b"x\x1ereq\x1fnot at the start",
    ],
)
def test_malformed_tags_are_plain_text(line: bytes) -> None:
    attr = Attributor()
    assert attr.attribute(line) == (None, line)
    attr.boundary("S", "r9")
    assert attr.attribute(line) == ("r9", line)  # plain text: attributed by the boundaries


def test_boundary_records_parse() -> None:
    assert parse_boundary(b"\x1cS\x1freq-1") == ("S", "req-1")
    assert parse_boundary(b"\x1cE\x1fA.b:c_9-0\r") == ("E", "A.b:c_9-0")
    assert parse_boundary(b"\x1cS\x1f" + b"a" * 127) == ("S", "a" * 127)


@pytest.mark.parametrize(
    "line",
    [
        b"\x1cS\x1f",
        b"\x1cX\x1freq",
        b"\x1cS\x1f" + b"a" * 128,
        b"\x1cS\x1freq trailing",
        b"\x1cSreq",
        b" \x1cS\x1freq",
        b"\x1cS\x1fbad/id",
        b"FC Invoke Start RequestId: r1",
    ],
)
def test_near_records_are_text(line: bytes) -> None:
    assert parse_boundary(line) is None


def test_boundaries_attribute_untagged_lines() -> None:
    attr = Attributor()
    assert attr.attribute(b"before") == (None, b"before")
    attr.boundary("S", "r-1")
    assert attr.attribute(b"from C code") == ("r-1", b"from C code")
    assert attr.attribute(b"\x1eother\x1ftagged") == ("other", b"tagged")
    attr.boundary("E", "r-1")
    assert attr.attribute(b"after") == (None, b"after")


def test_overlapping_requests_leave_untagged_lines_unattributed() -> None:
    attr = Attributor()
    attr.boundary("S", "a")
    attr.boundary("S", "b")
    assert attr.attribute(b"whose?") == (None, b"whose?")
    attr.boundary("E", "a")
    assert attr.attribute(b"b's") == ("b", b"b's")
    attr.boundary("E", "b")
    assert attr.current is None


def test_forged_start_records_do_not_grow_state() -> None:
    attr = Attributor()
    for i in range(10_000):
        attr.boundary("S", f"r{i}")
    for i in range(10_000 - 64, 10_000 - 1):
        attr.boundary("E", f"r{i}")
    assert attr.current == "r9999"  # only the newest 64 were kept open


events = st.lists(
    st.one_of(
        st.tuples(st.just("start"), st.sampled_from(["a", "b", "c"])),
        st.tuples(st.just("end"), st.sampled_from(["a", "b", "c"])),
        st.tuples(st.just("tagged"), st.sampled_from(["a", "b", "x.y"])),
        st.tuples(st.just("plain"), st.just("")),
    ),
    max_size=40,
)


@given(events)
def test_attribution_matches_a_model(script: list[tuple[str, str]]) -> None:
    attr = Attributor()
    open_ids: list[str] = []
    for what, request_id in script:
        if what == "start":
            if request_id not in open_ids:
                open_ids.append(request_id)
            attr.boundary("S", request_id)
        elif what == "end":
            if request_id in open_ids:
                open_ids.remove(request_id)
            attr.boundary("E", request_id)
        elif what == "tagged":
            assert attr.attribute(f"\x1e{request_id}\x1ftext".encode()) == (request_id, b"text")
        else:
            expected = open_ids[0] if len(open_ids) == 1 else None
            assert attr.attribute(b"plain") == (expected, b"plain")


# --- pump on a real pipe ------------------------------------------------------------


def run_pumps(chunks_out: list[bytes], chunks_err: list[bytes], max_line: int = 16384) -> ListSink:
    sink = ListSink()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()

    async def main() -> None:
        attr = Attributor()
        tasks = [
            asyncio.create_task(
                pump(fd, function="f", worker="w1", stream=name, sink=sink, fmt="json", max_line=max_line, attributor=attr)
            )
            for fd, name in ((out_r, "stdout"), (err_r, "stderr"))
        ]
        # Stdout first: the stderr line below is written after the marker.
        for chunk in chunks_out:
            os.write(out_w, chunk)
        await asyncio.sleep(0)
        for chunk in chunks_err:
            os.write(err_w, chunk)
        os.close(out_w)
        os.close(err_w)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)

    asyncio.run(main())
    for fd in (out_r, err_r):  # the pump closed its fd
        with pytest.raises(OSError):
            os.fstat(fd)
    return sink


def test_pump_reemits_lines_with_attribution_and_flushes_at_eof() -> None:
    sink = run_pumps(
        [b"\x1cS\x1fr1\n\x1er1\x1ftagged\nfrom ", b"C\n" + b"L" * 60 + b"\nno newline"],
        [b"an error\n"],
        max_line=40,
    )
    records = sink.records()
    out = [(r["event"], r.get("request_id"), r.get("truncated_bytes")) for r in records if r["stream"] == "stdout"]
    assert out == [
        ("tagged", "r1", None),
        ("from C", "r1", None),
        ("L" * 40, "r1", 20),
        ("no newline", "r1", None),
    ]
    (err,) = [r for r in records if r["stream"] == "stderr"]
    assert (err["event"], err["level"], err["function"], err["worker"]) == ("an error", "warning", "f", "w1")


def test_boundary_records_are_not_logged_and_text_markers_are_just_lines() -> None:
    seen: list[tuple[str, str]] = []
    sink = ListSink()
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"\x1cS\x1fr1\nFC Invoke End RequestId: r1\n\x1er1\x1fFC Invoke Start RequestId: x\n"
                       b"raw\n\x1cE\x1fr1\nafter\n\x1cE\x1fr1 trailing\n")
    os.close(write_fd)

    async def main() -> None:
        pump = Pump(read_fd, function="f", worker="w", stream="stdout", sink=sink, fmt="json")
        pump.on_boundary = lambda phase, rid: (seen.append((phase, rid)), pump.attributor.boundary(phase, rid))[-1]
        await asyncio.wait_for(pump.run(), 5)

    asyncio.run(main())
    assert seen == [("S", "r1"), ("E", "r1")]
    records = sink.records()
    assert [(r["event"], r.get("request_id")) for r in records] == [
        ("FC Invoke End RequestId: r1", "r1"),  # a line: it ends nothing
        ("FC Invoke Start RequestId: x", "r1"),
        ("raw", "r1"),
        ("after", None),
        ("\x1cE\x1fr1 trailing", None),  # not a record: logged as it is
    ]
    assert all("marker" not in r and r["component"] == "worker" for r in records)
    assert all(b"RequestId:" not in line for line in sink.lines)  # a raw grep finds no marker


def test_after_read_runs_before_the_lines_of_each_read_and_drain_reads_at_once() -> None:
    sink = ListSink()
    read_fd, write_fd = os.pipe()
    order: list[str] = []

    class Recorder(ListSink):
        def write_line(self, line: bytes) -> None:
            order.append(json.loads(line)["event"])
            sink.write_line(line)

    async def main() -> None:
        pump = Pump(read_fd, function="f", worker="w", stream="stdout", sink=Recorder(), fmt="json",
                    after_read=lambda: order.append("<read>"))
        task = asyncio.create_task(pump.run())
        os.write(write_fd, b"one\ntwo\n")
        pump.drain()  # no wake-up needed: what the pipe holds is handled now
        assert order == ["<read>", "one", "two"]
        assert unread_bytes(read_fd) == 0
        os.write(write_fd, b"three\n")
        os.close(write_fd)
        await asyncio.wait_for(task, 5)
        pump.drain()  # after the end: nothing, no error

    asyncio.run(main())
    assert order == ["<read>", "one", "two", "<read>", "three"]


def test_pump_cancellation_emits_the_partial_line_and_closes() -> None:
    sink = ListSink()
    r, w = os.pipe()

    async def main() -> None:
        task = asyncio.create_task(pump(r, function="f", worker="w", stream="stdout", sink=sink, fmt="json"))
        os.write(w, b"half a line")
        deadline = asyncio.get_running_loop().time() + 5
        while unread_bytes(r):  # until the pump holds it as a partial line
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    os.close(w)
    assert [json.loads(line)["event"] for line in sink.lines] == ["half a line"]


def unread_bytes(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


# --- the worker side: TaggedStream -> pipe -> splitter + attributor -------------------


@pytest.fixture
def tagged() -> Iterator[tuple[TaggedStream, int]]:
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)  # room for every test's output: no reader thread
    stream = TaggedStream(w, "<stdout>")
    saved = wo._stdout
    wo._stdout = stream  # marker() writes through it, as after install()
    try:
        yield stream, r
    finally:
        wo._stdout = saved
        os.close(w)
        os.close(r)


def parsed(read_fd: int) -> list[tuple[str | None, bytes]]:
    """What the pump makes of the pipe: ``(request_id, text)`` per line, and
    ``("<S>" | "<E>", request_id)`` per boundary record."""
    os.set_blocking(read_fd, False)
    data = os.read(read_fd, 1 << 20)
    attr = Attributor()
    out: list[tuple[str | None, bytes]] = []
    for line, _ in LineSplitter().feed(data):
        boundary = parse_boundary(line)
        if boundary is not None:
            attr.boundary(*boundary)
            out.append((f"<{boundary[0]}>", boundary[1].encode()))
        else:
            out.append(attr.attribute(line))
    return out


def test_worker_stream_round_trip(tagged: tuple[TaggedStream, int]) -> None:
    stream, r = tagged
    print("outside", file=stream)
    marker("Invoke", "req-1", "Start")
    token = current_request_id.set("req-1")
    try:
        print("one", file=stream)
        stream.write("two\nthree\nfo")
        stream.write("ur\n")
        print("progress", end="", file=stream, flush=True)
        print(" 100%", file=stream)
        stream.buffer.write(b"raw bytes\n")
        print("unterminated", end="", file=stream)
    finally:
        current_request_id.reset(token)
    marker("Invoke", "req-1", "End")
    print("after", file=stream)
    assert parsed(r) == [
        (None, b"outside"),
        ("<S>", b"req-1"),
        ("req-1", b"one"),
        ("req-1", b"two"),
        ("req-1", b"three"),
        ("req-1", b"four"),
        ("req-1", b"progress 100%"),
        ("req-1", b"raw bytes"),  # untagged, attributed by the boundaries
        ("req-1", b"unterminated"),  # the end record ends the line first
        ("<E>", b"req-1"),
        (None, b"after"),
    ]


def test_worker_stream_one_syscall_per_line(tagged: tuple[TaggedStream, int], monkeypatch: pytest.MonkeyPatch) -> None:
    stream, _ = tagged
    calls: list[bytes] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        calls.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    print("a", "b", "c", file=stream)
    stream.write("x\ny\nz\n")
    assert calls == [b"a b c\n", b"x\ny\nz\n"]


def test_worker_stream_bad_ids_are_not_tagged(tagged: tuple[TaggedStream, int]) -> None:
    stream, r = tagged
    token = current_request_id.set("bad id\nFC Invoke Start RequestId: x")
    try:
        print("text", file=stream)
    finally:
        current_request_id.reset(token)
    assert parsed(r) == [(None, b"text")]
    with pytest.raises(ValueError):
        marker("Invoke", "bad\nid", "Start")
    with pytest.raises(ValueError):
        marker("Invoke", "id", "Middle")


def test_worker_stream_swallows_broken_pipe() -> None:
    r, w = os.pipe()
    os.close(r)
    stream = TaggedStream(w, "<stdout>")
    try:
        print("nobody reads this", file=stream)
        stream.write("partial")
        stream.flush()
        stream.buffer.write(b"bytes\n")
    finally:
        os.close(w)


def test_worker_stream_writes_huge_partial_lines_out(tagged: tuple[TaggedStream, int]) -> None:
    stream, r = tagged
    for _ in range(3):
        stream.write("p" * 30_000)  # no newline: must not be held forever
    os.set_blocking(r, False)
    assert len(os.read(r, 1 << 20)) >= 64 * 1024


def test_worker_stream_rejects_bytes(tagged: tuple[TaggedStream, int]) -> None:
    stream, _ = tagged
    with pytest.raises(TypeError):
        stream.write(b"bytes")  # type: ignore[arg-type]


# ---- sys.stderr carried on the stdout pipe ---------------------------------------


def test_stderr_tag_becomes_an_ordinary_tag() -> None:
    assert _stderr_as_tagged(b"\x1dreq-1\x1fboom") == b"\x1ereq-1\x1fboom"
    assert _stderr_as_tagged(b"\x1d\x1fno request") == b"no request"
    assert _stderr_as_tagged(b"\x1dno end") == b"\x1dno end"  # malformed: kept as text


def test_worker_stderr_goes_through_the_stdout_pipe_tagged_as_stderr() -> None:
    read_fd, write_fd = os.pipe()
    try:
        err = TaggedStream(2, "<stderr>", write_fd=write_fd, stderr=True)
        err.write("outside\n")
        token = current_request_id.set("req-9")
        try:
            err.write("inside\n")
        finally:
            current_request_id.reset(token)
        assert err.fileno() == 2  # what user code sees is still stderr
        assert os.read(read_fd, 1024) == b"\x1d\x1foutside\n\x1dreq-9\x1finside\n"
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_pump_keeps_stderr_lines_in_order_between_boundaries() -> None:
    read_fd, write_fd = os.pipe()
    sink = ListSink()
    os.write(write_fd, b"\x1cS\x1fr1\n\x1dr1\x1foops\n\x1d\x1fbare\n\x1d\x1f\x1cE\x1fr1\nlast\n\x1cE\x1fr1\n")
    os.close(write_fd)
    asyncio.run(asyncio.wait_for(pump(read_fd, function="f", worker="w", stream="stdout", sink=sink, fmt="json"), 5))
    records = [json.loads(line) for line in sink.lines]
    assert [(r["event"], r["stream"], r.get("request_id")) for r in records] == [
        ("oops", "stderr", "r1"),
        ("bare", "stderr", "r1"),  # untagged: the open request, by the boundaries
        ("\x1cE\x1fr1", "stderr", "r1"),  # a record written to sys.stderr is a stderr line
        ("last", "stdout", "r1"),
    ]


def test_stderr_lines_wait_for_stdout_up_to_its_next_end_boundary() -> None:
    """A raw fd-2 line was written after the start boundaries already in the
    stdout pipe: the stderr pump catches stdout up to its next end boundary
    first, and stdout's rest follows right after, without another wake-up."""
    sink = ListSink()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    seen: list[tuple[str, str]] = []

    async def main() -> None:
        attr = Attributor()
        out = Pump(out_r, function="f", worker="w", stream="stdout", sink=sink, fmt="json", attributor=attr)
        out.on_boundary = lambda phase, rid: (seen.append((phase, rid)), attr.boundary(phase, rid))[-1]
        err = Pump(err_r, function="f", worker="w", stream="stderr", sink=sink, fmt="json", attributor=attr,
                   before_lines=out.catch_up)
        tasks = [asyncio.create_task(out.run()), asyncio.create_task(err.run())]
        await asyncio.sleep(0)  # both pumps registered
        os.write(out_w, b"\x1cS\x1fr1\nout\n\x1cE\x1fr1\nnext\n")
        os.write(err_w, b"raw err\n")
        err._on_readable()  # the stderr pipe wakes first
        assert [json.loads(line)["event"] for line in sink.lines] == ["out", "raw err"]
        assert unread_bytes(out_r) == 0  # all read: no wake-up of stdout will come for the rest
        await asyncio.sleep(0)
        assert [json.loads(line)["event"] for line in sink.lines] == ["out", "raw err", "next"]
        for fd in (out_w, err_w):
            os.close(fd)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)

    asyncio.run(main())
    assert seen == [("S", "r1"), ("E", "r1")]
    assert [json.loads(line).get("request_id") for line in sink.lines] == ["r1", "r1", None]
