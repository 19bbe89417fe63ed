"""Restart policy of the supervised planes: pure state, no processes.

A ``Component`` is one plane as the supervisor sees it. The supervisor loop
tells it what happened (started, ready, exited) with the monotonic time, and
asks it what to do next (when to start again, whether it is FATAL).

Rules (supervisord's and gunicorn's, made explicit):
- A component that exits is restarted after a bounded exponential backoff
  (``BACKOFF_BASE_S`` doubling up to ``BACKOFF_MAX_S``).
- A run that lasted ``STABLE_S`` or more resets the backoff: it was healthy.
- Flapping: more than ``FLAP_LIMIT`` exits within ``FLAP_WINDOW_S`` is FATAL.
- Deterministic boot errors fail fast: exit code ``EXIT_CONFIG`` before
  ready (the plane refused its config) is FATAL at once, without retrying.
- A component that is not ready within ``STARTUP_TIMEOUT_S`` is killed and
  handled as an exit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from supervisor.runstate import EXIT_BOOT_ERROR

BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 10.0
STABLE_S = 30.0
FLAP_WINDOW_S = 60.0
FLAP_LIMIT = 10
STARTUP_TIMEOUT_S = 30.0
EXIT_CONFIG = EXIT_BOOT_ERROR  # the planes' exit code for a deterministic boot error


@dataclass
class Component:
    name: str
    argv: list[str]
    state: str = "stopped"  # starting | running | backoff | exited | fatal | stopped
    pid: int | None = None
    restarts: int = 0
    started_at: float | None = None
    ready_at: float | None = None
    failures: int = 0  # consecutive short runs
    next_start_at: float | None = None
    fatal_reason: str = ""
    exits: deque[float] = field(default_factory=deque)

    def on_started(self, pid: int, now: float) -> None:
        self.pid = pid
        self.state = "starting"
        self.started_at = now
        self.ready_at = None
        self.next_start_at = None

    def on_ready(self, now: float) -> None:
        if self.state == "starting":
            self.state = "running"
            self.ready_at = now

    def startup_overdue(self, now: float) -> bool:
        return self.state == "starting" and self.started_at is not None and now - self.started_at > STARTUP_TIMEOUT_S

    def on_exit(self, code: int | None, now: float, restart: bool) -> None:
        """Records an exit; schedules the restart, or declares FATAL."""
        was_ready = self.ready_at is not None
        ran_for = now - self.started_at if self.started_at is not None else 0.0
        self.pid = None
        if not restart:
            self.state = "exited"
            return
        if code == EXIT_CONFIG and not was_ready:
            self.state = "fatal"
            self.fatal_reason = "refused its configuration (exit code 2)"
            return
        self.exits.append(now)
        while self.exits and now - self.exits[0] > FLAP_WINDOW_S:
            self.exits.popleft()
        if len(self.exits) > FLAP_LIMIT:
            self.state = "fatal"
            self.fatal_reason = f"exited {len(self.exits)} times within {FLAP_WINDOW_S:g}s"
            return
        self.failures = 0 if ran_for >= STABLE_S else self.failures + 1
        self.state = "backoff"
        self.next_start_at = now + self.backoff_delay()

    def backoff_delay(self) -> float:
        if self.failures <= 0:
            return 0.0
        return float(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** min(self.failures - 1, 32)))

    def due(self, now: float) -> bool:
        return self.state == "backoff" and self.next_start_at is not None and now >= self.next_start_at

    def record(self) -> dict[str, object]:
        return {"name": self.name, "pid": self.pid, "state": self.state, "restarts": self.restarts,
                "started_monotonic": self.started_at if self.pid is not None else None}
