"""A worker's printed Python tracebacks, one log record each instead of one per line.

Pure: no I/O, no clock. The log pump (:mod:`supervisor.control.logpump`)
feeds every line of one pipe through a :class:`TraceGrouper` and logs what
comes out; it flushes the open trace when nothing has followed it for
``TRACE_IDLE_S``, before a worker's boundary record, and at the pipe's end.

Rules and invariants:

* What is grouped: Python's traceback format, from any source that prints
  it (``traceback.print_exc()``, an uncaught exception in a thread, a
  child process that crashes): a line ``Traceback (most recent call
  last):`` (or ``  + Exception Group Traceback (most recent call last):``,
  or a bare ``  File "...", line N`` as a SyntaxError starts), optionally
  preceded by ``Exception in thread NAME:`` or ``Exception ignored in:
  ...``; then its indented lines; then the exception's line (the first line
  that is not indented, which is the record's ``event``); then, chained,
  an empty line, ``During handling of the above exception, another
  exception occurred:`` or ``The above exception was the direct cause of
  the following exception:``, an empty line and the next ``Traceback``.
  An exception group's trace is drawn indented, every line ``|`` or ``+``
  after the indentation; it ends at the first line that is not drawn so,
  and its event is the group's own exception line.
* Nothing unrelated is merged: a group takes only consecutive lines of the
  same stream and request, each of which the format allows at its place.
  Any other line ends the group and is handled as itself. A tentative line
  (the empty line after an exception, a thread header) that turns out not
  to continue a trace is given back as the plain line it is.
* Order: every line comes out exactly once, in the order it went in (a
  group as one item where its first line was).
* Bounded: a group holds at most ``max_lines`` lines and ``max_bytes``
  bytes; a longer trace comes out as several consecutive records, none
  lost. The cost for a line that starts nothing while no group is open is
  one byte comparison (:func:`may_start`).
* Multi-line exception messages are the format's one ambiguity: their
  lines after the first are not indented, so they are lines of their own
  (merging them could swallow what the program printed next).
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["MAX_TRACE_BYTES", "MAX_TRACE_LINES", "TRACE_IDLE_S", "Out", "TraceGrouper", "may_start"]

MAX_TRACE_LINES = 400
MAX_TRACE_BYTES = 32 * 1024
# A trace is written line by line in a burst; a group nothing has followed for this long is complete.
TRACE_IDLE_S = 0.2

_HEADER = b"Traceback (most recent call last):"
_GROUP_HEADER = b"  + Exception Group Traceback (most recent call last):"
_FILE_LINE = re.compile(rb'  File ".*", line \d+')
_PRELUDE = re.compile(rb"Exception in thread .*:|Exception ignored in: .*")
_GROUP_LINE = re.compile(rb" +[|+]")
_GROUP_EXCEPTION = b"  | "  # the top-level group's own lines; its exception line is the first not indented further
_SEPARATORS = frozenset({
    b"During handling of the above exception, another exception occurred:",
    b"The above exception was the direct cause of the following exception:",
})
# The first bytes of every line that can start a trace (see may_start).
_STARTS = frozenset({b"T", b" ", b"E"})

# States of the open group.
_IDLE = 0
_PRELUDED = 1  # a thread/unraisable header is held; a Traceback line must follow
_FRAMES = 2  # inside a trace: indented lines, then the exception line
_RAISED = 3  # after the exception line: an empty line may lead to a chained trace
_BLANK = 4  # an empty line after the exception line is held
_SEPARATED = 5  # a chain separator; an empty line must follow
_CHAINED = 6  # separator and empty line; the next Traceback line must follow


class Out(NamedTuple):
    """One log record's worth: a plain line (``trace`` False, one line) or a trace."""

    stream: str
    request_id: str | None
    lines: tuple[bytes, ...]
    truncated: int  # bytes cut from these lines (LineSplitter's count)
    trace: bool
    event: bytes  # the line the record is about: the exception's line, else the first


def may_start(text: bytes) -> bool:
    """Cheap pre-check: False means ``text`` cannot start a trace."""
    return text[:1] in _STARTS


def _stripped(text: bytes) -> bytes:
    return text[:-1] if text.endswith(b"\r") else text


def _indented(text: bytes) -> bool:
    return text[:1] in (b" ", b"\t")


class TraceGrouper:
    """Lines of one pipe in, log records out (see the module docstring)."""

    __slots__ = ("max_lines", "max_bytes", "_state", "_key", "_lines", "_size", "_truncated", "_event",
                 "_group_style", "_held", "_own_event")

    def __init__(self, max_lines: int = MAX_TRACE_LINES, max_bytes: int = MAX_TRACE_BYTES) -> None:
        if max_lines < 2 or max_bytes < 1:
            raise ValueError("max_lines must be at least 2 and max_bytes at least 1")
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._state = _IDLE
        self._key: tuple[str, str | None] = ("", None)
        self._lines: list[bytes] = []
        self._size = 0
        self._truncated = 0
        self._event: bytes | None = None
        self._own_event = False  # the last trace of a chain has its own exception line already
        self._group_style = False  # an exception group's trace: indented throughout
        self._held: list[tuple[bytes, int]] = []  # tentative lines (see the module docstring)

    @property
    def open(self) -> bool:
        """Whether lines are held (then :meth:`flush` gives them out)."""
        return self._state != _IDLE

    def feed(self, stream: str, request_id: str | None, text: bytes, truncated: int = 0) -> list[Out]:
        """One line (no newline) in; the records it completes out, in order."""
        out: list[Out] = []
        if self._state == _IDLE:
            self._start(stream, request_id, text, truncated, out)
        elif (stream, request_id) != self._key:
            self._end(out)
            self._start(stream, request_id, text, truncated, out)
        else:
            self._continue(text, truncated, out)
        return out

    def flush(self) -> list[Out]:
        """Everything held, as it stands (the trace is over: idle, a boundary, the end)."""
        out: list[Out] = []
        self._end(out)
        return out

    # ---- the state machine -------------------------------------------------------

    def _start(self, stream: str, request_id: str | None, text: bytes, truncated: int, out: list[Out]) -> None:
        """A line while no group is open."""
        line = _stripped(text)
        if not truncated and may_start(line):
            if line == _HEADER or _FILE_LINE.match(line):
                self._open(stream, request_id, _FRAMES, False)
                self._add(text, truncated, out)
                return
            if line == _GROUP_HEADER:
                self._open(stream, request_id, _FRAMES, True)
                self._add(text, truncated, out)
                return
            if _PRELUDE.fullmatch(line):
                self._open(stream, request_id, _PRELUDED, False)
                self._held.append((text, truncated))
                return
        out.append(Out(stream, request_id, (text,), truncated, False, text))

    def _continue(self, text: bytes, truncated: int, out: list[Out]) -> None:
        """A line of the open group's stream and request."""
        state = self._state
        line = _stripped(text)
        if state == _FRAMES:
            if self._group_style:
                if _GROUP_LINE.match(line) and line != _GROUP_HEADER:
                    self._add(text, truncated, out)
                    if (not self._own_event and line.startswith(_GROUP_EXCEPTION)
                            and not _indented(line[len(_GROUP_EXCEPTION):])):
                        self._event = line[len(_GROUP_EXCEPTION):]
                        self._own_event = True
                    return
            elif line and _indented(line):
                self._add(text, truncated, out)
                return
            elif line and line != _HEADER:
                self._add(text, truncated, out)
                self._event = text
                self._own_event = True
                self._state = _RAISED
                return
        elif state == _PRELUDED:
            if line == _HEADER or line == _GROUP_HEADER:
                self._group_style = line == _GROUP_HEADER
                self._commit_held(out)
                self._add(text, truncated, out)
                self._state = _FRAMES
                return
            # The header was only a line: it goes out as one, and this line starts afresh.
            self._give_back(out)
        elif state == _RAISED:
            if not line:
                self._held.append((text, truncated))
                self._state = _BLANK
                return
        elif state == _BLANK:
            if line in _SEPARATORS:
                self._held.append((text, truncated))
                self._state = _SEPARATED
                return
            self._end_before_held(out)
        elif state == _SEPARATED:
            if not line:
                self._held.append((text, truncated))
                self._state = _CHAINED
                return
        elif state == _CHAINED and (line == _HEADER or line == _GROUP_HEADER):
            self._group_style = line == _GROUP_HEADER
            self._commit_held(out)
            self._add(text, truncated, out)
            self._own_event = False  # the chain's last exception is the one that was raised
            self._state = _FRAMES
            return
        stream, request_id = self._key
        self._end(out)
        self._start(stream, request_id, text, truncated, out)

    # ---- groups ------------------------------------------------------------------

    def _open(self, stream: str, request_id: str | None, state: int, group_style: bool) -> None:
        self._key = (stream, request_id)
        self._state = state
        self._group_style = group_style
        self._event = None
        self._own_event = False

    def _add(self, text: bytes, truncated: int, out: list[Out]) -> None:
        """Commits one line to the group, first giving out what the bounds cannot hold."""
        if self._lines and (len(self._lines) >= self.max_lines or self._size + len(text) > self.max_bytes):
            self._give_out(out)
        self._lines.append(text)
        self._size += len(text)
        self._truncated += truncated

    def _commit_held(self, out: list[Out]) -> None:
        held, self._held = self._held, []
        for text, truncated in held:
            self._add(text, truncated, out)

    def _give_out(self, out: list[Out]) -> None:
        """The committed lines as one trace record (the group stays open)."""
        if self._lines:
            lines = tuple(self._lines)
            event = self._event if self._event is not None else lines[0]
            out.append(Out(self._key[0], self._key[1], lines, self._truncated, True, event))
            self._lines = []
            self._size = 0
            self._truncated = 0
            self._event = None

    def _give_back(self, out: list[Out]) -> None:
        """Held lines that turned out to be plain lines, as such."""
        stream, request_id = self._key
        held, self._held = self._held, []
        out.extend(Out(stream, request_id, (text,), truncated, False, text) for text, truncated in held)

    def _end_before_held(self, out: list[Out]) -> None:
        """The trace ended before the held lines: it goes out, then they do."""
        self._give_out(out)
        self._give_back(out)
        self._state = _IDLE

    def _end(self, out: list[Out]) -> None:
        if self._state == _IDLE:
            return
        if self._state in (_PRELUDED, _BLANK):
            self._end_before_held(out)  # tentative lines that nothing confirmed
            return
        self._commit_held(out)  # a separator (and its empty line) is the trace's text
        self._give_out(out)
        self._state = _IDLE
