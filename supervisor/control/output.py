"""A worker's captured stdout and stderr, re-emitted as log lines, with FC's markers.

Rules and invariants:

* All workers share one bounded, non-blocking writer to the control plane's
  stdout: a flooding worker never stalls, and never grows this process's
  memory; lines are dropped and counted instead. Both pipes of one worker
  share one ``Attributor`` (untagged lines follow the worker's boundary
  records on stdout, see :mod:`supervisor.control.logpump`).
* FC's markers (``FC Invoke Start RequestId: <id>`` ...) are written here,
  never by a worker: one JSON line each with ``component: "control-plane"``,
  ``marker`` (``start``/``end``), ``kind``, ``request_id``, ``function`` and
  ``worker`` (:func:`supervisor.logs.emit_marker_line`), a field set no
  worker line can have. A marker exists only because the data plane
  asserted the invocation on the channel of :mod:`supervisor.marks`
  (:func:`listen_for_marks` at start);
  :class:`supervisor.control.markers.Placer` decides where it goes among the
  worker's lines. Whatever a worker prints, however it prints it, stays
  that worker's line (``component: "worker"``, its stream).
* Order. The assertions are read after every read of any worker pipe and
  before its lines are handled (``after_read``), and whenever the channel is
  readable: a Start is always known before the worker's lines for it are
  handled. Raw writes to fd 2 (the stderr pipe) keep their place between
  the boundaries: before each end boundary of a worker its stderr pipe is
  read, and before the stderr pump handles what it read, the stdout pipe is
  handled up to its next end boundary (the start boundaries in it were
  written before); one read each, so under a flood this order is best
  effort and no worker takes more than its turn.
  An end asserted before the worker's end boundary was seen makes the
  worker's pipes be read through (up to their size: all they held when the
  end was asserted) on the next loop iteration, then shows the End.
* A traceback is one record (:mod:`supervisor.control.traces`); one still
  open when an invocation's End is shown is logged before it.
* A worker's output stays registered for ``RETAIN_S`` after its pipes
  close, so that the end of an invocation that killed it still gets its End
  (the data plane learns of the death after the pipes close); then every
  End still missing is shown, and it is forgotten.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from supervisor import marks
from supervisor.control.logpump import READ_SIZE, Attributor, Pump
from supervisor.control.markers import Marker, Placer
from supervisor.logs import emit_marker_line, get_logger
from supervisor.output import shared_sink

__all__ = ["DRAIN_GRACE_S", "RETAIN_S", "WorkerOutput", "listen_for_marks", "read_marks", "stop_listening"]

# After the worker exits, a child it started may still hold its pipes open:
# the pumps get this long to reach EOF, then stop.
DRAIN_GRACE_S = 1.0
RETAIN_S = 10.0

log = get_logger()

# Worker id -> its output, while its markers may still come.
_outputs: dict[str, WorkerOutput] = {}
_reader: marks.MarkReader | None = None


def listen_for_marks(path: Path) -> None:
    """Makes the data plane's FIFO at ``path`` and reads it from now on
    (control-plane start; see :mod:`supervisor.marks`)."""
    global _reader
    stop_listening()
    try:
        _reader = marks.MarkReader.open(path)
    except OSError as exc:
        log.error("cannot make the FIFO for FC's markers; workers' invocations get none",
                  path=str(path), error=str(exc))
        return
    asyncio.get_running_loop().add_reader(_reader.fd, read_marks)


def stop_listening() -> None:
    """Stops reading the FIFO and closes it (tests; a plane just exits)."""
    global _reader
    if _reader is not None:
        asyncio.get_running_loop().remove_reader(_reader.fd)
        _reader.close()
        _reader = None


def read_marks() -> None:
    """Applies every assertion the data plane has written so far."""
    reader = _reader
    if reader is None:
        return
    records = reader.read()
    position = reader.count
    for record in records:
        if record.op == "H":
            for each in list(_outputs.values()):
                each.data_plane_started(position)
            continue
        found = _outputs.get(record.worker)
        if found is None:
            continue  # a worker this control plane never had (an earlier plane's), or long gone
        if record.op == "S":
            found.placer.asserted_start(record.kind, record.request_id)
        else:
            found.asserted_end(record.request_id, position)


class WorkerOutput:
    def __init__(self, stdout_fd: int, stderr_fd: int, *, function: str, worker: str, fmt: str,
                 component: str = "worker") -> None:
        self.function = function
        self.worker = worker
        self.fmt = fmt
        self.sink = shared_sink("control-plane")
        self.attributor = Attributor()
        self.placer = Placer()
        self._flush_pending = False
        self._over = False  # both pipes closed
        self.stdout = Pump(stdout_fd, function=function, worker=worker, stream="stdout", sink=self.sink, fmt=fmt,
                           attributor=self.attributor, component=component, on_boundary=self._boundary,
                           after_read=read_marks)
        self.stderr = Pump(stderr_fd, function=function, worker=worker, stream="stderr", sink=self.sink, fmt=fmt,
                           attributor=self.attributor, component=component, after_read=read_marks,
                           before_lines=self.stdout.catch_up)
        self.tasks = [asyncio.ensure_future(self.stdout.run()), asyncio.ensure_future(self.stderr.run())]
        if worker:  # a seed's output (worker "") runs no invocation
            _outputs[worker] = self
            for task in self.tasks:
                task.add_done_callback(self._pump_done)

    def close_when_drained(self) -> None:
        """The worker exited: stop the pumps once they are done or after a grace."""
        pending = [t for t in self.tasks if not t.done()]
        if not pending:
            return

        def stop() -> None:
            for task in pending:
                task.cancel()

        asyncio.get_running_loop().call_later(DRAIN_GRACE_S, stop)

    # ---- the data plane's word -------------------------------------------------

    def asserted_end(self, request_id: str, position: int) -> None:
        shown, read_through = self.placer.asserted_end(request_id, position)
        self._show(shown)
        if read_through:
            self._flush_soon()

    def data_plane_started(self, position: int) -> None:
        shown, read_through = self.placer.all_over(position)
        self._show(shown)
        if read_through:
            self._flush_soon()

    # ---- the worker's boundaries -----------------------------------------------

    def _boundary(self, phase: str, request_id: str) -> None:
        if phase == "S":
            self._show(self.placer.began(request_id))
        else:
            # What the worker wrote to fd 2 before its end goes before it (one
            # read: under a flood of fd 2, the order of the two pipes is best effort),
            # a traceback in it included.
            self.stderr.drain(READ_SIZE)
            self.stderr.flush_trace()
            self._show(self.placer.ended(request_id))
        self.attributor.boundary(phase, request_id)

    # ---- internals ---------------------------------------------------------------

    def _flush_soon(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Reads the pipes through, then shows the ends asserted before."""
        self._flush_pending = False
        position = _reader.count if _reader is not None else 0
        self.stdout.drain()
        self.stderr.drain()
        shown = self.placer.drained(position)
        if shown:  # an invocation is over: its tracebacks go before its End
            self.stdout.flush_trace()
            self.stderr.flush_trace()
        self._show(shown)

    def _pump_done(self, _task: asyncio.Future[None]) -> None:
        if all(task.done() for task in self.tasks) and not self._over:
            self._over = True
            self._show(self.placer.output_over())
            asyncio.get_running_loop().call_later(RETAIN_S, self._retire)

    def _retire(self) -> None:
        self._show(self.placer.expire())
        if _outputs.get(self.worker) is self:
            del _outputs[self.worker]

    def _show(self, markers: list[Marker]) -> None:
        for marker in markers:
            emit_marker_line(self.sink, kind=marker.kind, phase=marker.phase, request_id=marker.request_id,
                             function=self.function, worker=self.worker, fmt=self.fmt)
