"""Why a worker ended, and whether its pool is in a crash loop: pure decisions.

The manager gathers the facts of one exit (or of a live worker) and executes
the answer: the exit's metric and log line, the pool's backoff, its health.
Nothing here reads a clock or touches a process, so every rule is tested
with generated cases (``tests/unit/test_exits.py``).

Rules:
- Every exit gets one reason (``supervisor_worker_exits_total``): the reason
  the control plane had for ending the worker (idle, recycled, disposable,
  timeout, shutdown, init_failed, oom), else ``crashed``. A cgroup that saw an
  OOM kill makes it ``oom`` (unless it was a timeout or a shutdown kill). A
  graceful reason (idle, recycled, disposable) holds only for a clean exit of
  a ready worker. A clean exit nobody asked for is ``shutdown`` when the
  function was removed by a reload and ``disposable`` for a disposable worker
  (it exits 0 only once drained). A crash before READY is ``init_failed``.
- An exit before READY (``init_failed``, or an OOM kill) is a failure to
  initialize: the pool backs off, as it always has.
- A worker that completed an invocation, or stayed up ``STABLE_S`` after
  READY, has shown that it can serve: its end, however it comes, is never a
  failure to initialize, and it ends the pool's *streak*. One completed
  invocation of a live worker ends it too (``streak_while_alive``).
- A ready worker that dies (``crashed``, ``oom``) with invocations in flight
  is a crash: those invocations fail (``WorkerCrashedError``), the pool
  replaces it, and queued invocations wait for the replacement. The input
  may be what killed it, so a crash with work in flight never starts a crash
  loop: a poison input costs only its own invocation, however often it comes.
- A ready worker that dies idle, having completed nothing, within
  ``STABLE_S`` of READY, adds one to the pool's streak. ``CRASH_LOOP_AFTER``
  in a row are a crash loop: the pool backs off (invocations get
  ``InitializationError`` naming it, ``/initialize`` fails with it).
- In a crash loop every death of a ready worker that completed nothing, idle
  or not, prolongs it (one more failure: a longer backoff); it ends only as
  the streak does.
- Other ends of a worker that completed nothing (a timeout kill, a graceful
  stop) leave the streak as it was: they prove nothing either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

CRASH_LOOP_AFTER = 3
STABLE_S = 5.0  # awake seconds after READY that show a worker can run
GRACEFUL_REASONS = ("idle", "recycled", "disposable")
CRASH_REASONS = ("crashed", "oom")


@dataclass(frozen=True, slots=True)
class ExitFacts:
    end_reason: str | None  # why the control plane ended it (None: it did not)
    exit_code: int | None  # None: killed by a signal (or unknown)
    ready: bool  # it reported READY
    oom_killed: bool = False  # its cgroup counted an OOM kill
    disposable: bool = False
    removed: bool = False  # its function was removed by a reload


def exit_reason(facts: ExitFacts) -> str:
    """The exit's one reason (see the rules)."""
    reason = facts.end_reason or "crashed"
    if facts.oom_killed and reason not in ("timeout", "shutdown"):
        reason = "oom"  # the kernel's OOM killer, at the cgroup's memory limit
    if reason == "crashed" and facts.exit_code == 0:
        if facts.removed:
            reason = "shutdown"  # the data plane drained it
        elif facts.disposable:
            reason = "disposable"  # it served its invocation before the notices reached us
    if reason in GRACEFUL_REASONS and facts.exit_code != 0 and facts.ready:
        reason = "crashed"  # it was meant to finish cleanly and did not
    if reason == "crashed" and not facts.ready:
        reason = "init_failed"
    return reason


@dataclass(frozen=True, slots=True)
class Life:
    """What a worker did between READY and its end (as the data plane saw it)."""

    ready_for_s: float | None  # awake seconds from READY to the end; None: never ready
    completed: int  # invocations it completed (at least)
    inflight: int  # invocations on it when it ended


class Kind(StrEnum):
    INIT_FAILURE = "init_failure"  # ended before READY: a failure to initialize
    CRASH = "crash"  # died while it could serve: its in-flight invocations fail, it is replaced
    IDLE_DEATH = "idle_death"  # ready, died idle having completed nothing, soon after READY
    END = "end"  # any other end: says nothing about the pool's health


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Kind
    streak: int  # the pool's streak after this exit
    crash_loop: bool  # the pool is in a crash loop after this exit
    backs_off: bool  # one more failure for the pool (its backoff grows)


def in_crash_loop(streak: int) -> bool:
    return streak >= CRASH_LOOP_AFTER


def proved(life: Life) -> bool:
    """Whether the worker has shown it can serve."""
    return life.completed > 0 or (life.ready_for_s is not None and life.ready_for_s >= STABLE_S)


def judge(reason: str, life: Life, streak: int) -> Verdict:
    """What one exit (its ``exit_reason``) means for its pool, whose streak is ``streak``."""
    streak = max(0, streak)
    if life.ready_for_s is None:
        kind = Kind.INIT_FAILURE if reason in ("init_failed", "oom") else Kind.END
        return Verdict(kind, streak, in_crash_loop(streak), backs_off=kind == Kind.INIT_FAILURE)
    crashed = reason in CRASH_REASONS
    if proved(life):
        return Verdict(Kind.CRASH if crashed else Kind.END, 0, False, backs_off=False)
    if not crashed:
        return Verdict(Kind.END, streak, in_crash_loop(streak), backs_off=False)
    if life.inflight and not in_crash_loop(streak):
        return Verdict(Kind.CRASH, streak, False, backs_off=False)
    after = streak + 1
    kind = Kind.CRASH if life.inflight else Kind.IDLE_DEATH
    return Verdict(kind, after, in_crash_loop(after), backs_off=in_crash_loop(after))


def streak_while_alive(streak: int, life: Life) -> int:
    """The pool's streak given one of its live ready workers (``life.inflight`` is ignored)."""
    return 0 if proved(life) else max(0, streak)
