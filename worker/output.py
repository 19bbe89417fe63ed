"""The worker's half of log capture: tagged, unbreakable stdout and stderr.

Rules and invariants:

* After :func:`install`, every line Python code writes to ``sys.stdout`` or
  ``sys.stderr`` while a request is being handled starts with the tag
  ``b"\\x1e" + request_id + b"\\x1f"`` (``b"\\x1d"...`` for stderr, which is
  written into the stdout pipe so that line order survives; a stderr line is
  tagged even outside a request) for the id in :data:`current_request_id`
  (set by the worker around each handler; contextvars follow asyncio tasks
  and ``copy_context().run`` into threads). The control plane's log pump
  (:mod:`supervisor.control.logpump`) strips the tag and attributes the line.
  Ids outside ``[A-Za-z0-9._:-]{1,127}`` are not tagged: the pump would not
  accept them anyway.
* Writing never raises into user code because of the pipe: EPIPE (the reader
  may be restarting) and other OS errors are swallowed and the data dropped;
  a non-blocking fd is waited on, not failed.
* Efficiency: text is buffered until a newline, then every complete line in
  one ``write()`` call goes out in one syscall; ``flush()`` writes a partial
  line (its continuation then gets no second tag). A partial line is also
  written once it passes 64 KiB, so the buffer stays bounded.
* :func:`marker` writes the boundary record of an invocation or hook,
  ``b"\\x1c" + (b"S" | b"E") + b"\\x1f" + request_id``, untagged on stdout,
  through the same lock and in order with everything else. It ends a partial
  line first so a record is always a line of its own. The log pump uses
  these records to attribute untagged lines (C code, subprocesses) and to
  place FC's markers, which the control plane writes on the data plane's
  word (:mod:`supervisor.control.output`): nothing the worker writes is a
  marker, so user code that prints one only prints a line.
* :func:`write_record` writes a structured log record (what the function
  logs through ``logging`` or ``context.logger``): a tagged stdout line whose
  text is ``\x1a`` + one JSON object. The log pump makes it one log record
  with its level and fields (``supervisor.logs.emit_worker_line``); a line
  that only looks like one (or was cut by ``max_line``) is logged as text.
* ``sys.stdout.buffer`` takes bytes, written at once and untagged (the pump
  attributes them by the boundary records), after any buffered text.
"""

from __future__ import annotations

import io
import os
import re
import select
import sys
import threading
from contextvars import ContextVar

__all__ = ["RECORD_START", "TaggedStream", "current_request_id", "install", "log_error", "marker", "write_record"]

current_request_id: ContextVar[str | None] = ContextVar("current_request_id", default=None)

_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,127}")
_KINDS = frozenset({"Invoke", "Initialize", "PreFreeze", "PreStop"})
_PHASES = frozenset({"Start", "End"})
_MAX_PENDING = 64 * 1024
# The first character of a structured record's text (after its tag): see write_record.
RECORD_START = "\x1a"

_stdout: TaggedStream | None = None
_stderr: TaggedStream | None = None


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            # Something set O_NONBLOCK on the pipe: stdout semantics are
            # "wait for room", so wait instead of failing or spinning.
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll()
            continue
        except OSError:
            return  # EPIPE, EBADF...: the log is lost, the user code goes on
        view = view[written:]


class _TagCache:
    """Remembers the last id's tag: one request writes many lines.

    ``lead`` is ``\x1e`` for stdout and ``\x1d`` for stderr; a stderr line is
    always tagged (with an empty id outside a request) because it travels on
    the stdout pipe and the pump must know its stream.
    """

    __slots__ = ("request_id", "tag", "lead", "untagged")

    def __init__(self, lead: str = "\x1e", always: bool = False) -> None:
        self.request_id: str | None = None
        self.lead = lead
        self.untagged = f"{lead}\x1f" if always else ""
        self.tag = self.untagged

    def get(self) -> str:
        request_id = current_request_id.get()
        if request_id is None:
            return self.untagged
        if request_id != self.request_id:
            self.tag = f"{self.lead}{request_id}\x1f" if _VALID_ID.fullmatch(request_id) else self.untagged
            self.request_id = request_id
        return self.tag


class _BinaryOut(io.RawIOBase):
    """``sys.stdout.buffer``: bytes go out untagged, after pending text."""

    def __init__(self, owner: TaggedStream) -> None:
        super().__init__()
        self._owner = owner

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._owner.fileno()

    def write(self, data: object) -> int:
        raw = bytes(data)  # type: ignore[call-overload]
        self._owner.write_raw(raw)
        return len(raw)

    def close(self) -> None:
        # Closing it must not stop later output; there is nothing to release.
        pass


class TaggedStream(io.TextIOBase):
    """A line-buffered text stream on ``fd`` that tags lines with the request id."""

    # Class attributes: they shadow io.TextIOBase's read-only descriptors.
    encoding = "utf-8"
    errors = "backslashreplace"  # a lone surrogate must not crash a print()

    def __init__(self, fd: int, name: str, *, write_fd: int | None = None, stderr: bool = False) -> None:
        super().__init__()
        self._fileno = fd  # what fileno() reports
        self._fd = fd if write_fd is None else write_fd  # where lines go
        self._name = name
        self._pending: list[str] = []  # the current line's text not yet written
        self._pending_len = 0
        self._line_open = False  # the current line's start (and tag) is already out
        # Reentrant: a signal handler or a finalizer may print mid-write.
        self._lock = threading.RLock()
        self._tags = _TagCache("\x1d", always=True) if stderr else _TagCache()
        self._buffer = _BinaryOut(self)

    # --- io attributes code commonly relies on ---------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def line_buffering(self) -> bool:
        return True

    @property
    def buffer(self) -> _BinaryOut:
        return self._buffer

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fileno

    def isatty(self) -> bool:
        try:
            return os.isatty(self._fileno)
        except OSError:
            return False

    def close(self) -> None:
        # User code that closes sys.stdout must not lose every later line.
        self.flush()

    # --- writing ----------------------------------------------------------------

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        size = len(text)
        with self._lock:
            last = text.rfind("\n")
            if last < 0:
                self._pending.append(text)
                self._pending_len += size
                if self._pending_len > _MAX_PENDING:
                    self._write_partial()
                return size
            if self._pending:
                self._pending.append(text)
                text = "".join(self._pending)
                last = text.rfind("\n")
                self._pending.clear()
                self._pending_len = 0
            complete, rest = text[: last + 1], text[last + 1 :]
            tag = self._tags.get()
            if tag:
                if last != complete.find("\n"):  # several lines: tag each one
                    complete = complete[:-1].replace("\n", "\n" + tag) + "\n"
                if not self._line_open:
                    complete = tag + complete
            self._line_open = False
            _write_fd(self._fd, complete.encode("utf-8", "backslashreplace"))
            if rest:
                self._pending.append(rest)
                self._pending_len = len(rest)
                if self._pending_len > _MAX_PENDING:
                    self._write_partial()
        return size

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._write_partial()

    def write_raw(self, data: bytes, *, end_line: bool = False) -> None:
        """Write bytes untagged, after pending text; ``end_line`` ends a partial line first."""
        with self._lock:
            if end_line and (self._pending or self._line_open):
                text = "".join(self._pending) + "\n"
                if not self._line_open:
                    text = self._tags.get() + text
                self._pending.clear()
                self._pending_len = 0
                # One syscall for the end of the line and the data.
                data = text.encode("utf-8", "backslashreplace") + data
            elif self._pending:
                self._write_partial()
            if data:
                self._line_open = not data.endswith(b"\n")
                _write_fd(self._fd, data)

    def _write_partial(self) -> None:
        text = "".join(self._pending)
        self._pending.clear()
        self._pending_len = 0
        if not self._line_open:
            text = self._tags.get() + text
            self._line_open = True
        _write_fd(self._fd, text.encode("utf-8", "backslashreplace"))


def install(stream_fd_out: int = 1, stream_fd_err: int = 2) -> None:
    """Replace ``sys.stdout``/``sys.stderr`` with tagged streams on these fds."""
    global _stdout, _stderr
    for old in (sys.stdout, sys.stderr):
        try:
            if old is not None:
                old.flush()
        except (OSError, ValueError):
            pass
    _stdout = TaggedStream(stream_fd_out, "<stdout>")
    # Python-level stderr shares the stdout pipe (tagged as stderr), so the
    # order of a handler's lines and FC's markers survives; raw writes to fd 2
    # (C code, child processes) still go to the stderr pipe.
    _stderr = TaggedStream(stream_fd_err, "<stderr>", write_fd=stream_fd_out, stderr=True)
    sys.stdout = _stdout
    sys.stderr = _stderr


def marker(kind: str, request_id: str, phase: str) -> None:
    """Write the boundary record of ``phase`` (Start, End) of ``request_id`` on stdout.

    ``kind`` is FC's (Invoke, Initialize, PreFreeze, PreStop); the record
    does not carry it (the data plane's word does). Raises ValueError for an
    unknown kind or phase or an id the pump would not recognise (ids come
    from a header: one with a newline must not be able to forge lines).
    """
    if kind not in _KINDS or phase not in _PHASES or not _VALID_ID.fullmatch(request_id):
        raise ValueError(f"bad marker: {kind!r} {phase!r} {request_id!r}")
    line = f"\x1c{phase[0]}\x1f{request_id}\n".encode("ascii")
    if _stdout is not None:
        _stdout.write_raw(line, end_line=True)
    else:
        _write_fd(1, line)


def write_record(payload: str) -> None:
    """One structured log record (``RECORD_START`` + a JSON object, one line) on
    stdout, tagged with the current request id like any printed line (see
    ``worker.python.log``). ``payload`` must not contain a newline."""
    line = RECORD_START + payload + "\n"
    if _stdout is not None:
        with _stdout._lock:  # one operation: no other thread's text between the two
            _stdout.write_raw(b"", end_line=True)  # a record is a line of its own
            _stdout.write(line)
    else:
        _write_fd(1, line.encode("utf-8", "backslashreplace"))


def log_error(message: str) -> None:
    """The worker runtime's own error, as an untagged line on stderr."""
    line = (message.rstrip("\n") + "\n").encode("utf-8", "backslashreplace")
    if _stderr is not None:
        _stderr.write_raw(line, end_line=True)
    else:
        _write_fd(2, line)
