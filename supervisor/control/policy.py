"""How many workers a pool should have, and which to retire: pure decisions.

No processes, no clocks read here: the caller passes the facts and executes
the answer, so every rule is tested with generated cases.

Rules:
- A pool keeps ``min_warm`` live workers (starting or ready; not draining,
  not due for replacement).
- Backlog: enough workers that every in-flight and queued invocation has a
  slot, ``ceil((inflight + queued) / concurrency)``, at once and several at
  a time, never above ``max_workers`` and never more than the backlog can use.
- Water level (Noslate's rule, on time-averaged load): when the ready
  workers' level, average in-flight over ``LOAD_WINDOW_S`` divided by their
  slots, reaches ``EXPAND_LEVEL``, the pool grows to bring it down to
  ``TARGET_LEVEL``; then it waits ``EXPAND_COOLDOWN_S`` before growing on
  that rule again. A steady load thus keeps a little headroom.
- Shrink: a ready worker idle for ``idle_ttl`` (awake time) may be retired,
  gracefully, while the pool stays at or above its floor: ``min_warm``, the
  backlog, and the headroom the highest load seen within the last
  ``idle_ttl`` needs at ``TARGET_LEVEL``. Under a steady load the floor
  equals what the water level grows to, so the pool neither grows nor
  shrinks: no oscillation. Which idle workers go is ``shrink_strategy``'s:
  ``lcc`` least current concurrency then the most recently idle, ``fifo``
  oldest first, ``filo`` newest first. A worker with work is never chosen.
- A stopped pool (``/pre-stop``, shutdown, removed by a reload) starts
  nothing.
- Failures back off: after ``n`` consecutive failures (to become ready, or
  deaths in a crash loop: ``exits``), nothing starts until
  ``backoff_delay(n)`` has passed; then one probe
  worker starts, not the whole pool, so a broken function does not spin.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
EXPAND_LEVEL = 0.8
TARGET_LEVEL = 0.6
LOAD_WINDOW_S = 2.0
EXPAND_COOLDOWN_S = 2.0
STRATEGIES = ("lcc", "fifo", "filo")


@dataclass(frozen=True, slots=True)
class PoolFacts:
    min_warm: int
    max_workers: int
    concurrency: int
    live: int  # starting + ready, not draining, not due for replacement
    starting: int
    inflight: int
    queued: int
    failures: int = 0  # consecutive failures to become ready (or deaths in a crash loop)
    backing_off: bool = False
    stopped: bool = False
    load: float = 0.0  # average in-flight over the last LOAD_WINDOW_S
    peak_load: float = 0.0  # the highest ``load`` seen within the last idle_ttl
    expand_ready: bool = True  # EXPAND_COOLDOWN_S has passed since the last water-level growth


@dataclass(frozen=True, slots=True)
class WorkerFacts:
    worker_id: str
    sequence: int  # start order: higher is newer
    inflight: int
    idle_s: float  # awake seconds since it last had work (0 while it has some)


def _slots_for(invocations: float, concurrency: int) -> int:
    return math.ceil(invocations / max(1, concurrency) - 1e-9) if invocations > 0 else 0


def backlog_workers(facts: PoolFacts) -> int:
    """Workers needed so that every in-flight and queued invocation has a slot."""
    return _slots_for(facts.inflight + facts.queued, facts.concurrency)


def headroom_workers(load: float, concurrency: int) -> int:
    """Workers that carry ``load`` at ``TARGET_LEVEL``."""
    return _slots_for(load / TARGET_LEVEL, concurrency)


def water_level(facts: PoolFacts) -> float:
    """Average in-flight over the ready workers' slots (0 with none ready)."""
    ready = facts.live - facts.starting
    return facts.load / (ready * max(1, facts.concurrency)) if ready > 0 else 0.0


def expands(facts: PoolFacts) -> bool:
    """Whether the water-level rule wants the pool to grow now."""
    return (not facts.stopped and facts.expand_ready and water_level(facts) >= EXPAND_LEVEL
            and headroom_workers(facts.load, facts.concurrency) > facts.live)


def target_workers(facts: PoolFacts) -> int:
    """How many live workers the pool should have now."""
    if facts.stopped:
        return 0
    want = max(facts.min_warm, backlog_workers(facts))
    if expands(facts):
        want = max(want, headroom_workers(facts.load, facts.concurrency))
    return min(facts.max_workers, want)


def workers_to_start(facts: PoolFacts) -> int:
    if facts.stopped or facts.backing_off:
        return 0
    missing = max(0, target_workers(facts) - facts.live)
    if facts.failures:
        # Probing after a failure: one at a time, and only when none is starting.
        return min(missing, 0 if facts.starting else 1)
    return missing


def floor_workers(facts: PoolFacts) -> int:
    """The fewest live workers shrinking may leave."""
    if facts.stopped:
        return 0
    floor = max(facts.min_warm, backlog_workers(facts), headroom_workers(facts.peak_load, facts.concurrency))
    return min(facts.max_workers, floor)


def workers_to_retire(facts: PoolFacts, workers: Sequence[WorkerFacts], idle_ttl: float,
                      strategy: str) -> list[str]:
    """Ids of the ready workers to retire now (gracefully), in order.

    ``workers`` are the pool's ready workers that are not already draining
    or due; the pool above its floor gives up idle ones only. Starting
    workers count as live here, so the caller does not shrink while any is
    starting (else ready ones could go before their successors are ready).
    """
    if facts.stopped:
        return []  # stopping is not shrinking: the caller stops them all
    surplus = facts.live - floor_workers(facts)
    if surplus <= 0:
        return []
    idle = [w for w in workers if w.inflight == 0 and w.idle_s >= idle_ttl]
    if strategy == "fifo":
        idle.sort(key=lambda w: w.sequence)
    elif strategy == "filo":
        idle.sort(key=lambda w: -w.sequence)
    else:  # lcc
        idle.sort(key=lambda w: (w.inflight, w.idle_s, -w.sequence))
    return [w.worker_id for w in idle[:surplus]]


def backoff_delay(failures: int) -> float:
    """Seconds to wait after ``failures`` consecutive failures (0 -> none)."""
    if failures <= 0:
        return 0.0
    return float(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** min(failures - 1, 32)))


def jittered_max_requests(max_requests: int, fraction: float) -> int:
    """A worker's own recycle point: ``max_requests`` plus up to 10 % more.

    ``fraction`` is a random number in [0, 1): workers started together do
    not all recycle together (gunicorn's max_requests_jitter, built in).
    """
    if max_requests <= 0:
        return 0
    return max_requests + int(max_requests * 0.1 * min(max(fraction, 0.0), 0.999999) + 0.5)


class LoadWindow:
    """Time-averaged in-flight invocations from a cumulative busy counter.

    The data plane reports ``busy_seconds``, in-flight invocations integrated
    over time; the average over a window is the counter's growth over the
    window's length. Samples are kept for ``keep_s`` (bounded by count too).
    """

    MAX_SAMPLES = 4096

    def __init__(self) -> None:
        self._busy: deque[tuple[float, float]] = deque()
        self._loads: deque[tuple[float, float]] = deque()

    def observe(self, now: float, busy_seconds: float) -> None:
        if self._busy and busy_seconds < self._busy[-1][1]:
            self._busy.clear()  # the data plane restarted: its counter began again
        self._busy.append((now, busy_seconds))
        while len(self._busy) > self.MAX_SAMPLES:
            self._busy.popleft()

    def load(self, now: float, window: float = LOAD_WINDOW_S) -> float:
        """Average in-flight over the last ``window`` seconds (or what the samples cover)."""
        busy = self._busy
        if not busy:
            return 0.0
        start = now - window
        while len(busy) > 2 and busy[1][0] <= start:
            busy.popleft()  # one sample at or before the window's start is enough
        t0, b0 = busy[0]
        if t0 < start and len(busy) >= 2:
            t1, b1 = busy[1]  # interpolate the counter at the window's start
            b0 = b0 + (b1 - b0) * (start - t0) / (t1 - t0) if t1 > t0 else b1
            t0 = start
        # A span much shorter than the window (just started) would turn one
        # burst into a huge average.
        span = max(now - t0, window / 4)
        return max(0.0, (busy[-1][1] - b0) / span)

    def note(self, now: float, keep_s: float) -> tuple[float, float]:
        """Records the current load; returns (load, the peak within ``keep_s``)."""
        current = self.load(now)
        loads = self._loads
        loads.append((now, current))
        while loads and loads[0][0] < now - keep_s:
            loads.popleft()
        while len(loads) > self.MAX_SAMPLES:
            loads.popleft()
        return current, max(value for _, value in loads)
