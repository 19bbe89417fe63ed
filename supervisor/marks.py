"""Invocation boundaries, told by the data plane to the control plane.

FC's markers (``FC Invoke Start RequestId: <id>`` ...) must come from a
component that user code cannot impersonate. A worker is not one: the
handler runs in its process and can write anything the worker runtime can
(fd 1 and 2, and the runtime's own objects in memory). The data plane is:
it knows for a fact that it sent invocation X to worker W, and when X ended
(its result, its timeout, its worker's loss). It says so on this channel;
the control plane, which captures W's output, puts the real markers into it
at the right place (:mod:`supervisor.control.output`).

Rules and invariants:

* The channel is a FIFO, ``run_dir/marks.fifo``, mode 0600: only the
  supervisor's user can open it (workers run as another user when the
  supervisor is root; see the README's security table for the same-user
  case). The control plane makes it afresh when it starts
  (:meth:`MarkReader.open`) and keeps a write end of its own so that it
  never reads EOF; the data plane opens it on first use, and again when a
  write finds no reader (the control plane restarted: its workers, and the
  records about them, went with it). Both ends are close-on-exec.
* Records are ASCII lines, each written whole (a write of at most PIPE_BUF
  bytes to a pipe is atomic, and the data plane is the only writer)::

      S <worker> <kind> <request_id>   before the invocation's frame leaves for the worker
      E <worker> <request_id>          after it ended (result, timeout, loss of the worker)
      H <pid>                          a data plane (re)opened it: what an earlier one ran is over

  Ids are ``[A-Za-z0-9._:-]`` (request ids up to 127 bytes, worker ids up to
  255), kinds the FC kinds of :data:`KINDS`; nothing else is ever written,
  and a line that is not a record is ignored by the reader.
* Causality is what makes the markers' place right: a start is written,
  synchronously, before the frame that carries the invocation is even
  queued, so it is in the pipe before the worker can print anything for it;
  an end is written after the data plane has the result, so everything the
  worker printed for the invocation is already in the worker's pipe.
  Ends are gathered and written once per loop iteration (and before the
  next start): one write instead of one per invocation.
* The data plane never blocks on the channel (the write end is
  non-blocking). Records that do not fit (the control plane has not read
  for thousands of invocations) are dropped and counted, with a warning:
  those invocations lose their markers, nothing else.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import re
import stat
import time
from pathlib import Path
from typing import NamedTuple

from supervisor.logs import get_logger
from supervisor.runstate import MARKS_FIFO_NAME

__all__ = ["KINDS", "MarkReader", "MarkWriter", "Record", "parse", "use", "writer"]

KINDS = frozenset({"invoke", "initialize", "pre_freeze", "pre_stop"})
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = 1031
PIPE_BUF = 4096
READ_SIZE = 64 * 1024
# A reader call takes at most this much, so that one call cannot hold the loop for long.
READ_LIMIT = 1024 * 1024
# How often a data plane with no control plane to tell tries the FIFO again.
REOPEN_INTERVAL_S = 0.05

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,127}")
_WORKER_ID = re.compile(r"[A-Za-z0-9._:-]{1,255}")
_REQUEST_ID_B = re.compile(rb"[A-Za-z0-9._:-]{1,127}")
_WORKER_ID_B = re.compile(rb"[A-Za-z0-9._:-]{1,255}")

log = get_logger()


class Record(NamedTuple):
    """One record: ``op`` is ``"S"``, ``"E"`` or ``"H"`` (``worker`` is the pid then)."""

    op: str
    worker: str
    kind: str
    request_id: str


def parse(line: bytes) -> Record | None:
    """The record on one line (without its newline), or None when it is not one."""
    parts = line.split(b" ")
    op = parts[0]
    if op == b"S" and len(parts) == 4:
        _, worker, kind, request_id = parts
        text = kind.decode("ascii", "replace")
        if text in KINDS and _WORKER_ID_B.fullmatch(worker) and _REQUEST_ID_B.fullmatch(request_id):
            return Record("S", worker.decode("ascii"), text, request_id.decode("ascii"))
    elif op == b"E" and len(parts) == 3:
        _, worker, request_id = parts
        if _WORKER_ID_B.fullmatch(worker) and _REQUEST_ID_B.fullmatch(request_id):
            return Record("E", worker.decode("ascii"), "", request_id.decode("ascii"))
    elif op == b"H" and len(parts) == 2 and parts[1].isdigit():
        return Record("H", parts[1].decode("ascii"), "", "")
    return None


class MarkWriter:
    """The data plane's end: records in, never blocking (see the module docstring)."""

    __slots__ = ("path", "_fd", "_retry_at", "_ends", "_scheduled", "_workers", "dropped")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._workers: set[str] = set()  # worker ids already found valid
        self._fd: int | None = None
        self._retry_at = 0.0
        self._ends: list[bytes] = []
        self._scheduled = False
        self.dropped = 0

    def start(self, worker: str, kind: str, request_id: str) -> None:
        """Invocation ``request_id`` of ``kind`` is being sent to ``worker``: written now."""
        if kind not in KINDS or not self._valid(worker, request_id):
            return
        record = f"S {worker} {kind} {request_id}\n".encode("ascii")
        if self._ends:
            record = b"".join(self._ends) + record
            self._ends.clear()
        elif self._fd is not None:
            try:  # the common case: one record, one write
                os.write(self._fd, record)
                return
            except OSError:
                pass  # the slow path says what happened
        self._write(record)

    def end(self, worker: str, request_id: str) -> None:
        """Invocation ``request_id`` on ``worker`` is over: written by the end of this loop iteration."""
        if not self._valid(worker, request_id):
            return
        self._ends.append(f"E {worker} {request_id}\n".encode("ascii"))
        if not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._scheduled = True
            except RuntimeError:  # no loop (shutting down): now
                self.flush()

    def _valid(self, worker: str, request_id: str) -> bool:
        # Worker ids are few: each is checked once.
        if worker not in self._workers:
            if not _WORKER_ID.fullmatch(worker):
                return False
            if len(self._workers) > 4096:
                self._workers.clear()
            self._workers.add(worker)
        return _REQUEST_ID.fullmatch(request_id) is not None

    def flush(self) -> None:
        self._scheduled = False
        if self._ends:
            data = b"".join(self._ends)
            self._ends.clear()
            self._write(data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self, now: bool = False) -> bool:
        """Opens the FIFO (a reader must be there); says so to the reader with ``H``.

        Tried at most every ``REOPEN_INTERVAL_S`` unless ``now``.
        """
        clock = time.monotonic()
        if clock < self._retry_at and not now:
            return False
        self._retry_at = clock + REOPEN_INTERVAL_S
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False  # ENXIO: no control plane reading; ENOENT: none made it yet
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)  # not ours to write into
            return False
        try:
            os.write(fd, b"H %d\n" % os.getpid())
        except OSError:
            os.close(fd)  # gone again already (or full: then it would not know what is over)
            return False
        self._fd = fd
        return True

    def _write(self, data: bytes) -> None:
        if self._fd is None and not self._open():
            self._drop(data.count(b"\n"), "no control plane reads them")
            return
        # Whole records only: a non-blocking write of more than PIPE_BUF bytes
        # may be cut anywhere, so bigger batches go out in record-aligned pieces.
        while data:
            if len(data) <= PIPE_BUF:
                piece, data = data, b""
            else:
                cut = data.rfind(b"\n", 0, PIPE_BUF) + 1
                piece, data = data[:cut], data[cut:]
            self._send(piece)

    def _send(self, piece: bytes) -> None:
        for _ in range(2):
            if self._fd is None:
                break
            try:
                os.write(self._fd, piece)
                return
            except BlockingIOError:
                self._drop(piece.count(b"\n"), "the control plane is not reading")
                return
            except OSError as exc:
                self.close()
                if exc.errno != errno.EPIPE or not self._open(now=True):
                    break
                # EPIPE: the control plane restarted and made a new FIFO; it is open now.
        self._drop(piece.count(b"\n"), "no control plane reads them")

    def _drop(self, count: int, why: str) -> None:
        before = self.dropped
        self.dropped += count
        # Said at the first drop and at each power of ten: visible, never a flood.
        if before == 0 or len(str(before)) != len(str(self.dropped)):
            log.warning("FC marker records dropped; those invocations lose their markers",
                        dropped=self.dropped, reason=why)


class MarkReader:
    """The control plane's end: the records written so far, in order."""

    __slots__ = ("fd", "_keep", "_partial", "count")

    def __init__(self, fd: int, keep: int | None = None) -> None:
        self.fd = fd
        self._keep = keep  # our own write end: the reader never sees EOF between data planes
        self._partial = b""
        self.count = 0  # records read so far: a position in the data plane's history

    @classmethod
    def open(cls, path: Path) -> MarkReader:
        """Makes the FIFO afresh at ``path`` (mode 0600) and opens it, non-blocking."""
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)
        try:
            os.mkfifo(path, 0o600)
        finally:
            os.umask(old_umask)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        keep = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size for an unprivileged user: the default 64 KiB
        return cls(fd, keep)

    def close(self) -> None:
        for fd in (self.fd, self._keep):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def read(self) -> list[Record]:
        """Every complete record the pipe holds now (up to ``READ_LIMIT`` bytes); never blocks."""
        records: list[Record] = []
        taken = 0
        while taken < READ_LIMIT:
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                break
            if not data:
                break
            taken += len(data)
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()[:PIPE_BUF]  # writes are whole records: only a read cuts one
            for line in lines:
                record = parse(line)
                if record is not None:
                    records.append(record)
            if len(data) < READ_SIZE:
                break
        self.count += len(records)
        return records


_writer: MarkWriter | None = None


def use(run_dir: Path | str) -> MarkWriter:
    """The data plane's writer to ``run_dir``'s FIFO, made on first use (then :func:`writer`)."""
    global _writer
    path = Path(run_dir).absolute() / MARKS_FIFO_NAME
    if _writer is None or _writer.path != path:
        if _writer is not None:
            _writer.close()
        _writer = MarkWriter(path)
    return _writer


def writer() -> MarkWriter | None:
    """The writer :func:`use` made, if any (the request path's cheap look-up)."""
    return _writer
