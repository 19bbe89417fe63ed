"""How many workers a pool should start: pure decisions over plain numbers.

No processes, no clocks read here: the caller passes the facts and executes
the answer, so every rule is tested with generated cases.

Rules:
- A pool keeps ``min_warm`` live workers (starting or ready, not draining).
- Demand adds workers: enough that every in-flight and queued invocation
  has a slot, ``ceil((inflight + queued) / concurrency)``, never above
  ``max_workers`` and never more than the backlog can use.
- A stopped pool (``/pre-stop``, shutdown) starts nothing.
- Failures back off: after ``n`` consecutive failures to become ready
  (initializer error, crash before ready), nothing starts until
  ``backoff_delay(n)`` has passed; then one probe worker starts, not the
  whole pool, so a broken function does not spin the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class PoolFacts:
    min_warm: int
    max_workers: int
    concurrency: int
    live: int  # starting + ready, not draining
    starting: int
    inflight: int
    queued: int
    failures: int = 0  # consecutive failures to become ready
    backing_off: bool = False
    stopped: bool = False


def target_workers(facts: PoolFacts) -> int:
    """How many live workers the pool should have now."""
    if facts.stopped:
        return 0
    needed = -(-(facts.inflight + facts.queued) // max(1, facts.concurrency))
    return min(facts.max_workers, max(facts.min_warm, needed))


def workers_to_start(facts: PoolFacts) -> int:
    if facts.stopped or facts.backing_off:
        return 0
    missing = max(0, target_workers(facts) - facts.live)
    if facts.failures:
        # Probing after a failure: one at a time, and only when none is starting.
        return min(missing, 0 if facts.starting else 1)
    return missing


def backoff_delay(failures: int) -> float:
    """Seconds to wait after ``failures`` consecutive failures (0 -> none)."""
    if failures <= 0:
        return 0.0
    return float(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** min(failures - 1, 32)))
