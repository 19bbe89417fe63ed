"""Freeze-safe time.

FC freezes an idle container (after ``/pre-freeze``) and thaws it for the
next request, minutes or hours later. CLOCK_MONOTONIC keeps running while a
cgroup is frozen, so a timer armed before the freeze sees the whole pause as
if the process had been awake. ``AwakeClock`` measures only time the process
could have acted in: a ticker notes the time every ``tick`` seconds, and a
gap between two notes longer than ``max_gap`` counts as ``max_gap`` (the
process was stopped, not slow). Idle retirement and hang detection compare
awake time, so a thaw never looks like a hang or an idle timeout.

The rule for users of this clock: measure spans with ``awake()``, and when a
wall timer fires, ask whether the awake span really elapsed; if not, re-arm
for the remainder.
"""

from __future__ import annotations

import asyncio
import time


class AwakeClock:
    def __init__(self, tick: float = 0.25, max_gap: float = 2.0) -> None:
        self.tick = tick
        self.max_gap = max_gap
        self._last = time.monotonic()
        self._awake = 0.0
        self.frozen_total = 0.0

    def note(self, now: float | None = None) -> float:
        """Records the passage of time up to ``now``; returns the awake time."""
        now = time.monotonic() if now is None else now
        gap = now - self._last
        if gap > self.max_gap:
            self.frozen_total += gap - self.max_gap
            gap = self.max_gap
        if gap > 0:
            self._awake += gap
        self._last = max(self._last, now)
        return self._awake

    def awake(self, now: float | None = None) -> float:
        """Awake seconds since the clock was made (a gap counts as max_gap)."""
        now = time.monotonic() if now is None else now
        gap = min(max(0.0, now - self._last), self.max_gap)
        return self._awake + gap

    async def run(self) -> None:
        """The ticker: keep it running in the process's task group."""
        while True:
            self.note()
            await asyncio.sleep(self.tick)
