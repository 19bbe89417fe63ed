"""Capture of a worker's stdout/stderr pipe, line by line, into the log.

Rules and invariants (the contract: docs/logging.md):

* The worker is never slowed down by its own logging beyond the cost of
  parsing: the pump reads whatever arrives, as fast as it arrives, and never
  stops reading. Pressure downstream is absorbed by the bounded sink
  (:class:`supervisor.output.BoundedLineWriter`), which drops and counts.
* Memory is O(``max_line``) per pipe whatever the worker writes: a line
  longer than ``max_line`` keeps its first ``max_line`` bytes; the rest is
  counted and discarded as it arrives, never buffered. The count is reported
  as ``truncated_bytes`` on that line, which is therefore emitted when its
  newline (or EOF) arrives, not when it reaches ``max_line``: one line, one
  log record, with an exact count.
* Request attribution. A line written by the worker's Python code carries
  the request id as a tag: ``b"\\x1e" + request_id + b"\\x1f" + text``
  (see :mod:`worker.output`). A tag is valid when the id is 1..127 bytes of
  ``[A-Za-z0-9._:-]``; anything else is plain text, kept as it is. Untagged
  lines (C code, subprocesses) are attributed by the boundary records the
  worker runtime writes on stdout around each invocation and hook,
  ``b"\\x1c" + (b"S" | b"E") + b"\\x1f" + request_id``: between a start and
  its end, untagged lines get that id. When several requests are open at
  once (concurrency > 1) an untagged line could belong to any of them, so it
  gets none rather than a guess. Records only count on stdout, untagged and
  at the start of a line; they are never logged themselves (they go to
  ``on_boundary``). User code can write them too: that only confuses the
  attribution of its own lines. FC's markers are not the worker's text:
  :mod:`supervisor.control.output` places them on the data plane's word, and
  a worker line that reads like one is logged as that worker's line.
* Hooks for the markers: ``after_read`` runs after every read of the pipe
  and before the lines of that read are handled (the control plane reads the
  data plane's assertions there); ``before_lines`` runs after a wake-up's
  read, before its lines (the stderr pump catches the stdout pump up to its
  next end boundary there: a raw write to fd 2 came after the boundaries
  already in the stdout pipe). :meth:`Pump.drain` reads and handles what the
  pipe holds now, :meth:`Pump.catch_up` the same up to the next end
  boundary, both at once, from outside the pump's own wake-ups; neither
  runs while the pump is handling lines (it would overtake them).
* Cost. After a read that drained the pipe the pump pauses for
  ``BATCH_DELAY_S`` so that lines gather (a pipe of ``PIPE_SIZE`` holds
  them); one wake-up then handles many lines instead of one each. A worker
  writing faster than that gets full reads without pause.
* Tracebacks. A Python traceback a worker prints (on either stream, from
  any process of it) is one log record, not one per line: each pump feeds
  its lines through a :class:`supervisor.control.traces.TraceGrouper`
  (bounded, order-keeping, never merging unrelated lines; see there). An
  open trace goes out when a line ends it, when nothing followed it for
  ``TRACE_IDLE_S``, before a boundary record is handled, before the
  worker's end boundary shows its End marker (for the stderr pipe:
  :meth:`Pump.flush_trace`), and when the pipe ends.
* Order. Two pipes give no order between them, so the worker writes its
  Python-level stderr into the stdout pipe as ``b"\\x1d" + id + b"\\x1f" +
  text`` (empty id outside a request): such a line is logged with
  ``stream: "stderr"`` and keeps its place between the boundaries. Only raw
  writes to fd 2 (C code, child processes) use the stderr pipe.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
from collections.abc import Callable

from supervisor.control.traces import TRACE_IDLE_S, Out, TraceGrouper, may_start
from supervisor.logs import LineSink, emit_worker_line, emit_worker_trace

__all__ = ["DEFAULT_MAX_LINE", "READ_SIZE", "Attributor", "LineSplitter", "Pump", "parse_boundary", "pump"]

DEFAULT_MAX_LINE = 16 * 1024
READ_SIZE = 64 * 1024

TAG_START = b"\x1e"
STDERR_TAG_START = b"\x1d"  # a sys.stderr line carried on the stdout pipe
BOUNDARY_START = b"\x1c"  # the worker runtime's start/end of an invocation
BATCH_DELAY_S = 0.005
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
TAG_END = b"\x1f"
MAX_TAG_ID = 127

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,127}")
_BOUNDARY = re.compile(rb"\x1c([SE])\x1f([A-Za-z0-9._:-]{1,127})\r?")
# Start records without an end (forged ones) must not grow memory.
_MAX_OPEN_REQUESTS = 64


class LineSplitter:
    """Split a byte stream into lines of at most ``max_line`` bytes.

    :meth:`feed` returns ``(line, truncated)`` pairs: the line without its
    ``\\n`` (cut to ``max_line`` bytes) and how many bytes were cut. Only the
    current partial line is kept between calls, at most ``max_line`` bytes.
    """

    __slots__ = ("_max", "_partial", "_cut")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self._max = max_line
        self._partial = bytearray()
        self._cut = 0  # bytes of the partial line already discarded

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        # bytes.split runs in C; a per-line find() loop in Python is slower
        # for the short-line floods that matter.
        pieces = data.split(b"\n")
        tail = pieces.pop()
        out: list[tuple[bytes, int]] = []
        if pieces:
            limit = self._max
            rest = iter(pieces)
            if self._partial or self._cut:
                self._keep(next(rest))
                out.append((bytes(self._partial), self._cut))
                self._partial.clear()
                self._cut = 0
            for piece in rest:
                if len(piece) > limit:
                    out.append((piece[:limit], len(piece) - limit))
                else:
                    out.append((piece, 0))
        if tail:
            self._keep(tail)
        return out

    def flush(self) -> list[tuple[bytes, int]]:
        """The unterminated last line, if any (at EOF)."""
        if not self._partial and not self._cut:
            return []
        line = (bytes(self._partial), self._cut)
        self._partial.clear()
        self._cut = 0
        return [line]

    def _keep(self, piece: bytes) -> None:
        room = self._max - len(self._partial)
        if len(piece) <= room:
            self._partial += piece
        else:
            self._partial += piece[:room]
            self._cut += len(piece) - room


def parse_boundary(line: bytes) -> tuple[str, str] | None:
    """``("S" | "E", request_id)`` for a boundary record line, else None."""
    match = _BOUNDARY.fullmatch(line)
    if match is None:
        return None
    return match.group(1).decode("ascii"), match.group(2).decode("ascii")


class Attributor:
    """Which request a worker's output line belongs to (see the module docstring)."""

    __slots__ = ("_open", "_current")

    def __init__(self) -> None:
        self._open: dict[str, None] = {}  # insertion-ordered set of open request ids
        self._current: str | None = None

    @property
    def current(self) -> str | None:
        """The id untagged lines get now: the only open request, or None."""
        return self._current

    def boundary(self, phase: str, request_id: str) -> None:
        """A start (``"S"``) or end (``"E"``) record for ``request_id``."""
        if phase == "S":
            self._open[request_id] = None
            if len(self._open) > _MAX_OPEN_REQUESTS:
                del self._open[next(iter(self._open))]
        else:
            self._open.pop(request_id, None)
        self._current = next(iter(self._open)) if len(self._open) == 1 else None

    def attribute(self, line: bytes) -> tuple[str | None, bytes]:
        """Return ``(request_id, text)`` for one line (no trailing newline)."""
        if line.startswith(TAG_START):
            end = line.find(TAG_END, 1, MAX_TAG_ID + 2)
            if end > 1:
                tagged = line[1:end]
                if _REQUEST_ID.fullmatch(tagged):
                    return tagged.decode("ascii"), line[end + 1 :]
        return self._current, line


def _enlarge_pipe(fd: int) -> int:
    """Room for what a worker writes while the pump gathers (best effort); the pipe's size."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size for an unprivileged user: keep the default
    try:
        return int(fcntl.fcntl(fd, F_GETPIPE_SZ))
    except OSError:
        return PIPE_SIZE  # not a pipe (a test's file): read this much at most per drain


def _stderr_as_tagged(line: bytes) -> bytes:
    """A stderr line from the stdout pipe, as the ordinary tagged form.

    ``\x1d<id>\x1f<text>`` -> ``\x1e<id>\x1f<text>``; with an empty id, just
    ``<text>`` (attributed like any untagged line). Malformed: unchanged.
    """
    end = line.find(TAG_END, 1, MAX_TAG_ID + 2)
    if end < 1:
        return line
    if end == 1:
        return line[2:]
    return TAG_START + line[1:]


class Pump:
    """Re-emits every line read from ``fd`` (see :meth:`run`)."""

    __slots__ = ("fd", "function", "worker", "stream", "sink", "fmt", "component", "capacity", "attributor",
                 "on_boundary", "after_read", "before_lines", "_splitter", "_boundaries", "_held", "_busy",
                 "_loop", "_finished", "_outcome", "closed", "_traces", "_trace_at", "_trace_timer")

    def __init__(
        self,
        fd: int,
        *,
        function: str,
        worker: str,
        stream: str,
        sink: LineSink,
        fmt: str,
        max_line: int = DEFAULT_MAX_LINE,
        attributor: Attributor | None = None,
        component: str = "worker",
        on_boundary: Callable[[str, str], None] | None = None,
        after_read: Callable[[], None] | None = None,
        before_lines: Callable[[], None] | None = None,
    ) -> None:
        self.fd = fd
        self.function = function
        self.worker = worker
        self.stream = stream
        self.sink = sink
        self.fmt = fmt
        self.component = component
        self.attributor = attributor if attributor is not None else Attributor()
        self.on_boundary = on_boundary if on_boundary is not None else self.attributor.boundary
        self.after_read = after_read
        self.before_lines = before_lines
        self._splitter = LineSplitter(max_line)
        self._traces = TraceGrouper()
        self._trace_at = 0.0  # loop time of the open trace's last line
        self._trace_timer: asyncio.TimerHandle | None = None
        self._boundaries = stream == "stdout"
        self._held: list[tuple[bytes, int]] = []  # lines read, not handled yet (see catch_up)
        self._busy = False  # handling lines: a nested drain would overtake them
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finished: asyncio.Future[None] | None = None
        self._outcome: BaseException | None | bool = False  # False: still reading
        self.closed = False
        # Non-blocking at once: drain() may run before run() does. Safe: no
        # other process shares this end's file description.
        os.set_blocking(fd, False)
        self.capacity = _enlarge_pipe(fd)

    async def run(self) -> None:
        """Re-emit every line until EOF (or cancellation), then close ``fd``.

        ``stream`` is ``"stdout"`` or ``"stderr"``; pass the same
        ``attributor`` to both pumps of one worker. On EOF or cancellation the
        unterminated last line is emitted too. A worker's child that
        inherited the pipe keeps it open after the worker exits: the caller
        cancels the pump after a grace period then.
        """
        loop = self._loop = asyncio.get_running_loop()
        self._finished = loop.create_future()
        try:
            if self._outcome is False:
                loop.add_reader(self.fd, self._on_readable)
                await self._finished
            elif isinstance(self._outcome, BaseException):
                raise self._outcome
        finally:
            self._close()

    def drain(self, limit: int | None = None) -> None:
        """Reads and re-emits what the pipe holds now (at most ``limit`` bytes,
        by default the pipe's size: what it held before the call), without
        waiting for more. Does nothing while this pump is handling lines."""
        if self._busy:
            return
        self._handle()
        limit = self.capacity if limit is None else limit
        taken = 0
        while taken < limit:
            size = self._read()
            self._handle()
            taken += size
            if size < READ_SIZE:
                return

    def catch_up(self, limit: int = READ_SIZE) -> None:
        """Like :meth:`drain`, but stops before the first end boundary: what
        the other pipe of the worker holds may have been written before it.
        One read by default, so that a flood does not take turns from other
        workers' pipes."""
        if self._busy:
            return
        taken = 0
        while self._handle(until_end=True):
            if taken >= limit:
                return
            size = self._read()
            taken += size
            if size == 0:
                return
        # Stopped before an end boundary: the rest is handled right after the
        # caller's lines, not only when this pipe wakes up again.
        if self._loop is not None:
            self._loop.call_soon(self._handle)

    def flush_trace(self) -> None:
        """Logs the open traceback as it stands (the worker's invocation ended)."""
        if self._traces.open and not self._busy:
            self._write(self._traces.flush())

    # ---- internals ------------------------------------------------------------

    def _on_readable(self) -> None:
        # One read per wake-up: with many workers, the loop round-robins
        # between their pipes instead of draining one flood first.
        size = self._read()
        if self.before_lines is not None and size:
            self._busy = True  # what before_lines handles must not drain this pipe past the lines just read
            try:
                self.before_lines()
            finally:
                self._busy = False
        self._handle()
        if 0 < size < READ_SIZE and self._outcome is False and self._loop is not None:
            # The pipe is drained: let lines gather for a moment instead of
            # waking for each one (a handler's few lines and the worker's two
            # boundaries would otherwise cost several wake-ups of this process
            # per invocation). A flood keeps full reads coming without pause.
            self._loop.remove_reader(self.fd)
            self._loop.call_later(BATCH_DELAY_S, self._resume)

    def _resume(self) -> None:
        if self._outcome is False and not self.closed and self._loop is not None:
            self._loop.add_reader(self.fd, self._on_readable)

    def _read(self) -> int:
        """One read into the held lines; its size (0: nothing now, or the end)."""
        if self._outcome is not False or self.closed:
            return 0
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return 0
        except OSError:
            data = b""  # EIO and the like: nothing more will come
        if not data:
            self._end(None)
            return 0
        try:
            if self.after_read is not None:
                self.after_read()
            self._held += self._splitter.feed(data)
        except Exception as exc:
            self._end(exc)
            return 0
        return len(data)

    def _handle(self, until_end: bool = False) -> bool:
        """Emits the held lines, or with ``until_end`` those before the first
        end boundary; False when it stopped there."""
        if not self._held or self._busy:
            return True
        lines, self._held = self._held, []
        self._busy = True
        try:
            done = self._emit(lines, until_end)
        except Exception as exc:
            # A bug here must end the pump visibly, not fail on every wake-up.
            self._end(exc)
            return True
        finally:
            self._busy = False
        if done < len(lines):
            self._held = lines[done:] + self._held
            return False
        return True

    def _end(self, exc: BaseException | None) -> None:
        if self._outcome is not False:
            return
        self._outcome = exc
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
        finished = self._finished
        if finished is not None and not finished.done():
            if exc is None:
                finished.set_result(None)
            else:
                finished.set_exception(exc)

    def _close(self) -> None:
        if self.closed:
            return
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
        try:
            self._held += self._splitter.flush()
            self._handle()
            self._write(self._traces.flush())
        finally:
            self.closed = True
            if self._trace_timer is not None:
                self._trace_timer.cancel()
            os.close(self.fd)

    def _emit(self, lines: list[tuple[bytes, int]], until_end: bool) -> int:
        """Emits ``lines`` in order; returns how many (fewer when it stopped before an end boundary)."""
        boundaries = self._boundaries
        attribute = self.attributor.attribute
        traces = self._traces
        try:
            for index, (line, truncated) in enumerate(lines):
                line_stream = self.stream
                if boundaries:
                    lead = line[:1]
                    if lead == STDERR_TAG_START:
                        line_stream, line = "stderr", _stderr_as_tagged(line)
                    elif lead == BOUNDARY_START and not truncated:
                        boundary = parse_boundary(line)
                        if boundary is not None:
                            if until_end and boundary[0] == "E":
                                return index
                            if traces.open:  # a trace does not cross an invocation's boundary
                                self._write(traces.flush())
                            self.on_boundary(*boundary)
                            continue
                request_id, text = attribute(line)
                if traces.open or may_start(text):
                    self._write(traces.feed(line_stream, request_id, text, truncated))
                    continue
                self._emit_line(line_stream, text, request_id, truncated)
            return len(lines)
        finally:
            if traces.open:
                self._trace_idle()

    def _emit_line(self, stream: str, text: bytes, request_id: str | None, truncated: int) -> None:
        emit_worker_line(
            self.sink,
            function=self.function,
            worker=self.worker,
            stream=stream,
            text=text,
            request_id=request_id,
            truncated=truncated,
            fmt=self.fmt,
            component=self.component,
        )

    def _write(self, records: list[Out]) -> None:
        """What the trace grouper gave out: plain lines and traces, in order."""
        for record in records:
            if not record.trace:
                self._emit_line(record.stream, record.lines[0], record.request_id, record.truncated)
                continue
            emit_worker_trace(self.sink, function=self.function, worker=self.worker, stream=record.stream,
                              lines=record.lines, event=record.event, request_id=record.request_id,
                              truncated=record.truncated, fmt=self.fmt, component=self.component)

    def _trace_idle(self) -> None:
        """A trace is open: it goes out once nothing has followed it for TRACE_IDLE_S."""
        loop = self._loop
        if loop is None:
            return  # not running (a test driving drain() alone): flushed at close
        self._trace_at = loop.time()
        if self._trace_timer is None:
            self._trace_timer = loop.call_at(self._trace_at + TRACE_IDLE_S, self._trace_due)

    def _trace_due(self) -> None:
        self._trace_timer = None
        loop = self._loop
        if self.closed or not self._traces.open or loop is None:
            return
        if self._busy or loop.time() < self._trace_at + TRACE_IDLE_S:
            self._trace_timer = loop.call_at(max(self._trace_at + TRACE_IDLE_S, loop.time() + 0.01), self._trace_due)
            return
        self._write(self._traces.flush())


async def pump(
    fd: int,
    *,
    function: str,
    worker: str,
    stream: str,
    sink: LineSink,
    fmt: str,
    max_line: int = DEFAULT_MAX_LINE,
    attributor: Attributor | None = None,
    component: str = "worker",
) -> None:
    """Re-emit every line read from ``fd`` until EOF (or cancellation): :meth:`Pump.run`.

    ``fd`` is the read end of the worker's stdout or stderr pipe; the pump
    owns it and closes it when done.
    """
    await Pump(fd, function=function, worker=worker, stream=stream, sink=sink, fmt=fmt, max_line=max_line,
               attributor=attributor, component=component).run()
