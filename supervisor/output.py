"""A bounded, never-blocking writer of complete log lines to a shared fd.

Rules and invariants:

* ``write_line`` never blocks on the fd: it takes a lock for a deque append
  and returns. Callers are event loops (the log pump runs for every line a
  worker prints), and a slow or stalled reader of stdout must not stall them.
* Memory is bounded: at most ``max_buffer`` bytes of lines are held, counting
  the batch being written and ``LINE_OVERHEAD`` per line. A line that does
  not fit is dropped and counted; when the buffer has drained, one JSON line
  ``{"event": "log lines dropped", "dropped": N, "level": "warning", ...}``
  reports the count, so a gap in the log is never silent.
* Lines are whole: every line goes out inside a single ``write()`` (several
  lines may share one). POSIX only makes pipe writes of up to PIPE_BUF (4 KiB)
  atomic; larger writes stay whole unless the pipe is full while several
  processes write to it, which is the best any writer can do.
* The fd's file status flags are never changed.

Why a writer thread rather than the event loop with ``loop.add_writer``:
non-blocking writes from the loop need O_NONBLOCK, and that flag lives on the
*open file description*, which stdout shares with the parent supervisor and
the other plane. Setting it would make their plain blocking ``write()`` calls
fail with EAGAIN. ``dup()`` shares the description, so it does not help;
re-opening ``/proc/self/fd/N`` gives a fresh description only for pipes, FIFOs
and ttys (a socket, e.g. journald's stdout, cannot be opened that way, and a
regular file would get its own offset). A thread doing ordinary blocking
writes works for every kind of fd, touches no flags, and may block as long as
the reader likes; the loop only ever appends to a deque. The thread takes
whole batches (up to ``max_batch`` bytes) per write so that the GIL hand-off
between it and a busy loop thread does not cap the throughput (measured: a
200k-line flood through the log pump into a pipe, no drops, ~1.5 MB RSS).

The thread is a daemon: a reader that never resumes cannot keep the process
alive at exit. An instance does not survive fork(); create it in the process
that uses it.
"""

from __future__ import annotations

import os
import select
import stat
import threading
from collections import deque

import orjson

from supervisor.logs import utc_timestamp

__all__ = ["BoundedLineWriter", "shared_sink", "flush_shared"]

DEFAULT_MAX_BUFFER = 4 * 1024 * 1024
# A Linux pipe holds 64 KiB: a batch no bigger goes into an empty pipe in one piece.
DEFAULT_MAX_BATCH = 64 * 1024
# Into a regular file (stdout redirected to a file): larger batches, see BoundedLineWriter.
FILE_MAX_BATCH = 1024 * 1024
# What a queued line costs beyond its bytes: the bytes object's header and
# allocator rounding plus its deque slot. Counting it keeps the bound on real
# memory when lines are short (a 100-byte line really takes ~160).
LINE_OVERHEAD = 64


def _regular_file(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


class BoundedLineWriter:
    """Queue complete lines for a writer thread; drop (and count) when full.

    ``write_line`` takes one line including its trailing newline. Thread-safe.
    """

    def __init__(
        self,
        fd: int = 1,
        *,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        max_batch: int = DEFAULT_MAX_BATCH,
        component: str = "supervisor",
    ) -> None:
        if max_buffer <= 0 or max_batch <= 0:
            raise ValueError("max_buffer and max_batch must be positive")
        self._fd = fd
        self._max_buffer = max_buffer
        self._max_batch = max_batch
        if _regular_file(fd):
            # A regular file takes any write whole: the pipe's 64 KiB reason does
            # not hold, and a bigger batch per GIL turn keeps up with a busy loop.
            self._max_batch = max(max_batch, FILE_MAX_BATCH)
        self._component = component
        self._lines: deque[bytes] = deque()
        self._pending = 0  # bytes queued or being written
        self._dropped = 0  # dropped since the last report
        self._dropped_total = 0
        self._closing = False
        self._writer_idle = False
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)
        self._drained = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name=f"log-writer-{fd}", daemon=True)
        self._thread.start()

    @property
    def dropped_total(self) -> int:
        """Lines dropped since creation."""
        return self._dropped_total

    @property
    def pending_bytes(self) -> int:
        """Memory held by lines accepted but not yet written (see LINE_OVERHEAD)."""
        return self._pending

    def write_line(self, line: bytes) -> None:
        """Queue ``line`` (newline included), or drop it when the buffer is full.

        Pass a right-sized bytes object: the buffer bound counts ``len(line)``,
        not whatever larger allocation a serializer may have left behind it.
        """
        size = len(line) + LINE_OVERHEAD
        with self._lock:
            if self._closing:
                return
            if self._pending + size > self._max_buffer:
                self._dropped += 1
                self._dropped_total += 1
                return
            self._lines.append(line)
            self._pending += size
            # Waking a busy writer would only cost a futex call per line.
            if self._writer_idle:
                self._has_work.notify()

    def flush(self, timeout: float) -> bool:
        """Block the caller until everything queued is written; False on timeout.

        For pre-freeze. From a coroutine: ``await asyncio.to_thread(w.flush, t)``.
        """
        with self._lock:
            return self._drained.wait_for(
                lambda: self._pending == 0 and self._dropped == 0, timeout
            )

    def close(self, timeout: float = 1.0) -> None:
        """Write what is queued (up to ``timeout``), then stop the thread."""
        with self._lock:
            self._closing = True
            self._has_work.notify()
        self._thread.join(timeout)

    # --- writer thread ---------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._lines and not self._dropped:
                    if self._closing:
                        return
                    self._writer_idle = True
                    self._has_work.wait()
                    self._writer_idle = False
                if self._lines:
                    batch = [self._lines.popleft()]
                    length = len(batch[0])
                    while self._lines and length + len(self._lines[0]) <= self._max_batch:
                        line = self._lines.popleft()
                        batch.append(line)
                        length += len(line)
                    size = length + LINE_OVERHEAD * len(batch)
                    notice = b""
                else:
                    # Drained with drops outstanding: report them. The notice
                    # is not counted in _pending; it is tiny and one at a time.
                    batch, size = [], 0
                    notice = self._dropped_notice(self._dropped)
                    self._dropped = 0
            self._write_all(notice or b"".join(batch))
            with self._lock:
                self._pending -= size
                if self._pending == 0 and self._dropped == 0:
                    self._drained.notify_all()

    def _dropped_notice(self, count: int) -> bytes:
        return orjson.dumps(
            {
                "timestamp": utc_timestamp(),
                "level": "warning",
                "event": "log lines dropped",
                "component": self._component,
                "dropped": count,
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                # Someone else set O_NONBLOCK on the shared description: wait
                # for room instead of spinning or losing the line.
                poller = select.poll()
                poller.register(self._fd, select.POLLOUT)
                poller.poll()
                continue
            except OSError:
                # EPIPE: the reader is gone and nobody is left to tell.
                # Anything else (EBADF, EIO, ENOSPC): the same, the data is
                # lost either way and raising would kill the writer for good.
                # (EINTR never gets here: os.write retries it, PEP 475.)
                return
            view = view[written:]


_shared: BoundedLineWriter | None = None


def shared_sink(component: str) -> BoundedLineWriter:
    """The process's one bounded writer to stdout (created on first use)."""
    global _shared
    if _shared is None:
        _shared = BoundedLineWriter(1, component=component)
    return _shared


def flush_shared(timeout: float = 2.0) -> None:
    """Writes out what the shared writer holds (pre-freeze, exit)."""
    if _shared is not None:
        _shared.flush(timeout)
