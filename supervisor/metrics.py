"""The contract's Prometheus series, defined once, and how a scrape merges them.

Each series is owned by exactly one process, so that a scrape can
concatenate the expositions of the planes without two processes ever
writing the same family:

- data plane: invocations, durations, queue wait, and (computed at scrape
  time from its live pools, so the request path never touches a gauge)
  ready, workers by state, capacity, in-flight, queue depth, plus the
  supervisor's component restarts read from its state file;
- control plane: worker starts, start latency, exits by reason, memory,
  whether each seed is ready (its restarts reach the data plane's
  ``supervisor_component_restarts_total`` through ``run_dir/seeds.json``).

Workers never write metrics: nothing they send becomes a series or a label
value other than the function and worker ids the supervisor assigned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

OUTCOMES = ("success", "error", "timeout", "rejected", "crashed", "cancelled")
EXIT_REASONS = ("idle", "recycled", "crashed", "timeout", "oom", "shutdown", "disposable", "init_failed")
WORKER_STATES = ("starting", "idle", "busy", "draining")

INVOCATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                      10.0, 30.0, 60.0, 120.0, 300.0)
QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)
START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class DataPlaneMetrics:
    """The data plane's own series; label children are cached per function."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.invocations = Counter("supervisor_invocations", "Invocations by outcome.",
                                   ["function", "outcome"], registry=registry)
        self.duration = Histogram("supervisor_invocation_duration_seconds",
                                  "Time from dispatch to a worker until its result.", ["function"],
                                  buckets=INVOCATION_BUCKETS, registry=registry)
        self.queue_wait = Histogram("supervisor_queue_wait_seconds",
                                    "Time an invocation waited for a free worker slot.", ["function"],
                                    buckets=QUEUE_BUCKETS, registry=registry)
        self._children: dict[str, FunctionSeries] = {}

    def function(self, name: str) -> FunctionSeries:
        series = self._children.get(name)
        if series is None:
            series = self._children[name] = FunctionSeries(self, name)
        return series


class FunctionSeries:
    """Pre-resolved label children: the hot path does no label lookups."""

    __slots__ = ("outcome", "duration", "queue_wait")

    def __init__(self, metrics: DataPlaneMetrics, name: str) -> None:
        self.outcome = {o: metrics.invocations.labels(name, o) for o in OUTCOMES}
        self.duration = metrics.duration.labels(name)
        self.queue_wait = metrics.queue_wait.labels(name)


PoolView = tuple[str, dict[str, int], int, int, int]  # function, states, capacity, inflight, queue


class ClientStatsSource(Protocol):
    """A server's client counts (``cahttp.server.HttpServer``)."""

    name: str

    @property
    def stats(self) -> Any: ...

    @property
    def state(self) -> Any: ...


class ClientCollector(Collector):
    """What the front's servers did to their clients, read at scrape time: open
    connections, answers the server gave on its own (malformed requests, heads too
    large, unsupported encodings), connections shed at the connection limit, and
    client timeouts."""

    def __init__(self, servers: Sequence[ClientStatsSource]) -> None:
        self._servers = servers

    def collect(self) -> Iterator[Any]:
        open_ = GaugeMetricFamily("supervisor_client_connections", "Open client connections.", labels=["port"])
        refused = CounterMetricFamily("supervisor_client_refused", "Requests the server answered itself "
                                      "(400, 414, 431, 501).", labels=["port", "reason"])
        shed = CounterMetricFamily("supervisor_client_connections_shed", "Connections closed at the connection "
                                   "limit, by what they were doing.", labels=["port", "state"])
        timed_out = CounterMetricFamily("supervisor_client_timeouts", "Clients timed out, by phase.",
                                        labels=["port", "phase"])
        for server in self._servers:
            stats = server.stats
            open_.add_metric([server.name], len(server.state.connections))
            for family, counts in ((refused, stats.refused), (shed, stats.shed), (timed_out, stats.timed_out)):
                for key, count in sorted(counts.items()):
                    family.add_metric([server.name, key], count)
        yield from (open_, refused, shed, timed_out)


class LiveCollector(Collector):
    """Gauges read from live state at scrape time."""

    def __init__(self, ready: Callable[[], bool], pools: Callable[[], Iterable[PoolView]],
                 restarts: Callable[[], dict[str, int]]) -> None:
        self._ready = ready
        self._pools = pools
        self._restarts = restarts

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily("supervisor_ready", "1 when min_warm is met everywhere and not draining.",
                                value=1.0 if self._ready() else 0.0)
        workers = GaugeMetricFamily("supervisor_workers", "Workers by state.", labels=["function", "state"])
        capacity = GaugeMetricFamily("supervisor_capacity_slots", "Ready workers times concurrency.",
                                     labels=["function"])
        inflight = GaugeMetricFamily("supervisor_inflight_requests", "Invocations running on workers.",
                                     labels=["function"])
        queue = GaugeMetricFamily("supervisor_queue_depth", "Invocations waiting for a worker slot.",
                                  labels=["function"])
        for function, states, cap, running, waiting in self._pools():
            for state in WORKER_STATES:
                workers.add_metric([function, state], states.get(state, 0))
            capacity.add_metric([function], cap)
            inflight.add_metric([function], running)
            queue.add_metric([function], waiting)
        yield from (workers, capacity, inflight, queue)
        restarts = CounterMetricFamily("supervisor_component_restarts", "Restarts of supervised components.",
                                       labels=["component"])
        for component, count in self._restarts().items():
            restarts.add_metric([component], count)
        yield restarts


class ControlPlaneMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.starts = Counter("supervisor_worker_starts", "Worker processes started.", ["function", "mode"],
                              registry=registry)
        self.start_seconds = Histogram("supervisor_worker_start_seconds",
                                       "From the decision to start a worker until it is ready.",
                                       ["function", "mode"], buckets=START_BUCKETS, registry=registry)
        self.exits = Counter("supervisor_worker_exits", "Worker processes that ended, by reason.",
                             ["function", "reason"], registry=registry)
        self.memory = Gauge("supervisor_worker_memory_bytes", "Resident memory of each worker.",
                            ["function", "worker"], registry=registry)
        self.seed_ready = Gauge("supervisor_seed_ready",
                                "1 while the function's seed forks its workers; 0: they start by spawn.",
                                ["function"], registry=registry)


def exposition(registry: CollectorRegistry, openmetrics: bool) -> bytes:
    if openmetrics:
        from prometheus_client.openmetrics.exposition import generate_latest as generate_om

        return bytes(generate_om(registry))  # type: ignore[no-untyped-call]
    from prometheus_client import generate_latest

    return bytes(generate_latest(registry))


OPENMETRICS_EOF = b"# EOF\n"


def merge_expositions(parts: Iterable[bytes], openmetrics: bool) -> bytes:
    """Concatenates expositions of disjoint families (one EOF for OpenMetrics)."""
    if not openmetrics:
        return b"".join(parts)
    body = b"".join(p[: -len(OPENMETRICS_EOF)] if p.endswith(OPENMETRICS_EOF) else p for p in parts)
    return body + OPENMETRICS_EOF
