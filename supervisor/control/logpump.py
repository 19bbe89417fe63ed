"""Capture of a worker's stdout/stderr pipe, line by line, into the log.

Rules and invariants (DESIGN.md, "Contract: logs"):

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
  lines (C code, subprocesses) are attributed by the FC markers the worker
  writes untagged on stdout, ``FC <Invoke|Initialize|PreFreeze|PreStop>
  <Start|End> RequestId: <id>``: between a Start and its End, untagged lines
  get that id. When several requests are open at once (concurrency > 1) an
  untagged line could belong to any of them, so it gets none rather than a
  guess. Tagged text that looks like a marker is not a marker, and markers
  only count on stdout. Stdout and stderr of one worker share one
  :class:`Attributor`.
* Cost. After a read that drained the pipe the pump pauses for
  ``BATCH_DELAY_S`` so that lines gather (a pipe of ``PIPE_SIZE`` holds
  them); one wake-up then handles many lines instead of one each. A worker
  writing faster than that gets full reads without pause.
* Order. Two pipes give no order between them, so the worker writes its
  Python-level stderr into the stdout pipe as ``b"\\x1d" + id + b"\\x1f" +
  text`` (empty id outside a request): such a line is logged with
  ``stream: "stderr"`` and keeps its place between the markers. Only raw
  writes to fd 2 (C code, child processes) use the stderr pipe.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re

from supervisor.logs import LineSink, emit_worker_line

__all__ = ["DEFAULT_MAX_LINE", "READ_SIZE", "Attributor", "LineSplitter", "pump"]

DEFAULT_MAX_LINE = 16 * 1024
READ_SIZE = 64 * 1024

TAG_START = b"\x1e"
STDERR_TAG_START = b"\x1d"  # a sys.stderr line carried on the stdout pipe
BATCH_DELAY_S = 0.005
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = 1031
TAG_END = b"\x1f"
MAX_TAG_ID = 127

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,127}")
_MARKER = re.compile(
    rb"FC (?:Invoke|Initialize|PreFreeze|PreStop) (Start|End) RequestId: ([A-Za-z0-9._:-]{1,127})\r?"
)
# Forged Start markers without an End must not grow memory.
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

    def attribute(self, line: bytes, *, markers: bool = True) -> tuple[str | None, bytes]:
        """Return ``(request_id, text)`` for one line (no trailing newline).

        ``markers`` says whether FC markers on this line count (stdout: yes).
        """
        if line.startswith(TAG_START):
            end = line.find(TAG_END, 1, MAX_TAG_ID + 2)
            if end > 1:
                tagged = line[1:end]
                if _REQUEST_ID.fullmatch(tagged):
                    return tagged.decode("ascii"), line[end + 1 :]
        elif markers and line.startswith(b"FC "):
            match = _MARKER.fullmatch(line)
            if match is not None:
                request_id = match.group(2).decode("ascii")
                if match.group(1) == b"Start":
                    self._open[request_id] = None
                    if len(self._open) > _MAX_OPEN_REQUESTS:
                        del self._open[next(iter(self._open))]
                else:
                    self._open.pop(request_id, None)
                self._current = next(iter(self._open)) if len(self._open) == 1 else None
                return request_id, line
        return self._current, line


def _enlarge_pipe(fd: int) -> None:
    """Room for what a worker writes while the pump gathers (best effort)."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size for an unprivileged user: keep the default


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
    """Re-emit every line read from ``fd`` until EOF (or cancellation).

    ``fd`` is the read end of the worker's stdout or stderr pipe; the pump
    owns it: it makes it non-blocking (safe: no other process shares this
    end's file description) and closes it when done. ``stream`` is
    ``"stdout"`` or ``"stderr"``; pass the same ``attributor`` to both pumps
    of one worker. On EOF or cancellation the unterminated last line is
    emitted too. A worker's child that inherited the pipe keeps it open after
    the worker exits: the caller cancels the pump after a grace period then.
    """
    loop = asyncio.get_running_loop()
    splitter = LineSplitter(max_line)
    attribute = (attributor if attributor is not None else Attributor()).attribute
    markers = stream == "stdout"
    finished: asyncio.Future[None] = loop.create_future()

    def emit(lines: list[tuple[bytes, int]]) -> None:
        for line, truncated in lines:
            line_stream = stream
            if line.startswith(STDERR_TAG_START) and markers:
                line_stream, line = "stderr", _stderr_as_tagged(line)
            request_id, text = attribute(line, markers=markers and line_stream == "stdout")
            emit_worker_line(
                sink,
                function=function,
                worker=worker,
                stream=line_stream,
                text=text,
                request_id=request_id,
                truncated=truncated,
                fmt=fmt,
                component=component,
            )

    def resume() -> None:
        if not finished.done():
            loop.add_reader(fd, on_readable)

    def on_readable() -> None:
        # One read per wake-up: with many workers, the loop round-robins
        # between their pipes instead of draining one flood first.
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO and the like: nothing more will come
        if not data:
            loop.remove_reader(fd)
            if not finished.done():
                finished.set_result(None)
            return
        try:
            emit(splitter.feed(data))
        except Exception as exc:
            # A bug here must end the pump visibly, not fail on every wake-up.
            loop.remove_reader(fd)
            if not finished.done():
                finished.set_exception(exc)
            return
        if len(data) < READ_SIZE:
            # The pipe is drained: let lines gather for a moment instead of
            # waking for each one (two FC markers per invocation would
            # otherwise cost two wake-ups of this process per invocation).
            # A flood keeps full reads coming and is read without pause.
            loop.remove_reader(fd)
            loop.call_later(BATCH_DELAY_S, resume)

    os.set_blocking(fd, False)
    _enlarge_pipe(fd)
    loop.add_reader(fd, on_readable)
    try:
        await finished
    finally:
        loop.remove_reader(fd)
        try:
            emit(splitter.flush())
        finally:
            os.close(fd)
