#!/usr/bin/env python3
"""Custom runtimes: a minimal Node.js and Python HTTP server, hit directly and through ``supervisor run``.

    .venv/bin/python bench/custom.py                # full run (~5 min), prints a Markdown section
    .venv/bin/python bench/custom.py --write        # also puts it into bench/RESULTS.md, between
                                                    # <!-- custom:start --> and <!-- custom:end -->
    .venv/bin/python bench/custom.py --quick        # smoke run (3 s wrk, 1000 requests, 5 starts)
    .venv/bin/python bench/custom.py --profile      # also py-spy the adapter and the data plane

Everything below runs side by side in one run, for each server whose runtime is installed (a
missing one is skipped, and the section says why).

Servers (the function; both answer GET / with "hello, world\\n" and POST /invoke with a small JSON):

  node    bench/handlers/node_server/server.js   node's own ``http``, no npm packages
  python  bench/handlers/py_server.py            an asyncio protocol with httptools' parser on uvloop

Targets:

  direct      the server alone on a port (one process)
  direct x2   the same with 2 processes sharing the port (node's cluster / SO_REUSEPORT): what
              "sup N=2" is compared with, since it runs two servers
  sup N=k     ``supervisor run`` with one ``runtime = "custom"`` function running that server,
              ``min_warm = max_workers = k`` (k = 1, 2; 2 cores), ``concurrency = 64``. Each worker is
              a Python adapter (worker/runtimes/custom.py) that starts its own copy of the server.
  sup N=2 c=32  the same with ``concurrency = 64/k``: the data plane packs work onto the most recently
              freed worker, so with concurrency >= wrk's 64 connections one worker takes everything;
              this spreads the connections over every worker (--no-spread skips it).

Paths:

  GET /         on the supervisor an HTTP-trigger request: data plane -> adapter (frames on a unix
                socket) -> the server over keep-alive loopback HTTP (aiohttp), the answer streamed back
  POST /invoke  on the supervisor an event invocation, which the adapter forwards as POST /invoke

Measurements:

  latency     sequential requests on one keep-alive connection (http.client, TCP_NODELAY), N of them
              after a warm-up; p50/p90/p99. Added latency = supervisor minus direct, same run.
  throughput  ``wrk -t2 -c64 -dSs --latency`` (bench/post.lua for POST /invoke), req/s, p50/p99,
              non-2xx and socket errors. CPU during the run per role (supervisor, control-plane,
              data-plane, adapter, server; from psutil, roles from ``supervisor status --json``) and
              the busiest single process, plus bench/common.py's CpuWatch (wrk, other processes).
  start       a custom worker's start: the control plane's ``start_ms`` (decision to start -> adapter
              spawned, server started and answering ``ready``, worker connected) from its "worker
              ready" log lines, cross-checked with ``supervisor_worker_start_seconds``. Starts one at
              a time come from a ``disposable = true`` function (each invocation spends its worker,
              the next waits for the replacement); next to it the server alone: spawn -> first 200
              on GET /, polled every 2 ms.
  profile     (--profile) py-spy record on the adapter and on the data plane of "sup N=1" during an
              extra wrk run per path (not the measured one: sampling slows them down); top costs.

Helpers come from bench/run.py (wrk, its output, waiting for a 200, the supervisor's log) and
bench/common.py (processes, CPU accounting, percentiles). Every process started here is a
common.Managed (own session, stopped with a deadline on exit, error and Ctrl-C) and every wait has a
deadline. The section goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import common
import psutil
import run
from common import BENCH, BODY, ROOT, CpuWatch, Managed, free_port, pct, say, tail, wait_for_quiet

RESULTS = BENCH / "RESULTS.md"
START_MARK, END_MARK = "<!-- custom:start -->", "<!-- custom:end -->"
NOTES_HEADING = "## Notes"
SUPERVISOR = str(run.BIN / "supervisor")
PYTHON = run.PYTHON
PATHS = (("GET", "/"), ("POST", "/invoke"))
WRK_CONNECTIONS = 64


@dataclass(frozen=True)
class Server:
    name: str
    title: str
    command: list[str]
    code_dir: Path


def servers() -> tuple[list[Server], dict[str, str]]:
    """The servers whose runtime is installed, and why the others are skipped."""
    found: list[Server] = []
    skipped: dict[str, str] = {}
    node = shutil.which("node")
    if node:
        version = common.run_text([node, "--version"])
        found.append(Server("node", f"Node.js {version} `http` (bench/handlers/node_server/server.js)",
                            ["node", "server.js"], BENCH / "handlers" / "node_server"))
    else:
        skipped["node"] = "`node` is not on PATH"
    missing = [mod for mod in ("httptools", "uvloop") if find_spec(mod) is None]
    if "httptools" in missing:
        skipped["python"] = "httptools is not installed in the venv"
    else:
        loop = "asyncio" if missing else "uvloop"
        found.append(Server("python", f"Python {sys.version.split()[0]} asyncio protocol + httptools on {loop} "
                            "(bench/handlers/py_server.py)", [PYTHON, "py_server.py"], BENCH / "handlers"))
    return found, skipped


# ---------------------------------------------------------------------------
# targets: the server alone, or a supervisor running it
# ---------------------------------------------------------------------------


def server_env(port: int, procs: int = 1) -> dict[str, str]:
    env = run.supervisor_env()
    env.update({"FC_SERVER_PORT": str(port), "PORT": str(port), "SERVER_PROCS": str(procs)})
    return env


def get_ok(port: int, timeout: float = 1.0) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def start_direct(server: Server, workdir: Path, procs: int) -> tuple[Managed, int, float]:
    """The server alone on a free port; returns it, its port and ms from spawn to the first 200 on GET /."""
    port = free_port()
    log = workdir / f"{server.name}-direct-x{procs}.log"
    proc = Managed(f"{server.name} direct x{procs}", server.command, stdout=open(log, "wb"),
                   env=server_env(port, procs), cwd=server.code_dir)
    deadline = time.monotonic() + 15
    while not get_ok(port):
        if not proc.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: no 200 on GET / within 15 s (exit {proc.popen.poll()}); "
                               f"log:\n{tail(log)}")
        time.sleep(0.002)
    took_ms = (time.perf_counter() - proc.started) * 1000
    if procs > 1:  # every process must be up before measuring (the primary + procs)
        while len(proc.tree()) < procs + 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name}: {len(proc.tree())} processes, expected {procs + 1}")
            time.sleep(0.02)
        time.sleep(0.3)
    return proc, port, took_ms


@dataclass
class SupervisorRun:
    proc: Managed
    port: int
    metrics_port: int
    dir: Path
    function: str
    ready_s: float = 0.0
    log_offset: int = 0
    roles_by_pid: dict[int, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.dir / "stdout.jsonl"

    def status(self) -> dict[str, Any]:
        out = common.run_text([SUPERVISOR, "status", "--json", "--run-dir", str(self.dir / "run")], timeout=15)
        try:
            return json.loads(out[out.index("{"):])  # type: ignore[no-any-return]
        except ValueError:
            return {}

    def learn_roles(self) -> dict[int, str]:
        """pid -> role, from `supervisor status --json` (the adapters' children are "server")."""
        st = self.status()
        roles = {self.proc.pid: "supervisor"}
        for comp in st.get("components", []):
            if comp.get("pid"):
                roles[int(comp["pid"])] = str(comp.get("name"))
        for fn in st.get("functions", []):
            for worker in fn.get("workers", []):
                if worker.get("pid"):
                    roles[int(worker["pid"])] = "adapter"
        self.roles_by_pid = roles
        return roles

    def role(self, proc: Any) -> str:
        found = self.roles_by_pid.get(proc.pid)
        if found:
            return found
        try:
            parent = proc.ppid()
        except psutil.Error:
            return "?"
        return "server" if self.roles_by_pid.get(parent) == "adapter" else "?"

    def pid_of(self, role: str) -> int | None:
        return next((pid for pid, r in self.roles_by_pid.items() if r == role), None)

    def new_lines(self) -> list[dict[str, Any]]:
        """JSON log lines written since the last call (whole lines only)."""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(self.log_offset)
                data = fh.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self.log_offset += end
        out = []
        for raw in data[:end].splitlines():
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def metric_start_seconds(self) -> dict[str, float]:
        """supervisor_worker_start_seconds (sum and count) of the function, from /metrics."""
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode(errors="replace")
        except (OSError, http.client.HTTPException):
            return {}
        finally:
            conn.close()
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"supervisor_worker_start_seconds_(sum|count)\{([^}]*)\} (\S+)", line)
            if m and f'function="{self.function}"' in m.group(2):
                mode = re.search(r'mode="([^"]*)"', m.group(2))
                out[f"{m.group(1)}:{mode.group(1) if mode else '?'}"] = float(m.group(3))
        return out


def start_supervisor(server: Server, workdir: Path, workers: int, concurrency: int,
                     disposable: bool = False) -> SupervisorRun:
    workdir.mkdir(parents=True, exist_ok=True)
    port, metrics_port = free_port(), free_port()
    config = workdir / "supervisor.toml"
    config.write_text(f"""# generated by bench/custom.py
[supervisor]
ca_port = {port}
host = "127.0.0.1"
metrics_port = {metrics_port}
run_dir = {json.dumps(str(workdir / 'run'))}
log_format = "json"
default_function = "{server.name}"
grace_period = "5s"

[functions.{server.name}]
runtime = "custom"
command = {json.dumps(server.command)}
code_dir = {json.dumps(str(server.code_dir))}
ready = "http:/"
startup_timeout = "15s"
timeout = "10s"
concurrency = {concurrency}
min_warm = {workers}
max_workers = {max(workers, 2) if disposable else workers}
disposable = {'true' if disposable else 'false'}
env = {{ {common.TAG_VAR} = "{common.TAG}" }}
""")
    proc = Managed(f"{server.name} sup", [SUPERVISOR, "run", "--config", str(config)],
                   stdout=open(workdir / "stdout.jsonl", "wb"), stderr=open(workdir / "stderr.log", "wb"),
                   env=run.supervisor_env(), cwd=workdir)
    proc.term_group = False  # SIGTERM to the supervisor alone: it stops its planes and workers
    proc.stop_grace = 20.0
    sup = SupervisorRun(proc, port, metrics_port, workdir, server.name)
    sup.ready_s = run.wait_status(proc, port, "/initialize", 60, log=sup.log)
    proc.snapshot()
    return sup


def stop_supervisor(sup: SupervisorRun) -> dict[str, Any]:
    """Stops it; what its log and stderr said, and how it exited."""
    code = sup.proc.stop(grace=20.0)
    obs = run.analyse_log(sup.log) if sup.log.exists() else {}
    ready = []
    if sup.log.exists():
        with open(sup.log, "rb") as fh:
            for raw in fh:
                if b'"worker ready"' in raw:
                    try:
                        ready.append(json.loads(raw))
                    except ValueError:
                        pass
    return {"exit_code": code, "killed": sup.proc.killed, "leftovers": sup.proc.leftovers,
            "problems": obs.get("problems", {}), "problem_examples": obs.get("problem_examples", {}),
            "worker_exits": obs.get("worker_exits", {}), "markers": obs.get("markers", {}),
            "stdout_lines": obs.get("stdout_lines", 0), "stdout_bytes": obs.get("stdout_bytes", 0),
            "stderr": run.stderr_of(sup.dir),
            "ready_start_ms": [float(r.get("start_ms", float("nan"))) for r in ready[:8]]}


# ---------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------


class RoleCpu:
    """CPU per role of a process tree during a window, and the busiest single process."""

    def __init__(self, managed: Managed, role: Callable[[Any], str]) -> None:
        self.managed = managed
        self.role = role
        self.result: dict[str, Any] = {}

    def _sample(self) -> dict[int, tuple[str, float]]:
        out: dict[int, tuple[str, float]] = {}
        for proc in self.managed.tree():
            try:
                t = proc.cpu_times()
                out[proc.pid] = (self.role(proc), t.user + t.system)
            except psutil.Error:
                pass
        return out

    def __enter__(self) -> RoleCpu:
        self.t0 = time.monotonic()
        self.before = self._sample()
        return self

    def __exit__(self, *exc: Any) -> None:
        elapsed = max(1e-6, time.monotonic() - self.t0)
        after = self._sample()
        per_pid = {pid: (role, (used - self.before.get(pid, (role, 0.0))[1]) / elapsed)
                   for pid, (role, used) in after.items()}
        roles: dict[str, float] = {}
        for role, cores in per_pid.values():
            roles[role] = roles.get(role, 0.0) + cores
        busiest = max(per_pid.items(), key=lambda kv: kv[1][1], default=None)
        self.result = {
            "roles": {k: round(v, 2) for k, v in sorted(roles.items(), key=lambda kv: -kv[1])},
            "processes": sorted(([role, pid, round(c, 2)] for pid, (role, c) in per_pid.items()),
                                key=lambda x: -float(x[2])),
            "busiest": {"role": busiest[1][0], "pid": busiest[0], "cores": round(busiest[1][1], 2)}
            if busiest else {},
        }


def measure_latency(port: int, method: str, path: str, n: int, warmup: int) -> dict[str, Any]:
    """bench/run.py's latency test, for GET / or POST /invoke."""
    return run.measure_latency(port, n, warmup, method=method, path=path)


def wrk_argv(wrk: str, port: int, method: str, path: str, duration: float) -> list[str]:
    argv = [wrk, "-t2", f"-c{WRK_CONNECTIONS}", f"-d{duration:g}s", "--latency"]
    if method == "POST":
        argv += ["-s", str(BENCH / "post.lua")]  # POSTs bench/common.py's BODY
    return argv + [f"http://127.0.0.1:{port}{path}"]


def measure_wrk(wrk: str, port: int, method: str, path: str, duration: float, target: Managed,
                role: Callable[[Any], str]) -> dict[str, Any]:
    """bench/run.py's throughput test for any method and path, with the CPU per role."""
    with CpuWatch([target]) as watch, RoleCpu(target, role) as roles:
        res = run.parse_wrk(run.run_wrk(wrk_argv(wrk, port, method, path, duration), duration))
    res["cpu"] = watch.result
    res["roles"] = roles.result
    return res


def measure_start(server: Server, workdir: Path, runs: int, warmup: int) -> dict[str, Any]:
    """Custom workers started one at a time (a disposable function), and the server alone."""
    out: dict[str, Any] = {"alone_ms": [], "start_ms": [], "modes": Counter(), "errors": Counter(), "missing": 0}
    for _ in range(max(3, runs // 4)):
        proc, _, took = start_direct(server, workdir, 1)
        proc.stop(grace=5)
        out["alone_ms"].append(round(took, 1))
    sup = start_supervisor(server, workdir / f"{server.name}-start", 1, 1, disposable=True)
    try:
        deadline = time.monotonic() + 30
        while not any(r.get("event") == "worker ready" for r in sup.new_lines()):
            if time.monotonic() > deadline:
                raise RuntimeError("no first worker ready line within 30 s")
            time.sleep(0.01)
        for i in range(warmup + runs):
            sup.new_lines()  # what came before this invocation is old news
            try:
                status, _ = run.post(sup.port, "/invoke", BODY, timeout=15)
            except (OSError, http.client.HTTPException) as exc:
                status = -1
                out["errors"][type(exc).__name__] += 1
            if status != 200:
                out["errors"][str(status)] += 1
            ready: list[dict[str, Any]] = []
            deadline = time.monotonic() + 15
            while not ready and time.monotonic() < deadline:
                ready = [r for r in sup.new_lines() if r.get("event") == "worker ready"]
                if not ready:
                    time.sleep(0.002)
            if not ready:
                out["missing"] += 1
            elif i >= warmup:
                out["start_ms"].append(float(ready[0].get("start_ms", float("nan"))))
                out["modes"][str(ready[0].get("mode"))] += 1
        out["metrics"] = sup.metric_start_seconds()
    finally:
        out["supervisor"] = stop_supervisor(sup)
    out["modes"] = dict(out["modes"])
    out["errors"] = dict(out["errors"])
    return out


# ---------------------------------------------------------------------------
# profile
# ---------------------------------------------------------------------------


def short_file(path: str) -> str:
    """A frame's file without the install prefix: aiohttp/client.py, asyncio/tasks.py, worker/main.py."""
    for marker in ("site-packages/", "/lib/python3."):
        if marker in path:
            rest = path.split(marker, 1)[1]
            return rest.split("/", 1)[1] if marker.startswith("/lib") and "/" in rest else rest
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return path


# py-spy's frames: "function (file:line)" for Python, "function (library or C file[:line])" with --native
FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def parse_frame(frame: str) -> tuple[str, str, bool]:
    """(function, short file, is Python) of one py-spy frame."""
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip(), "", False
    file = m.group("file")
    return m.group("fn"), short_file(file), file.endswith(".py")


def package_of(file: str) -> str:
    """The top-level package (or stdlib module) a short file name belongs to."""
    first = file.split("/", 1)[0]
    return first[:-3] if first.endswith(".py") else first


# Leaves of a thread that waits: with --native, py-spy's idle filter lets some of these through.
WAITS = frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2", "clock_nanosleep", "nanosleep", "select", "poll",
                   "pselect", "ppoll", "pthread_cond_wait", "pthread_cond_timedwait", "sem_wait", "sem_timedwait",
                   "__futex_abstimed_wait_common", "futex_wait", "syscall", "PyThread_acquire_lock_timed",
                   "take_gil"})


def waiting(parsed: list[tuple[str, str, bool]]) -> bool:
    """A stack that is blocked in a wait (an unnamed leaf counts when a wait is just above it)."""
    names = [fn for fn, _, _ in parsed[-3:]]
    return names[-1] in WAITS or (names[-1].startswith("0x") and any(n in WAITS for n in names))


def summarize_profile(raw: Path, top: int = 8) -> dict[str, Any]:
    """The event-loop thread's costs in py-spy's raw output (``--threads --native``).

    Samples blocked in a wait (epoll, sleep, futex) are dropped: py-spy keeps on-CPU samples only, but
    with --native its filter lets some waits through. Native leaves (system calls, the cyclic GC, C
    extensions) are reported by name and also charged to the innermost Python frame above them, so the
    owners sum to 100 %.
    """
    busy: Counter[str] = Counter()
    waits: Counter[str] = Counter()
    native: Counter[str] = Counter()
    owner_pkg: Counter[str] = Counter()
    owner_fn: Counter[str] = Counter()
    callers: dict[str, Counter[str]] = {}
    stacks: list[tuple[str, list[tuple[str, str, bool]], int]] = []
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread (") else "?"
        parsed = [parse_frame(f) for f in frames[1:]]
        if not parsed:
            continue
        if waiting(parsed):
            waits[thread] += int(count)
            continue
        busy[thread] += int(count)
        stacks.append((thread, parsed, int(count)))
    main = "MainThread" if "MainThread" in busy else (busy.most_common(1)[0][0] if busy else "")
    total = busy.get(main, 0)
    for thread, parsed, n in stacks:
        if thread != main:
            continue
        py = [(fn, file) for fn, file, is_py in parsed if is_py]
        owner = py[-1] if py else ("?", "?")
        owner_pkg[package_of(owner[1])] += n
        owner_fn[f"{owner[0]} ({owner[1]})"] += n
        fn, file, is_py = parsed[-1]
        if not is_py:
            name = fn if fn.startswith("gc_") or "libc" in file or not file else f"{fn} [{package_of(file)}]"
            native[name] += n
            callers.setdefault(name, Counter())[f"{owner[0]} ({owner[1]})"] += n

    def share(c: Counter[str], k: int) -> list[list[Any]]:
        return [[name, round(100 * v / total, 1)] for name, v in c.most_common(k)] if total else []

    return {"samples": total, "thread": main, "waits_dropped": sum(waits.values()),
            "other_threads_busy": [[t, v] for t, v in busy.most_common() if t != main],
            "native": share(native, top), "owners": share(owner_pkg, top), "functions": share(owner_fn, top),
            "callers": {name: share(callers[name], 3) for name, _ in native.most_common(3)}}


def profile(sup: SupervisorRun, wrk: str, method: str, path: str, seconds: float, workdir: Path) -> dict[str, Any]:
    pyspy = str(run.BIN / "py-spy") if (run.BIN / "py-spy").exists() else shutil.which("py-spy")
    if not pyspy:
        return {"skipped": "py-spy is not installed"}
    sup.learn_roles()
    targets = {role: sup.pid_of(role) for role in ("adapter", "data-plane")}
    load = Managed("wrk (profile)", wrk_argv(wrk, sup.port, method, path, seconds + 3), stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT)
    out: dict[str, Any] = {"method": method, "path": path, "seconds": seconds}
    try:
        time.sleep(1.0)
        spies: dict[str, tuple[Managed, Path]] = {}
        for role, pid in targets.items():
            if pid is None:
                continue
            raw = workdir / f"profile-{sup.function}-{role}-{path.strip('/') or 'root'}.txt"
            spies[role] = (Managed(f"py-spy {role}", [pyspy, "record", "--pid", str(pid), "--duration",
                                                      f"{seconds:g}", "--rate", "200", "--format", "raw", "--threads",
                                                      "--native", "--full-filenames", "-o", str(raw)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT), raw)
        for role, (spy, raw) in spies.items():
            try:
                text, _ = spy.popen.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                text = b"timed out"
            spy.stop(grace=2)
            if raw.exists():
                out[role] = summarize_profile(raw)
            else:
                out[role] = {"error": text.decode(errors="replace")[-400:]}
        text, _ = load.popen.communicate(timeout=seconds + 60)
        out["wrk"] = {k: v for k, v in run.parse_wrk(text.decode(errors="replace")).items()
                      if k in ("rps", "non_2xx", "socket_errors_total")}
    finally:
        load.stop(grace=2)
    return out


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


def server_role(_proc: Any) -> str:
    """Every process of a direct target is the server (node's cluster primary included)."""
    return "server"


def target_keys(workers: list[int], concurrency: int, spread: bool) -> list[tuple[str, str, int, int]]:
    """(key, kind, processes, concurrency): direct, direct xK, sup N=K, and with `spread` sup N=K c=64/K.

    The data plane packs work onto the most recently freed worker, so with `concurrency` >= wrk's 64
    connections one worker takes everything; c = 64/K lets the connections fill all K workers.
    """
    keys = [("direct", "direct", 1, 0)]
    keys += [(f"direct x{k}", "direct", k, 0) for k in workers if k > 1]
    for k in workers:
        keys.append((f"sup N={k}", "sup", k, concurrency))
        even = -(-WRK_CONNECTIONS // k)
        if spread and k > 1 and even < concurrency:
            keys.append((f"sup N={k} c={even}", "sup", k, even))
    return keys


def measure_throughput(wrk: str, port: int, method: str, path: str, target: Managed, role: Callable[[Any], str],
                       sup: SupervisorRun | None, args: argparse.Namespace) -> dict[str, Any]:
    """One wrk run after a quiet second; run again (once) when other processes took >= --retry-other % of it."""
    thr: dict[str, Any] = {}
    for attempt in (1, 2):
        if sup is not None:
            sup.learn_roles()
        quiet = wait_for_quiet([target], args.quiet_wait)
        res = measure_wrk(wrk, port, method, path, args.duration, target, role)
        res["quiet"] = quiet
        if attempt == 2:
            res["retried_from"] = {"rps": thr["rps"], "other_pct": thr["cpu"]["other_pct"]}
            if res["cpu"]["other_pct"] > thr["cpu"]["other_pct"]:
                thr["retry"] = {"rps": res["rps"], "other_pct": res["cpu"]["other_pct"]}
                return thr  # the first run was the quieter one after all
        thr = res
        if thr["cpu"]["other_pct"] < args.retry_other:
            break
        say(f"  other processes took {thr['cpu']['other_pct']}% of the machine during the run: once more")
    return thr


def run_server(server: Server, args: argparse.Namespace, wrk: str | None, workdir: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"title": server.title, "targets": {}, "supervisors": {}}
    for key, kind, procs, concurrency in target_keys(args.workers, args.concurrency, args.spread):
        say(f"[{server.name}] {key}: starting")
        entry: dict[str, Any] = {"kind": kind, "processes": procs, "latency": {}, "throughput": {}}
        res["targets"][key] = entry
        sup: SupervisorRun | None = None
        role: Callable[[Any], str]
        if kind == "direct":
            target, port, took_ms = start_direct(server, workdir, procs)
            role = server_role
            entry["ready_ms"] = round(took_ms, 1)
        else:
            sup = start_supervisor(server, workdir / f"{server.name}-sup{procs}-c{concurrency}", procs, concurrency)
            target, port, role = sup.proc, sup.port, sup.role
            sup.learn_roles()
            entry["ready_ms"] = round(sup.ready_s * 1000, 1)
            entry["concurrency"] = concurrency
        try:
            for method, path in PATHS:
                label = f"{method} {path}"
                entry["latency"][label] = lat = measure_latency(port, method, path, args.latency_n, args.warmup)
                say(f"[{server.name}] {key} {label}: latency p50 {lat['p50_ms']:.3f} ms  p99 {lat['p99_ms']:.3f} ms  "
                    f"non-200 {lat['non_200']}  client errors {lat['client_errors'] or 0}")
                if wrk is None:
                    continue
                entry["throughput"][label] = thr = measure_throughput(wrk, port, method, path, target, role, sup, args)
                say(f"[{server.name}] {key} {label}: {thr['rps']:.0f} req/s  p50 {thr['p50_ms']:.2f} ms  "
                    f"p99 {thr['p99_ms']:.2f} ms  non-2xx {thr['non_2xx']}  socket errors "
                    f"{thr['socket_errors_total']}  processes {thr['roles']['processes']}  "
                    f"wrk {thr['cpu']['client_cores']} cores  other {thr['cpu']['other_pct']}%")
            if (sup is not None and args.profile and procs == min(args.workers) and concurrency == args.concurrency
                    and wrk is not None):
                for method, path in PATHS:
                    say(f"[{server.name}] {key}: py-spy under wrk, {method} {path}")
                    res.setdefault("profile", {})[f"{method} {path}"] = profile(
                        sup, wrk, method, path, args.profile_seconds, workdir)
        finally:
            if sup is not None:
                res["supervisors"][key] = stop_supervisor(sup)
            else:
                target.stop(grace=5)
    if args.start_runs:
        say(f"[{server.name}] worker start: {args.start_runs} starts one at a time")
        res["start"] = st = measure_start(server, workdir, args.start_runs, warmup=2)
        vals = sorted(st["start_ms"])
        say(f"[{server.name}] start_ms p50 {pct(vals, 50):.1f}  max {vals[-1] if vals else float('nan'):.1f}  "
            f"server alone {st['alone_ms']} ms  modes {st['modes']}")
    return res


def describe_machine() -> dict[str, Any]:
    m = common.machine(("ca-supervisor", "aiohttp", "uvloop", "httptools"),
                       dirty_note=" (work tree has uncommitted changes)")
    node = shutil.which("node")
    if node:
        m["versions"]["node"] = common.run_text([node, "--version"])
    wrk = shutil.which("wrk")
    if wrk:
        out = common.run_text([wrk, "-v"], timeout=10)
        m["versions"]["wrk"] = out.split()[1] if len(out.split()) > 1 else out
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"put the section into {RESULTS.relative_to(ROOT)}")
    ap.add_argument("--quick", action="store_true", help="3 s wrk runs, 1000 requests per latency test, 5 starts")
    ap.add_argument("--duration", type=float, default=None, help="seconds per wrk run (default 10)")
    ap.add_argument("--latency-n", type=int, default=None, help="sequential requests per latency test (default 4000)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up requests before each latency test (default 400)")
    ap.add_argument("--servers", default="node,python", help="a subset of node,python")
    ap.add_argument("--workers", default="1,2", help="supervisor worker counts to run (min_warm = max_workers)")
    ap.add_argument("--concurrency", type=int, default=64, help="the function's concurrency per worker (default 64)")
    ap.add_argument("--start-runs", type=int, default=None, help="custom worker starts one at a time (default 20; 0 skips)")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="before each wrk run wait up to this many seconds for other processes to use < 0.25 cores")
    ap.add_argument("--no-spread", dest="spread", action="store_false",
                    help="skip the sup N=K c=64/K targets (by default every K > 1 also runs with concurrency 64/K)")
    ap.add_argument("--retry-other", type=float, default=10.0,
                    help="run a wrk test once more when other processes took this %% of the machine (default 10)")
    ap.add_argument("--profile", action="store_true", help="py-spy the adapter and data plane of the smallest N")
    ap.add_argument("--profile-seconds", type=float, default=6.0, help="py-spy duration per path (default 6)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the work dir (logs, profiles) in /tmp")
    ap.add_argument("--json", metavar="PATH", help="also save the raw results as JSON")
    args = ap.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.latency_n = args.latency_n or (1000 if args.quick else 4000)
    args.warmup = args.warmup if args.warmup is not None else (200 if args.quick else 400)
    if args.start_runs is None:
        args.start_runs = 5 if args.quick else 20
    try:
        args.workers = sorted({int(x) for x in args.workers.split(",") if x.strip()})
    except ValueError:
        ap.error("--workers takes comma-separated integers")
    if not args.workers or min(args.workers) < 1:
        ap.error("--workers takes integers >= 1")
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = set(wanted) - {"node", "python"}
    if bad:
        ap.error(f"--servers takes node and python, got {sorted(bad)}")

    common.say_to(sys.stderr)  # stdout is for the Markdown section
    common.clean_up_on_exit()
    workdir = Path(tempfile.mkdtemp(prefix="ca-bench-custom-"))
    say(f"work dir: {workdir}")
    t0 = time.monotonic()
    available, skipped = servers()
    results: dict[str, Any] = {
        "options": {"duration_s": args.duration, "latency_n": args.latency_n, "warmup": args.warmup,
                    "workers": args.workers, "concurrency": args.concurrency, "start_runs": args.start_runs,
                    "quiet_wait_s": args.quiet_wait, "profile": args.profile, "spread": args.spread,
                    "retry_other_pct": args.retry_other,
                    "profile_seconds": args.profile_seconds},
        "skipped": {k: v for k, v in skipped.items() if k in wanted}, "servers": {}, "failures": []}
    try:
        wrk = run.ensure_wrk()
        if wrk is None:
            results["skipped"]["throughput"] = "wrk is not installed and could not be"
        results["machine"] = describe_machine()
        for server in available:
            if server.name not in wanted:
                continue
            try:
                results["servers"][server.name] = run_server(server, args, wrk, workdir)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                say(f"[{server.name}] failed: {exc}")
                results["failures"].append(f"{server.name}: {exc}")
                common.cleanup_all()
    except KeyboardInterrupt as exc:
        say(f"\ninterrupted ({exc or 'Ctrl-C'}): cleaning up")
        common.cleanup_all()
        return 130
    finally:
        common.cleanup_all()
    results["took_s"] = round(time.monotonic() - t0)

    section = render(results)
    print(section, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    if args.write:
        say(f"{write_section(section)} the custom section of {RESULTS}")
    if args.keep_logs:
        say(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if results["failures"] else 0


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def write_section(section: str, path: Path = RESULTS) -> str:
    """Replaces the block between the markers, else inserts it before the notes (else appends it)."""
    block = f"{START_MARK}\n{section.strip()}\n{END_MARK}"
    text = path.read_text() if path.exists() else ""
    if START_MARK in text and END_MARK in text and text.index(START_MARK) < text.index(END_MARK):
        before, rest = text.split(START_MARK, 1)
        path.write_text(before + block + rest.split(END_MARK, 1)[1])
        return "replaced"
    at = text.find(f"\n{NOTES_HEADING}\n")
    if at >= 0:
        path.write_text(text[:at].rstrip("\n") + "\n\n" + block + "\n\n" + text[at + 1:])
        return "inserted"
    path.write_text(text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n")
    return "appended"


def _f(x: float, digits: int = 3) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def _errors(thr: dict[str, Any]) -> str:
    se = thr.get("socket_errors") or {}
    sock = "/".join(str(se.get(k, 0)) for k in ("connect", "read", "write", "timeout")) if se else "0"
    return f"{thr['non_2xx']} / {sock}"


def baseline_key(key: str, procs: int) -> str:
    """What a target's throughput is compared with: the direct server with as many processes."""
    return "direct" if procs == 1 else f"direct x{procs}"


def _role_cores(thr: dict[str, Any]) -> str:
    """Cores by role; a role with several processes also shows each one (adapter 0.76 = 0.76 + 0.00)."""
    each: dict[str, list[float]] = {}
    for role, _pid, cores in thr["roles"].get("processes", []):
        each.setdefault(role, []).append(cores)
    parts = []
    for role, cores in thr["roles"]["roles"].items():
        if cores < 0.005:
            continue
        split = each.get(role, [])
        parts.append(f"{role} {cores:.2f}" + (" (" + " + ".join(f"{c:.2f}" for c in split) + ")"
                                              if len(split) > 1 and role in ("adapter", "server") else ""))
    return ", ".join(parts) or "-"


def _span(values: list[float], digits: int = 2) -> str:
    lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return lo if lo == hi else f"{lo}-{hi}"


def observations(r: dict[str, Any]) -> list[str]:
    """Facts the tables imply, computed and grouped (the hand-written reading goes into the notes)."""
    wrk_bound: list[str] = []
    wrk_cores: list[float] = []
    packed: list[str] = []
    spread: list[str] = []
    busy: list[float] = []
    adapter: list[float] = []
    share: list[float] = []
    per_request: list[float] = []
    per_request_direct: list[float] = []
    for name, srv in r["servers"].items():
        for key, t in srv["targets"].items():
            for label, thr in t["throughput"].items():
                target = sum(thr["roles"]["roles"].values())
                if thr["rps"]:
                    (per_request_direct if t["kind"] == "direct" else per_request).append(target / thr["rps"] * 1e6)
                if t["kind"] == "direct":
                    if thr["cpu"]["client_cores"] >= 0.75:
                        wrk_bound.append(f"{name} {key} `{label}`")
                        wrk_cores.append(thr["cpu"]["client_cores"])
                    continue
                adapters = [c for role, _, c in thr["roles"]["processes"] if role == "adapter"]
                if len(adapters) > 1:
                    (packed if min(adapters) < 0.05 else spread).append(
                        f"{name} {key} `{label}` (" + " + ".join(f"{c:.2f}" for c in adapters) + ")")
                busy.append(target + thr["cpu"]["client_cores"])
                adapter.append(max(adapters) if adapters else 0.0)
                base = srv["targets"].get(baseline_key(key, t["processes"]), {}).get("throughput", {}).get(label)
                if base and base["rps"]:
                    share.append(thr["rps"] / base["rps"])
    notes = []
    if share:
        notes.append(f"Through the supervisor the custom function answered {_span(share)} x the req/s of the same "
                     "server hit directly.")
    if wrk_bound:
        notes.append(f"The direct figures are what wrk can drive on this machine, a floor for the server: wrk "
                     f"itself used {_span(wrk_cores)} cores of 2 in " + ", ".join(wrk_bound) + ".")
    if per_request:
        notes.append(f"CPU per request through the supervisor, all its processes together: {_span(per_request, 0)} us "
                     f"(the servers alone: {_span(per_request_direct, 0)} us). At that cost the 2 cores cap the "
                     f"path near {2e6 / max(per_request) / 1000:.1f}-{2e6 / min(per_request) / 1000:.1f}k req/s "
                     "whatever the number of workers, before wrk's share and any idle time.")
    if busy:
        notes.append(f"Through the supervisor {_span(busy)} of 2 cores were busy (target + wrk); the busiest "
                     f"single process was an adapter at {_span(adapter)} cores"
                     + (": no process saturated a core, and part of the machine idled while requests were "
                        "handed from process to process." if max(busy) < 1.8 and max(adapter) < 0.9 else "."))
    if packed:
        notes.append("One adapter took all the load (cores per adapter in brackets): " + ", ".join(packed)
                     + f". With `concurrency` >= wrk's {WRK_CONNECTIONS} connections the data plane packs every "
                     "request onto the most recently freed worker, so the second worker idles.")
    if spread:
        notes.append("Both adapters worked in: " + ", ".join(spread) + ".")
    return notes


def render(r: dict[str, Any]) -> str:
    o, m = r["options"], r.get("machine", {})
    out: list[str] = []
    w = out.append
    w("## Custom runtime: a Node.js and a Python server, direct and through the supervisor\n")
    w(f"Generated by `.venv/bin/python bench/custom.py --write --profile` (it replaces this section, between "
      f"its markers); run took {r.get('took_s', 0)} s. A function with `runtime = \"custom\"` runs a minimal "
      "HTTP server; every worker is a Python adapter (worker/runtimes/custom.py) plus its own copy of the "
      "server. Each server is measured alone on a port (**direct**; **direct x2**: two processes sharing "
      "the port) and through `supervisor run` (**sup N=k**: `min_warm = max_workers = k`, "
      f"`concurrency = {o['concurrency']}`; **sup N=k c=j**: the same with `concurrency = j` = "
      f"{WRK_CONNECTIONS}/k, so that wrk's connections fill every worker), side by side in one run. On the "
      "supervisor `GET /` is an HTTP-trigger request (data plane -> adapter over the unix socket -> server "
      "over keep-alive loopback HTTP, answer streamed back) and `POST /invoke` an event invocation the "
      "adapter forwards as `POST /invoke`.\n")
    if m:
        w(f"- Machine: {m['nproc']} CPUs (nproc; affinity {m['affinity']}), {m['cpu_model']}, {m['memory']} RAM; "
          f"kernel {m['kernel']}, Python {m['python']}. **wrk runs on the same 2 cores** as everything it "
          "measures (its share is in the tables).")
        w(f"- ca-supervisor commit {m['git']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
          + f"; run {m['date_utc']}")
    for name, srv in r["servers"].items():
        w(f"- **{name}**: {srv['title']}; answers `GET /` with `hello, world\\n` and `POST /invoke` with "
          "`{\"ok\":true,\"bytes\":23}`")
    for what, why in r["skipped"].items():
        w(f"- skipped **{what}**: {why}")
    for failure in r.get("failures", []):
        w(f"- **failed**: {failure}")
    w("")

    # latency
    w("### Latency at concurrency 1\n")
    w(f"{o['latency_n']} sequential requests per test (after {o['warmup']} warm-up) on one keep-alive "
      "connection (http.client, TCP_NODELAY); `POST /invoke` sends a 23-byte JSON body. Added = the "
      "supervisor target minus **direct** for the same server and path.\n")
    w("| server | path | target | p50 ms | p90 ms | p99 ms | max ms | errors | added p50 ms | added p99 ms |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for name, srv in r["servers"].items():
        for method, path in PATHS:
            label = f"{method} {path}"
            base = srv["targets"].get("direct", {}).get("latency", {}).get(label)
            for key, t in srv["targets"].items():
                lat = t["latency"].get(label)
                if not lat:
                    continue
                errors = lat["non_200"] + sum(lat["client_errors"].values())
                added = base is not None and t["kind"] == "sup"
                add50 = f"**{lat['p50_ms'] - base['p50_ms']:.3f}**" if added and base else "-"
                add99 = _f(lat["p99_ms"] - base["p99_ms"]) if added and base else "-"
                w(f"| {name} | `{label}` | {key} | {_f(lat['p50_ms'])} | {_f(lat['p90_ms'])} | {_f(lat['p99_ms'])} "
                  f"| {_f(lat['max_ms'], 2)} | {errors} | {add50} | {add99} |")
    w("")

    # throughput
    if any(t["throughput"] for srv in r["servers"].values() for t in srv["targets"].values()):
        w(f"### Throughput at concurrency {WRK_CONNECTIONS}\n")
        w(f"`wrk -t2 -c{WRK_CONNECTIONS} -d{o['duration_s']:g}s --latency` (with bench/post.lua for "
          "`POST /invoke`). \"x direct\": req/s over the direct server with as many server processes "
          "(sup N=2 against direct x2). Errors: non-2xx / socket errors (connect/read/write/timeout). CPU in "
          "cores over the run, by role (`supervisor` is the PID-1 process; the planes and adapters are "
          "Python; a role with two processes shows each); wrk's own share and other processes' (as a % of "
          "the machine) are separate columns. A run during which other processes took "
          f">= {o.get('retry_other_pct', 10):g} % of the machine was run once more (marked).\n")
        w("| server | path | target | req/s | x direct | p50 ms | p99 ms | errors | CPU by role (cores) | wrk cores | other CPU % |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        retried: list[str] = []
        for name, srv in r["servers"].items():
            for method, path in PATHS:
                label = f"{method} {path}"
                for key, t in srv["targets"].items():
                    thr = t["throughput"].get(label)
                    if not thr:
                        continue
                    base = srv["targets"].get(baseline_key(key, t["processes"]), {}).get("throughput", {}).get(label)
                    ratio = f"{thr['rps'] / base['rps']:.3f}" if base and base["rps"] and t["kind"] == "sup" else "-"
                    mark = ""
                    for what in ("retried_from", "retry"):
                        if what in thr:
                            retried.append(f"{name} {key} `{label}`: " + (
                                f"first run {thr[what]['rps']:,.0f} req/s with other processes at "
                                f"{thr[what]['other_pct']}%" if what == "retried_from" else
                                f"the second run ({thr[what]['rps']:,.0f} req/s, other {thr[what]['other_pct']}%) "
                                "was noisier; the first is kept"))
                            mark = " (r)"
                    w(f"| {name} | `{label}` | {key}{mark} | {thr['rps']:,.0f} | {ratio} | {_f(thr['p50_ms'], 2)} "
                      f"| {_f(thr['p99_ms'], 2)} | {_errors(thr)} | {_role_cores(thr)} "
                      f"| {thr['cpu']['client_cores']} | {thr['cpu']['other_pct']} |")
        w("")
        if retried:
            w("(r) run twice: " + "; ".join(retried) + ".\n")
        lines = []
        for name, srv in r["servers"].items():
            for key, t in srv["targets"].items():
                if t["kind"] != "sup":
                    continue
                for label, thr in t["throughput"].items():
                    if thr["rps"]:
                        per = ", ".join(f"{k} {v / thr['rps'] * 1e6:.0f}" for k, v in thr["roles"]["roles"].items()
                                        if v >= 0.005)
                        lines.append(f"- {name} {key} `{label}`: {per}")
        if lines:
            direct = []
            for name, srv in r["servers"].items():
                for label, thr in srv["targets"].get("direct", {}).get("throughput", {}).items():
                    if thr["rps"]:
                        direct.append(f"{name} `{label}` {thr['roles']['roles'].get('server', 0) / thr['rps'] * 1e6:.0f}")
            w("CPU per request through the supervisor, by role, in microseconds (the direct servers spend: "
              + "; ".join(direct) + "):\n")
            out.extend(lines)
            w("")
        notes = observations(r)
        if notes:
            w("Read from the tables (computed):\n")
            out.extend(f"- {n}" for n in notes)
            w("")

    # start
    starts = {name: srv["start"] for name, srv in r["servers"].items() if srv.get("start")}
    if starts:
        w("### Custom worker start\n")
        w("`start_ms` is the control plane's own figure from its `worker ready` log line: decision to start -> "
          "adapter spawned, its server started and answering `ready = \"http:/\"`, worker connected to the "
          "data plane. One at a time: a `disposable = true` function (`min_warm = 1`), each invocation "
          "spends its worker and the next waits for the replacement. Server alone: spawn -> first 200 on "
          "`GET /` (polled every 2 ms). At supervisor start: the first workers of the sup N=k runs, "
          "started together with the planes. `supervisor_worker_start_seconds`: mean (sum / count) over "
          "every start of the disposable function's supervisor, from /metrics.\n")
        w("| server | one at a time: p50 ms | p90 ms | max ms | n | mode | server alone ms (p50, min-max) | adapter + rest p50 ms | metrics mean ms | at supervisor start ms |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for name, st in starts.items():
            vals = sorted(st["start_ms"])
            alone = sorted(st["alone_ms"])
            a50 = float(statistics.median(alone)) if alone else float("nan")
            mets = st.get("metrics", {})
            msum = sum(v for k, v in mets.items() if k.startswith("sum:"))
            mcount = sum(v for k, v in mets.items() if k.startswith("count:"))
            at_start = [x for t in r["servers"][name]["supervisors"].values() for x in t.get("ready_start_ms", [])]
            w(f"| {name} | **{_f(pct(vals, 50), 1)}** | {_f(pct(vals, 90), 1)} | {_f(vals[-1] if vals else float('nan'), 1)} "
              f"| {len(vals)} | {', '.join(f'{k} {v}' for k, v in st['modes'].items()) or '-'} "
              f"| {_f(a50, 1)} ({_f(alone[0] if alone else float('nan'), 1)}-{_f(alone[-1] if alone else float('nan'), 1)}) "
              f"| {_f(pct(vals, 50) - a50, 1)} | {_f(msum / mcount * 1000 if mcount else float('nan'), 1)} "
              f"| {', '.join(f'{x:.0f}' for x in at_start) or '-'} |")
            if st.get("errors") or st.get("missing"):
                w(f"\n{name}: {st.get('missing', 0)} replacement(s) not seen within 15 s; invocation errors "
                  f"{st.get('errors')}.")
        w("")

    # profile
    profiles = {name: srv["profile"] for name, srv in r["servers"].items() if srv.get("profile")}
    if profiles:
        w("### Where the supervisor path spends its CPU (py-spy)\n")
        w(f"`py-spy record --threads --native` (200 Hz for {o.get('profile_seconds', 0):g} s; py-spy keeps "
          "on-CPU samples only) on the adapter and the data plane of sup N=1, during an extra wrk run per path "
          "(sampling slows them, so those runs' req/s are not results). Shares are of the event-loop thread's "
          "busy samples (samples blocked in epoll, sleep or futex waits, which py-spy's idle filter lets "
          "through with --native, are dropped: the other threads - the adapter's orphan watchdog, the data "
          "plane's gRPC poller and log writer - only ever showed waiting). \"Owner\": the innermost Python frame's package, C below it included. \"Native\": "
          "samples whose innermost frame is C (system calls by libc name, `gc_collect_main` = the cyclic "
          "GC), with the Python frames that called them.\n")
        for name, per in profiles.items():
            for label, p in per.items():
                if p.get("skipped"):
                    w(f"- {name} `{label}`: skipped ({p['skipped']})")
                    continue
                w(f"**{name}, `{label}`** (wrk meanwhile: {p.get('wrk', {}).get('rps', float('nan')):,.0f} req/s)\n")
                for role in ("adapter", "data-plane"):
                    s = p.get(role)
                    if not s or "error" in s:
                        w(f"- {role}: no profile ({(s or {}).get('error', 'not found')[:200]})")
                        continue
                    busy = ", ".join(f"{t} {v}" for t, v in s["other_threads_busy"]) or "none"
                    w(f"- **{role}** ({s['samples']} busy samples of {s['thread']}; {s['waits_dropped']} waiting "
                      f"samples dropped; busy samples of other threads: {busy})")
                    w("  - owner: " + ", ".join(f"{k} {v}%" for k, v in s["owners"][:6]))
                    natives = []
                    for k, v in s["native"][:5]:
                        via = s["callers"].get(k)
                        natives.append(f"`{k}` {v}%" + (" (" + ", ".join(f"{c} {cv}%" for c, cv in via[:2]) + ")"
                                                         if via else ""))
                    w("  - native: " + "; ".join(natives))
                    w("  - top owners: " + "; ".join(f"`{k}` {v}%" for k, v in s["functions"][:6]))
                w("")

    # observations and checks
    w("### Checks\n")
    found: list[str] = []
    for name, srv in r["servers"].items():
        for key, sup in srv["supervisors"].items():
            problems = sum(sup["problems"].values())
            if sup["exit_code"] != 0 or sup["killed"] or sup["leftovers"]:
                found.append(f"{name} {key}: supervisor exit {sup['exit_code']}, killed {sup['killed']}, "
                             f"left behind {sup['leftovers']}")
            if problems:
                ex = "; ".join(f"{k}: `{v[:200]}`" for k, v in sup["problem_examples"].items())
                found.append(f"{name} {key}: {problems} warning/error line(s) in its log ({ex})")
            if sup["stderr"].get("bytes"):
                found.append(f"{name} {key}: stderr not empty: `{sup['stderr']['tail'][-300:]}`")
        for key, t in srv["targets"].items():
            for label, thr in t["throughput"].items():
                if thr["non_2xx"] or thr["socket_errors_total"]:
                    found.append(f"{name} {key} `{label}`: {thr['non_2xx']} non-2xx, "
                                 f"{thr['socket_errors_total']} socket errors")
            for label, lat in t["latency"].items():
                if lat["non_200"] or lat["client_errors"]:
                    found.append(f"{name} {key} `{label}` latency: {lat['non_200']} non-200, {lat['client_errors']}")
    if found:
        out.extend(f"- {n}" for n in found)
    else:
        w("No errors: every latency request answered 200, wrk saw no non-2xx and no socket error, every "
          "supervisor exited 0 on SIGTERM with nothing left behind and logged no warning or error.")
    others = [t["throughput"][lb]["cpu"]["other_pct"] for srv in r["servers"].values()
              for t in srv["targets"].values() for lb in t["throughput"]]
    not_quiet = sum(1 for srv in r["servers"].values() for t in srv["targets"].values()
                    for thr in t["throughput"].values() if not thr.get("quiet", {}).get("quiet", True))
    if others:
        w(f"\nOther processes used up to {max(others)}% of the machine during the wrk runs (median "
          f"{statistics.median(others)}%); {not_quiet} of {len(others)} wrk runs started without a quiet "
          f"second (waited up to {o['quiet_wait_s']:g} s each). One round: treat differences under ~10 % as noise.")
    w("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
