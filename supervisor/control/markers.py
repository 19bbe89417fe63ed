"""Where FC's markers go in one worker's output: the pure decision.

Two sources meet here (:mod:`supervisor.control.output` feeds both):

* *Assertions* from the data plane (:mod:`supervisor.marks`), which user
  code cannot reach: invocation X of some kind was sent to this worker;
  later, X is over. Only they make a marker exist.
* *Boundaries* the worker runtime writes into its own stdout pipe, in order
  with the invocation's lines (``worker.output.marker``). User code can
  forge or suppress these, so they only say *where* an asserted marker
  goes, never *whether* there is one.

Rules and invariants:

* Exactly one Start and one End per asserted invocation, End after Start,
  and never a marker for anything that was not asserted: forged boundaries
  for other requests, or repeated ones, change nothing here.
* Start goes where the worker's start boundary is. Its assertion is always
  known by then: the data plane writes it before the invocation's frame
  leaves, and the caller reads the assertions after each read of the pipe,
  before the lines read.
* End goes at the later of the worker's end boundary and the assertion of
  the end: the end is never shown before the data plane knows the
  invocation is over, so a handler that forges its own end early only moves
  its own lines, past its own marker. Without an end boundary (the worker
  died or timed out, or its stdout was broken) the End goes after the
  worker's output has been read through (:meth:`Placer.drained`, told a
  position in the assertions).
* An invocation whose start boundary never came still gets its Start, just
  before its End, except a worker's initializer (kind ``initialize``): a
  worker that reconnects to a restarted data plane is asserted again but
  does not run it again, so without its boundary nothing is shown.
* State is bounded: at most :data:`MAX_OPEN` invocations per worker are
  kept (the oldest goes, unshown, past that).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import count
from typing import NamedTuple

__all__ = ["MAX_OPEN", "Marker", "Placer"]

MAX_OPEN = 1024


class Marker(NamedTuple):
    kind: str  # invoke, initialize, pre_freeze, pre_stop
    phase: str  # start, end
    request_id: str


class _Open:
    __slots__ = ("kind", "request_id", "order", "started", "began", "ended", "end_at")

    def __init__(self, kind: str, request_id: str, order: int) -> None:
        self.kind = kind
        self.request_id = request_id
        self.order = order  # assertion order: markers that come out together keep it
        self.started = False  # its Start is out
        self.began = False  # the worker's start boundary was seen
        self.ended = False  # the worker's end boundary was seen
        self.end_at: int | None = None  # the position of the assertion of its end


def _order(entry: _Open) -> int:
    return entry.order


class Placer:
    """One worker's asserted invocations and where their markers go."""

    __slots__ = ("_open", "_size", "_over", "_orders")

    def __init__(self) -> None:
        self._open: dict[str, list[_Open]] = {}  # request id -> its invocations, oldest first
        self._size = 0
        self._over = False  # the worker's output is closed: nothing more comes
        self._orders = count()

    @property
    def waiting(self) -> bool:
        """Whether an asserted invocation has no End yet."""
        return self._size > 0

    def asserted_start(self, kind: str, request_id: str) -> None:
        self._open.setdefault(request_id, []).append(_Open(kind, request_id, next(self._orders)))
        self._size += 1
        if self._size > MAX_OPEN:
            self._remove(min((entries[0] for entries in self._open.values()), key=_order))

    def asserted_end(self, request_id: str, position: int) -> tuple[list[Marker], bool]:
        """The data plane says ``request_id`` is over (its ``position``-th assertion).

        Returns the markers to show now, and whether the worker's output must
        be read through first (then :meth:`drained` shows the End).
        """
        entry = self._first(request_id, lambda e: e.end_at is None)
        if entry is None:
            return [], False
        entry.end_at = position
        if entry.ended or self._over:
            return self._finish(entry), False
        return [], True

    def began(self, request_id: str) -> list[Marker]:
        """The worker's start boundary for ``request_id``."""
        entry = self._first(request_id, lambda e: not e.began)
        if entry is None:
            return []
        entry.began = entry.started = True
        return [Marker(entry.kind, "start", request_id)]

    def ended(self, request_id: str) -> list[Marker]:
        """The worker's end boundary for ``request_id``."""
        entry = self._first(request_id, lambda e: e.began and not e.ended)
        if entry is None:
            return []
        entry.ended = True
        return self._finish(entry) if entry.end_at is not None else []

    def drained(self, position: int) -> list[Marker]:
        """The worker's output was read through after the ``position``-th
        assertion had been read: every end asserted by then is shown."""
        return self._finish_all(lambda e: e.end_at is not None and e.end_at <= position)

    def all_over(self, position: int) -> tuple[list[Marker], bool]:
        """The data plane restarted: whatever was asserted before is over."""
        shown: list[Marker] = []
        needs_drain = False
        for entry in sorted(self._entries(lambda e: e.end_at is None), key=_order):
            markers, drain = self.asserted_end(entry.request_id, position)
            shown += markers
            needs_drain = needs_drain or drain
        return shown, needs_drain

    def output_over(self) -> list[Marker]:
        """The worker's pipes are closed: ends asserted already are shown now, later ones at once."""
        self._over = True
        return self._finish_all(lambda e: e.end_at is not None)

    def expire(self) -> list[Marker]:
        """Stop waiting (the worker is long gone): every open invocation gets its End."""
        return self._finish_all(lambda e: True)

    # ---- internals ----------------------------------------------------------

    def _entries(self, test: Callable[[_Open], bool]) -> list[_Open]:
        return [e for entries in self._open.values() for e in entries if test(e)]

    def _first(self, request_id: str, test: Callable[[_Open], bool]) -> _Open | None:
        for entry in self._open.get(request_id, ()):
            if test(entry):
                return entry
        return None

    def _finish_all(self, test: Callable[[_Open], bool]) -> list[Marker]:
        return [marker for entry in sorted(self._entries(test), key=_order) for marker in self._finish(entry)]

    def _finish(self, entry: _Open) -> list[Marker]:
        self._remove(entry)
        if entry.started:
            return [Marker(entry.kind, "end", entry.request_id)]
        if entry.kind == "initialize":
            return []  # the worker did not run it (see the module docstring)
        return [Marker(entry.kind, "start", entry.request_id), Marker(entry.kind, "end", entry.request_id)]

    def _remove(self, entry: _Open) -> None:
        entries = self._open.get(entry.request_id)
        if entries and entry in entries:
            entries.remove(entry)
            self._size -= 1
            if not entries:
                del self._open[entry.request_id]
