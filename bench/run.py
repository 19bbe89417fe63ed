#!/usr/bin/env python3
"""Side-by-side benchmark: ca-supervisor against in-process baselines.

    .venv/bin/python bench/run.py            # full run, writes bench/RESULTS.md + bench/results.json
    .venv/bin/python bench/run.py --quick    # shorter durations (prints only, unless --write)
    .venv/bin/python bench/run.py --only A,C # a subset of targets

Targets (all serve POST /invoke with the handler of bench/handlers/trivial.py):

  A   uvicorn --http httptools --loop uvloop, 1 worker, raw ASGI app (bench/baseline_app.py)
  B   gunicorn + 2 uvicorn workers, same app and server settings
  C1  supervisor run: min_warm=1, max_workers=1, concurrency=1 (latency)
  C2  supervisor run: min_warm=2, max_workers=2, concurrency=1 (latency + throughput)
  C3  supervisor run: min_warm=2, max_workers=2, concurrency=32, the same work as an
      async handler (throughput: the `concurrency` knob, frames batched per wake-up)

Measurements (docs/performance.md, "Targets"):

  latency     sequential POST /invoke over one keep-alive connection (http.client),
              p50/p99; the figure that matters is C minus A (what the supervisor adds)
  throughput  wrk -t2 -c64 -d10s -s bench/post.lua, req/s, p50/p99, non-2xx, socket errors
  start       `supervisor run` spawn -> POST /initialize 200 (polled every 10 ms), 5 runs

Every latency and throughput test runs twice, in two rounds over all targets
(round 2 starts each target afresh), so noise from a shared machine shows as
a spread between the rounds instead of hiding in one number. The CPU used by
processes outside the benchmark during each test is sampled and reported.

Every process started here lives in its own session and is stopped (SIGTERM to
its group, then SIGKILL with a deadline, then its remembered descendants) on
exit, on error and on Ctrl-C/SIGTERM (bench/common.py, shared with bench/pools.py).
"""

from __future__ import annotations

import abc
import argparse
import gc
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import common
from common import BENCH, BODY, ROOT, CpuWatch, Managed, free_port, pct, say, tail, verdict, wait_for_quiet

BIN = Path(sys.executable).parent if (Path(sys.executable).parent / "supervisor").exists() else ROOT / ".venv" / "bin"
PYTHON = str(BIN / "python") if (BIN / "python").exists() else sys.executable
HEADERS = {"Content-Type": "application/json"}

GOALS = {
    "added_p50_ms": 0.5,
    "added_p99_ms": 2.0,
    "rps_min": 19_000,  # 10 x Noslate's 1.9k
    "gunicorn_share": 0.6,
    "start_s": 0.5,
}


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def post(port: int, path: str, body: bytes = b"", timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body, HEADERS)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_status(proc: Managed, port: int, path: str, deadline_s: float, body: bytes = b"",
                interval: float = 0.010, log: Path | None = None,
                seen: Counter[str] | None = None) -> float:
    """Poll POST path every `interval` until 200; seconds since the process was spawned.

    `seen` counts what the polls before the 200 got (a status, or an exception's name).
    """
    deadline = time.monotonic() + deadline_s
    last = "no answer"
    seen = Counter() if seen is None else seen
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} before {path} answered 200"
                               + (f"; log tail:\n{tail(log)}" if log else ""))
        try:
            status, data = post(port, path, body, timeout=max(0.5, deadline - time.monotonic()))
            if status == 200:
                return time.perf_counter() - proc.started
            last = f"{status} {data[:200]!r}"
            seen[str(status)] += 1
            seen.setdefault(f"first {status} body", data[:300].decode(errors="replace"))  # type: ignore[arg-type]
        except (OSError, http.client.HTTPException) as exc:
            last = repr(exc)
            seen[type(exc).__name__] += 1
        time.sleep(interval)
    raise RuntimeError(f"{proc.name}: {path} not 200 within {deadline_s}s (last: {last})"
                       + (f"; log tail:\n{tail(log)}" if log else ""))


def run_quiet(argv: list[str], timeout: float = 600) -> tuple[int, str]:
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout + done.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, repr(exc)


# ---------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------


class Target(abc.ABC):
    key = ""
    title = ""
    throughput = False

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: Managed | None = None
        self.port = 0
        self.log: Path | None = None

    @abc.abstractmethod
    def start(self, round_no: int) -> float:
        """Starts the target for a round; returns how long it took to be ready."""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def observations(self) -> dict[str, Any]:
        return {}


class Uvicorn(Target):
    key, title, throughput = "A", "uvicorn 1 worker (httptools+uvloop), in-process", True

    def start(self, round_no: int) -> float:
        self.port = free_port()
        self.log = self.workdir / f"{self.key}-r{round_no}.log"
        argv = [str(BIN / "uvicorn"), "baseline_app:app", "--app-dir", str(BENCH), "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "1", "--http", "httptools", "--loop", "uvloop",
                "--no-access-log", "--log-level", "warning", "--lifespan", "off"]
        self.proc = Managed(self.key, argv, stdout=open(self.log, "wb"))
        return wait_status(self.proc, self.port, "/invoke", 30, BODY, log=self.log)


class Gunicorn(Target):
    key, title, throughput = "B", "gunicorn + 2 uvicorn workers, in-process", True

    def start(self, round_no: int) -> float:
        self.port = free_port()
        self.log = self.workdir / f"{self.key}-r{round_no}.log"
        argv = [str(BIN / "gunicorn"), "--chdir", str(BENCH), "-w", "2", "-k", "baseline_app.Worker",
                "-b", f"127.0.0.1:{self.port}", "--log-level", "warning", "baseline_app:app"]
        self.proc = Managed(self.key, argv, stdout=open(self.log, "wb"))
        took = wait_status(self.proc, self.port, "/invoke", 30, BODY, log=self.log)
        # Both workers must be up before measuring: wait until two distinct ones answered.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len([p for p in self.proc.tree() if p.pid != self.proc.pid]) < 2:
            time.sleep(0.05)
        time.sleep(0.3)
        return took


def supervisor_config(workdir: Path, port: int, warm: int, concurrency: int = 1,
                      handler: str = "trivial:handler") -> Path:
    run_dir = workdir / "run"
    text = f"""# generated by bench/run.py
[supervisor]
ca_port = {port}
host = "127.0.0.1"
metrics_port = 0
run_dir = "{run_dir}"
log_format = "json"
default_function = "trivial"
grace_period = "5s"

[functions.trivial]
runtime = "python"
handler = "{handler}"
interface = "event"
code_dir = "{BENCH / 'handlers'}"
timeout = "10s"
concurrency = {concurrency}
min_warm = {warm}
max_workers = {warm}
env = {{ {common.TAG_VAR} = "{common.TAG}" }}
"""
    path = workdir / "supervisor.toml"
    path.write_text(text)
    return path


def supervisor_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("FC_SERVER_PORT", "FC_CUSTOM_LISTEN_PORT", "CA_PORT", "SUPERVISOR_RUN_DIR", "SUPERVISOR_CONFIG"):
        env.pop(var, None)
    return env


def start_supervisor(name: str, workdir: Path, warm: int, seen: Counter[str] | None = None,
                     concurrency: int = 1, handler: str = "trivial:handler") -> tuple[Managed, int, Path, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = supervisor_config(workdir, port, warm, concurrency, handler)
    log = workdir / "stdout.jsonl"
    proc = Managed(name, [str(BIN / "supervisor"), "run", "--config", str(config)],
                   stdout=open(log, "wb"), stderr=open(workdir / "stderr.log", "wb"),
                   env=supervisor_env(), cwd=workdir)
    took = wait_status(proc, port, "/initialize", 30, log=log, seen=seen)
    proc.snapshot()
    return proc, port, log, took


class Supervisor(Target):
    def __init__(self, workdir: Path, key: str, warm: int, throughput: bool, concurrency: int = 1,
                 handler: str = "trivial:handler") -> None:
        super().__init__(workdir)
        self.key, self.warm, self.throughput = key, warm, throughput
        self.concurrency, self.handler = concurrency, handler
        self.title = f"ca-supervisor, min_warm={warm} max_workers={warm} concurrency={concurrency}" + (
            ", async handler" if handler != "trivial:handler" else "")
        self.rounds: list[dict[str, Any]] = []

    def start(self, round_no: int) -> float:
        self.dir = self.workdir / f"{self.key}-r{round_no}"
        self.proc, self.port, self.log, took = start_supervisor(self.key, self.dir, self.warm,
                                                                concurrency=self.concurrency, handler=self.handler)
        self.proc.snapshot()
        return took

    def stop(self) -> None:
        if self.proc is None:
            return
        status = supervisor_status(self.dir / "run")
        code = self.proc.stop(grace=15.0)
        self.proc = None
        obs = analyse_log(self.log) if self.log else {}
        obs["exit_code"] = code
        obs["stderr"] = stderr_of(self.dir)
        obs["status_before_stop"] = status
        self.rounds.append(obs)

    def observations(self) -> dict[str, Any]:
        return {"rounds": self.rounds}


def stderr_of(workdir: Path) -> dict[str, Any]:
    path = workdir / "stderr.log"
    size = path.stat().st_size if path.exists() else 0
    return {"bytes": size, "tail": tail(path, 10) if size else ""}


def supervisor_status(run_dir: Path) -> dict[str, Any] | None:
    code, out = run_quiet([str(BIN / "supervisor"), "status", "--json", "--run-dir", str(run_dir)], timeout=15)
    try:
        data = json.loads(out[out.index("{"):])
    except ValueError:
        return {"exit_code": code, "raw": out[-500:]}
    summary = {"exit_code": code, "ready": data.get("ready"),
               "components": {c.get("name"): {"state": c.get("state"), "restarts": c.get("restarts")}
                              for c in data.get("components", [])}}
    for fn in data.get("functions", []):
        summary["workers"] = [{"state": w.get("state"), "served": w.get("served"),
                               "rss_mib": round((w.get("rss_bytes") or 0) / 2**20, 1)}
                              for w in fn.get("workers", [])]
    return summary


def _epoch(stamp: str) -> float | None:
    from datetime import datetime
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


START_EVENTS = (
    # (label, predicate on the record) - the first matching line counts
    ("first log line", lambda r: True),
    ("control plane ready", lambda r: r.get("event") == "component ready" and r.get("component") == "control-plane"),
    ("worker spawned", lambda r: r.get("event") == "worker starting"),
    ("data plane ready", lambda r: r.get("event") == "component ready" and r.get("component") == "data-plane"),
    ("supervisor running", lambda r: r.get("event") == "supervisor running"),
    ("worker ready", lambda r: r.get("event") == "worker ready"),
    ("last FC Initialize End", lambda r: str(r.get("event", "")).startswith("FC Initialize End")),
)
LAST_WINS = {"last FC Initialize End"}


def start_phases(path: Path, spawn_wall: float) -> dict[str, float]:
    """When (ms after spawn, by the log's wall-clock timestamps) each start-up step happened."""
    found: dict[str, float] = {}
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            at = _epoch(rec.get("timestamp", ""))
            if at is None:
                continue
            for label, pred in START_EVENTS:
                if (label not in found or label in LAST_WINS) and pred(rec):
                    found[label] = round((at - spawn_wall) * 1000, 1)
                    if label == "worker ready" and "start_ms" in rec:
                        found["worker start_ms (own figure)"] = rec["start_ms"]
    return found


def analyse_log(path: Path) -> dict[str, Any]:
    """Size of the supervisor's stdout and anything in it that looks wrong."""
    lines = 0
    by_level: Counter[str] = Counter()
    markers: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    examples: dict[str, str] = {}
    exits: Counter[str] = Counter()
    unparsable = 0
    size = path.stat().st_size if path.exists() else 0
    with open(path, "rb") as fh:
        for raw in fh:
            lines += 1
            try:
                rec = json.loads(raw)
            except ValueError:
                unparsable += 1
                continue
            level = str(rec.get("level", "?"))
            by_level[level] += 1
            event = str(rec.get("event", ""))
            if event.startswith("FC Invoke Start"):
                markers["invoke_start"] += 1
            elif event.startswith("FC Invoke End"):
                markers["invoke_end"] += 1
            elif event == "worker exited":
                exits[str(rec.get("reason"))] += 1
            if level in ("warning", "error", "critical", "exception"):
                key = f"{level}: {event[:120]}"
                problems[key] += 1
                examples.setdefault(key, raw.decode(errors="replace").strip()[:600])
    return {"stdout_bytes": size, "stdout_lines": lines, "unparsable_lines": unparsable,
            "levels": dict(by_level), "markers": dict(markers), "worker_exits": dict(exits),
            "problems": dict(problems), "problem_examples": examples}


# ---------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------


def measure_latency(port: int, n: int, warmup: int, method: str = "POST", path: str = "/invoke",
                    body: bytes | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Sequential requests on one keep-alive connection (TCP_NODELAY); POST /invoke with BODY by default."""
    if method == "POST" and body is None:
        body = BODY
        headers = {**HEADERS, **(headers or {})}  # the caller's headers (a function name, say) are kept
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples: list[int] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()
    try:
        for i in range(warmup + n):
            t0 = clock()
            try:
                conn.request(method, path, body, headers or {})
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException) as exc:
                errors[type(exc).__name__] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            t1 = clock()
            if i >= warmup:
                samples.append(t1 - t0)
                statuses[resp.status] += 1
    finally:
        gc.enable()
        conn.close()
    ms = sorted(s / 1e6 for s in samples)
    return {
        "n": len(ms),
        "p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90), "p99_ms": pct(ms, 99), "p999_ms": pct(ms, 99.9),
        "min_ms": ms[0] if ms else float("nan"), "max_ms": ms[-1] if ms else float("nan"),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
        "non_200": sum(c for s, c in statuses.items() if s != 200),
        "statuses": {str(k): v for k, v in statuses.items()},
        "client_errors": dict(errors),
    }


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else float("nan")
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    res["requests"] = int(m.group(1)) if m else 0
    for q in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", out, re.M)
        res[f"p{q}_ms"] = _wrk_ms(m.group(1)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()))) if m else {}
    res["socket_errors_total"] = sum(res["socket_errors"].values())
    return res


def run_wrk(argv: list[str], duration: float) -> str:
    """Run wrk to completion (with a deadline) and return its report."""
    proc = Managed("wrk", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.popen.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        proc.stop(grace=2)
        raise RuntimeError("wrk did not finish in time") from None
    proc.stop(grace=2)
    return out.decode(errors="replace")


def measure_wrk(wrk: str, port: int, duration: int, trees: list[Managed]) -> dict[str, Any]:
    argv = [wrk, "-t2", "-c64", f"-d{duration}s", "--latency", "-s", str(BENCH / "post.lua"),
            f"http://127.0.0.1:{port}/invoke"]
    with CpuWatch(trees) as watch:
        text = run_wrk(argv, duration)
    res = parse_wrk(text)
    res["cpu"] = watch.result
    res["raw"] = text
    return res


def ensure_wrk() -> str | None:
    found = shutil.which("wrk")
    if found:
        return found
    say("wrk is missing: apt-get install -y wrk")
    apt = ["apt-get", "install", "-y", "wrk"]
    if os.geteuid() != 0 and shutil.which("sudo"):
        apt = ["sudo", "-n", *apt]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for step in ([apt], [apt[:-3] + ["update"], apt]):
        for argv in step:
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=env, timeout=600, check=False)
        found = shutil.which("wrk")
        if found:
            return found
    say("could not install wrk: throughput tests are skipped")
    return None


def ensure_gunicorn() -> bool:
    if (BIN / "gunicorn").exists():
        return True
    say("gunicorn is missing: pip install gunicorn into the venv")
    run_quiet([PYTHON, "-m", "pip", "install", "-q", "gunicorn"], timeout=600)
    if (BIN / "gunicorn").exists():
        return True
    say("gunicorn could not be installed: target B is skipped")
    return False


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


def describe_machine() -> dict[str, Any]:
    m = common.machine(("uvicorn", "gunicorn", "uvloop", "httptools", "ca-supervisor"),
                       dirty_note=" (work tree has uncommitted changes)")
    wrk = shutil.which("wrk")
    if wrk:
        _, out = run_quiet([wrk, "-v"], timeout=10)
        m["versions"]["wrk"] = out.split()[1] if len(out.split()) > 1 else out.strip()
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter durations (3 s wrk, 1000 requests, 3 start runs)")
    ap.add_argument("--only", default="A,B,C", help="comma-separated subset of A,B,C (C = C1, C2 and start-up)")
    ap.add_argument("--latency-n", type=int, default=None, help="sequential requests per latency test (default 5000)")
    ap.add_argument("--duration", type=int, default=None, help="seconds per wrk run (default 10)")
    ap.add_argument("--start-runs", type=int, default=None, help="start-up measurements (default 5)")
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="before each test wait up to this many seconds for the machine to be quiet "
                         "(default 60, 5 with --quick)")
    ap.add_argument("--render", metavar="RESULTS_JSON",
                    help="only re-render bench/RESULTS.md from a saved results.json (no measurement)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the work dir (targets' logs) in /tmp")
    ap.add_argument("--write", action="store_true", help="write bench/RESULTS.md even for --quick/--only runs")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    args = ap.parse_args(argv)

    if args.render:
        saved = json.loads(Path(args.render).read_text())
        report = render(saved)
        say(report)
        if not args.no_write:
            write_report(report)
            say(f"wrote {BENCH / 'RESULTS.md'}")
        return 0

    only = {part.strip().upper() for part in args.only.split(",") if part.strip()}
    bad = only - {"A", "B", "C", "C1", "C2", "C3"}
    if bad:
        ap.error(f"--only takes A, B and C, got {sorted(bad)}")
    if {"C1", "C2", "C3"} & only:
        only.add("C")
    n = args.latency_n or (1000 if args.quick else 5000)
    warmup = 200 if args.quick else 500
    duration = args.duration or (3 if args.quick else 10)
    start_runs = args.start_runs or (3 if args.quick else 5)
    quiet_wait = args.quiet_wait if args.quiet_wait is not None else (5.0 if args.quick else 60.0)
    full = only >= {"A", "B", "C"} and not args.quick and not (args.latency_n or args.duration or args.start_runs)
    write = not args.no_write and (full or args.write)

    common.clean_up_on_exit()  # SIGINT too, also when started with SIGINT ignored (a background job)

    workdir = Path(tempfile.mkdtemp(prefix="ca-bench-"))
    say(f"work dir: {workdir}")
    results: dict[str, Any] = {"options": {"only": sorted(only), "quick": args.quick, "latency_n": n,
                                           "warmup": warmup, "wrk_duration_s": duration,
                                           "start_runs": start_runs, "quiet_wait_s": quiet_wait},
                               "latency": {}, "throughput": {}, "start": None, "skipped": [],
                               "observations": {}, "targets": {}}
    try:
        wrk = ensure_wrk()
        if wrk is None:
            results["skipped"].append("throughput: wrk could not be installed")
        results["machine"] = describe_machine()
        targets: list[Target] = []
        if "A" in only:
            targets.append(Uvicorn(workdir))
        if "B" in only:
            if ensure_gunicorn():
                targets.append(Gunicorn(workdir))
            else:
                results["skipped"].append("B: gunicorn could not be installed")
        if "C" in only:
            if not {"C1", "C2", "C3"} & only or "C1" in only:
                targets.append(Supervisor(workdir, "C1", 1, throughput=False))
            if not {"C1", "C2", "C3"} & only or "C2" in only:
                targets.append(Supervisor(workdir, "C2", 2, throughput=True))
            if not {"C1", "C2", "C3"} & only or "C3" in only:
                targets.append(Supervisor(workdir, "C3", 2, throughput=True, concurrency=32,
                                          handler="trivial:async_handler"))
        for t in targets:
            results["targets"][t.key] = t.title

        for round_no in (1, 2):
            say(f"\n== round {round_no} ==")
            for t in targets:
                say(f"[{t.key}] starting: {t.title}")
                took = t.start(round_no)
                try:
                    say(f"[{t.key}] ready in {took * 1000:.0f} ms (port {t.port})")
                    quiet = wait_for_quiet([t.proc], quiet_wait)
                    with CpuWatch([t.proc]) as watch:
                        lat = measure_latency(t.port, n, warmup)
                    lat["cpu"] = watch.result
                    lat["quiet_wait"] = quiet
                    results["latency"].setdefault(t.key, []).append(lat)
                    say(f"[{t.key}] latency: p50 {lat['p50_ms']:.3f} ms  p99 {lat['p99_ms']:.3f} ms  "
                        f"max {lat['max_ms']:.2f} ms  non-200 {lat['non_200']}  "
                        f"(other CPU {watch.result['other_pct']}%)")
                    if t.throughput and wrk:
                        quiet = wait_for_quiet([t.proc], quiet_wait)
                        res = measure_wrk(wrk, t.port, duration, [t.proc])
                        res["quiet_wait"] = quiet
                        results["throughput"].setdefault(t.key, []).append(res)
                        say(f"[{t.key}] wrk: {res['rps']:.0f} req/s  p50 {res['p50_ms']:.2f} ms  "
                            f"p99 {res['p99_ms']:.2f} ms  non-2xx {res['non_2xx']}  "
                            f"socket errors {res['socket_errors_total']}  "
                            f"(other CPU {res['cpu']['other_pct']}%, target {res['cpu']['target_cores']} cores, "
                            f"wrk {res['cpu']['client_cores']} cores)")
                        say(f"[{t.key}]   target CPU by process (cores): {res['cpu']['target_processes']}")
                finally:
                    t.stop()

        for t in targets:
            obs = t.observations()
            if obs:
                results["observations"][t.key] = obs

        if "C" in only:
            say(f"\n== start-up: spawn -> POST /initialize 200, {start_runs} runs ==")
            times = []
            start_obs = []
            for i in range(start_runs):
                wait_for_quiet([], quiet_wait)
                polls: Counter[str] = Counter()
                proc, _, log, took = start_supervisor(f"start{i}", workdir / f"start-{i}", 1, seen=polls)
                try:
                    times.append(took)
                    say(f"[start] run {i + 1}: {took * 1000:.0f} ms")
                finally:
                    proc.stop(grace=15.0)
                obs = analyse_log(log)
                obs = {k: obs[k] for k in ("problems", "worker_exits", "problem_examples")}
                obs["phases_ms"] = start_phases(log, proc.started_wall)
                obs["stderr"] = stderr_of(workdir / f"start-{i}")
                obs["exit_code"] = proc.popen.returncode
                obs["polls_before_200"] = dict(polls)
                start_obs.append(obs)
                say(f"[start]   phases (ms after spawn): {obs['phases_ms']}")
                say(f"[start]   polls before the 200: {dict(polls)}")
                time.sleep(0.2)
            s = sorted(times)
            results["start"] = {"runs_s": times, "p50_s": statistics.median(s), "min_s": s[0], "max_s": s[-1]}
            results["observations"]["start"] = start_obs
    except KeyboardInterrupt as exc:
        say(f"\ninterrupted ({exc or 'Ctrl-C'}): cleaning up")
        common.cleanup_all()
        return 130
    finally:
        common.cleanup_all()

    report = render(results)
    say("\n" + report)
    json_results = json.loads(json.dumps(results, default=str))
    for runs in json_results["throughput"].values():
        for r in runs:
            r.pop("raw", None)
    if write:
        write_report(report)
        # other scripts' parts of results.json (bench/chaos.py's "chaos") stay
        (BENCH / "results.json").write_text(json.dumps(common.carry_over_results(json_results), indent=2) + "\n")
        say(f"wrote {BENCH / 'RESULTS.md'} and {BENCH / 'results.json'}")
    else:
        say("(partial or quick run: RESULTS.md left alone; --write to write it anyway)")
    if args.keep_logs:
        say(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


NOTES_START, NOTES_END = "<!-- notes:start -->", "<!-- notes:end -->"
# Sections other scripts write into RESULTS.md between <!-- NAME:start --> and <!-- NAME:end -->
# (bench/pools.py's "pools", bench/custom.py's "custom"): carried over, in their order, when this rewrites it.
SECTION = re.compile(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", re.S)


def write_report(report: str) -> None:
    """Write RESULTS.md, carrying over the hand-written notes and every other script's marked section."""
    path = BENCH / "RESULTS.md"
    notes = f"{NOTES_START}\n_(Hand-written notes go here; bench/run.py keeps this block when it rewrites the file.)_\n{NOTES_END}"
    sections = ""
    if path.exists():
        old = path.read_text()
        if NOTES_START in old and NOTES_END in old:
            notes = old[old.index(NOTES_START):old.index(NOTES_END) + len(NOTES_END)]
        sections = "".join("\n\n" + m.group(0) for m in SECTION.finditer(old) if m.group(1) != "notes")
    path.write_text(report.rstrip("\n") + sections + "\n\n## Notes\n\n" + notes + "\n")


def _f(x: float, digits: int = 3) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def render(r: dict[str, Any]) -> str:
    m = r.get("machine", {})
    lat, thr = r["latency"], r["throughput"]
    out: list[str] = []
    w = out.append
    w("# Benchmark results\n")
    w("Generated by `bench/run.py`; docs/performance.md (\"Targets\") says what is measured and why.\n")
    w("## Reproduce\n")
    w("```\n.venv/bin/python bench/run.py\n```\n")
    opts = r["options"]
    w(f"This run: targets {', '.join(opts['only'])}; {opts['latency_n']} sequential requests per latency test "
      f"(after {opts['warmup']} warm-up); `wrk -t2 -c64 -d{opts['wrk_duration_s']}s --latency -s bench/post.lua`; "
      f"{opts['start_runs']} start-up runs. Every latency and throughput test ran twice (round 1 and round 2, "
      "each target started afresh per round); both are kept.\n")
    w("## Machine\n")
    if m:
        w(f"- {m['nproc']} CPUs (nproc; affinity {m['affinity']}), {m['cpu_model']}, {m['memory']} RAM")
        w(f"- kernel {m['kernel']}, Python {m['python']}")
        w("- " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
        w(f"- ca-supervisor commit {m['git']}; run {m['date_utc']}\n")
    w("## Targets\n")
    for key, title in r["targets"].items():
        w(f"- **{key}**: {title}")
    w("\nEvery target runs the same `handler(event, context)` of `bench/handlers/trivial.py` "
      "(A and B call it in-process from a raw ASGI app, `bench/baseline_app.py`). All listen on 127.0.0.1.\n")
    for note in r["skipped"]:
        w(f"- skipped: {note}")

    w("## Latency at concurrency 1\n")
    w("One keep-alive connection, http.client, sequential POST /invoke with a 23-byte JSON body. "
      "A's figure is the client + loopback + bare server cost; what the supervisor adds is C minus A "
      "in the same round.\n")
    w("| target | round | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | non-200 | added p50 ms (vs A) | added p99 ms (vs A) | other CPU % |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, runs in lat.items():
        for i, x in enumerate(runs):
            base = lat.get("A", [None, None])[i] if "A" in lat and i < len(lat["A"]) else None
            add50 = x["p50_ms"] - base["p50_ms"] if base and key != "A" else float("nan")
            add99 = x["p99_ms"] - base["p99_ms"] if base and key != "A" else float("nan")
            w(f"| {key} | {i + 1} | {_f(x['p50_ms'])} | {_f(x['p90_ms'])} | {_f(x['p99_ms'])} | {_f(x['p999_ms'])} "
              f"| {_f(x['max_ms'], 2)} | {x['non_200']} | {_f(add50)} | {_f(add99)} | {x['cpu']['other_pct']} |")
    w("")

    cpu_lines = []
    for key, runs in lat.items():
        for i, x in enumerate(runs):
            procs = x["cpu"].get("target_processes", {})
            done = x["n"] + r["options"]["warmup"]  # the CPU window covers the warm-up too
            rate = done / x["cpu"]["elapsed_s"] if x["cpu"].get("elapsed_s") else float("nan")
            per = ", ".join(f"{k} {v / rate * 1e6:.0f}" for k, v in procs.items() if v) if rate == rate else ""
            cpu_lines.append(f"- {key} round {i + 1} ({rate:,.0f} req/s): {per}")
    if cpu_lines:
        w("Target CPU per invocation during the latency tests (microseconds, by process kind):\n")
        out.extend(cpu_lines)
        w("")

    w("## Throughput at concurrency 64\n")
    w("`wrk -t2 -c64 -dNs --latency -s bench/post.lua http://127.0.0.1:PORT/invoke`, on the same 2 cores as the "
      "server (wrk itself takes a large share of them). \"other CPU\" is CPU used during the run by processes "
      "that are neither the target nor wrk, as a share of the whole machine (approximate, from /proc/stat).\n")
    w("| target | round | req/s | p50 ms | p99 ms | non-2xx | socket errors (c/r/w/t) | target cores | wrk cores | other CPU % |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for key, runs in thr.items():
        for i, x in enumerate(runs):
            se = x["socket_errors"]
            ses = "/".join(str(se.get(k, 0)) for k in ("connect", "read", "write", "timeout")) if se else "0"
            w(f"| {key} | {i + 1} | {x['rps']:.0f} | {_f(x['p50_ms'], 2)} | {_f(x['p99_ms'], 2)} | {x['non_2xx']} "
              f"| {ses} | {x['cpu']['target_cores']} | {x['cpu']['client_cores']} | {x['cpu']['other_pct']} |")
    w("")
    totals = {key: [sum(x["cpu"].get("target_processes", {}).values()) / x["rps"] * 1e6 for x in runs if x["rps"]]
              for key, runs in thr.items()}
    if totals:
        w("Target CPU per invocation under load (all its processes, microseconds): "
          + "; ".join(f"{k} " + " / ".join(f"{v:.0f}" for v in vs) for k, vs in totals.items())
          + f" (rounds). The machine has {common.NCPU} x 1,000,000 us of CPU per second, shared with wrk.\n")
    if thr:
        w("Where the target's CPU went during each wrk run (cores, by process kind; "
          "`worker.main` and `gunicorn` sum over their processes):\n")
        for key, runs in thr.items():
            for i, x in enumerate(runs):
                procs = ", ".join(f"{k} {v}" for k, v in x["cpu"].get("target_processes", {}).items())
                per = ", ".join(f"{k} {v / x['rps'] * 1e6:.0f}" for k, v in x["cpu"].get("target_processes", {}).items()
                                if v and x["rps"])
                w(f"- {key} round {i + 1}: {procs} (per invocation, us: {per})")
        w("")

    if r.get("start"):
        s = r["start"]
        w("## Start-up\n")
        w("`supervisor run` (min_warm=1, max_workers=1) spawned -> POST /initialize answers 200, polled every 10 ms.\n")
        w(f"p50 **{s['p50_s'] * 1000:.0f} ms** (min {s['min_s'] * 1000:.0f}, max {s['max_s'] * 1000:.0f}; runs: "
          + ", ".join(f"{t * 1000:.0f}" for t in s["runs_s"]) + " ms)\n")
        phases = [o.get("phases_ms", {}) for o in r.get("observations", {}).get("start", [])]
        if phases:
            labels = [label for label, _ in START_EVENTS] + ["worker start_ms (own figure)"]
            w("When each step happened, ms after spawn (from the log's timestamps, so +-1 ms), per run:\n")
            w("| step | " + " | ".join(f"run {i + 1}" for i in range(len(phases))) + " |")
            w("|---|" + "---|" * len(phases))
            for label in labels:
                w(f"| {label} | " + " | ".join(_f(ph.get(label, float('nan')), 0) for ph in phases) + " |")
            w("| POST /initialize 200 (client) | " + " | ".join(f"{t * 1000:.0f}" for t in s["runs_s"]) + " |")
            w("")
            polls = [o.get("polls_before_200", {}) for o in r.get("observations", {}).get("start", [])]
            w("What the 10 ms polls of POST /initialize got before the 200, per run: "
              + "; ".join(", ".join(f"{k}: {v}" for k, v in pl.items() if not k.startswith("first")) or "nothing"
                          for pl in polls) + ".")
            bad = [i + 1 for i, pl in enumerate(polls) if any(k.isdigit() for k in pl)]
            slow = [i + 1 for i, ph in enumerate(phases) if ph.get("worker start_ms (own figure)", 0) > 500]
            if bad:
                w(f"**In run(s) {', '.join(map(str, bad))} POST /initialize answered non-200 before its 200** "
                  "(the platform calls it once: such an answer fails the instance start).")
            if slow:
                w(f"In run(s) {', '.join(map(str, slow))} the worker took over 0.5 s to become ready.")
            bodies = {v for pl in polls for k, v in pl.items() if k.startswith("first")}
            for body in sorted(bodies):
                w(f"\n- a non-200 answer: `{body}`")
            w("")

    # targets against goals
    w("## Against the targets (docs/performance.md)\n")
    w("| target | goal | measured | verdict |")
    w("|---|---|---|---|")
    if "A" in lat:
        for ck in ("C1", "C2"):
            if ck not in lat:
                continue
            pairs = list(zip(lat["A"], lat[ck]))
            a50 = [c["p50_ms"] - a["p50_ms"] for a, c in pairs]
            a99 = [c["p99_ms"] - a["p99_ms"] for a, c in pairs]
            w(f"| added p50 latency, {ck} - A | <= {GOALS['added_p50_ms']} ms | "
              + " / ".join(f"{x:.3f}" for x in a50) + f" ms (rounds) | {verdict(max(a50) <= GOALS['added_p50_ms'])} |")
            w(f"| added p99 latency, {ck} - A | <= {GOALS['added_p99_ms']} ms | "
              + " / ".join(f"{x:.3f}" for x in a99) + f" ms (rounds) | {verdict(max(a99) <= GOALS['added_p99_ms'])} |")
    for ck, label in (("C2", "C2 (sync, concurrency 1)"), ("C3", "C3 (async, concurrency 32)")):
        if ck not in thr:
            continue
        c = thr[ck]
        rps = [x["rps"] for x in c]
        errs = [x["non_2xx"] + x["socket_errors_total"] for x in c]
        w(f"| throughput {label}, c=64 | >= {GOALS['rps_min']:,} req/s (10 x Noslate) with 0 errors | "
          + " / ".join(f"{x:,.0f}" for x in rps) + " req/s, errors " + " / ".join(map(str, errs))
          + f" | {verdict(min(rps) >= GOALS['rps_min'] and max(errs) == 0)} |")
        if "B" in thr:
            shares = [cx["rps"] / bx["rps"] for cx, bx in zip(c, thr["B"]) if bx["rps"]]
            w(f"| throughput {ck} / B (aim) | >= {GOALS['gunicorn_share']} x gunicorn | "
              + " / ".join(f"{x:.2f}" for x in shares) + f" | {verdict(bool(shares) and min(shares) >= GOALS['gunicorn_share'])} |")
        if "A" in thr:
            shares = [cx["rps"] / ax["rps"] for cx, ax in zip(c, thr["A"]) if ax["rps"]]
            w(f"| throughput {ck} / A (for reference) | - | " + " / ".join(f"{x:.2f}" for x in shares) + " | - |")
    if r.get("start"):
        p50 = r["start"]["p50_s"]
        w(f"| start to /initialize 200, 1 warm worker | <= {GOALS['start_s']} s | {p50:.3f} s (p50) "
          f"| {verdict(p50 <= GOALS['start_s'])} |")
    w("")

    # what the supervisor's log said
    obs = r.get("observations", {})
    if any(k in obs for k in ("C1", "C2", "start")):
        w("## The supervisor's own output\n")
        w("stdout (JSON log lines) went to a file per run; the FC markers make 2 lines per invocation.\n")
        w("\"answered\" counts the invocations the clients got an answer to (latency test incl. warm-up, plus "
          "wrk's completed requests); up to 64 more may have been in flight when wrk stopped.\n")
        w("| run | answered | FC Invoke Start/End | stdout lines | stdout MiB | bytes/invocation | worker exits | warnings/errors | restarts (status) |")
        w("|---|---|---|---|---|---|---|---|---|")
        for key in ("C1", "C2"):
            for i, o in enumerate(obs.get(key, {}).get("rounds", [])):
                mk = o.get("markers", {})
                st = o.get("status_before_stop") or {}
                restarts = {n: c.get("restarts") for n, c in (st.get("components") or {}).items()}
                answered = 0
                if i < len(lat.get(key, [])):
                    answered += lat[key][i]["n"] + r["options"]["warmup"]
                if i < len(thr.get(key, [])):
                    answered += thr[key][i]["requests"]
                starts = mk.get("invoke_start", 0)
                per = o["stdout_bytes"] / starts if starts else float("nan")
                w(f"| {key} round {i + 1} | {answered:,} | {starts:,}/{mk.get('invoke_end', 0):,} | "
                  f"{o['stdout_lines']:,} | {o['stdout_bytes'] / 2**20:.1f} | {_f(per, 0)} | "
                  f"{o['worker_exits'] or '-'} | {sum(o['problems'].values())} | {restarts or st.get('raw', '-')} |")
        w("")
        seen: dict[str, tuple[int, str]] = {}
        for key in ("C1", "C2"):
            for o in obs.get(key, {}).get("rounds", []):
                for p, count in o["problems"].items():
                    c0, ex = seen.get(p, (0, o["problem_examples"][p]))
                    seen[p] = (c0 + count, ex)
        for o in obs.get("start", []):
            for p, count in o["problems"].items():
                c0, ex = seen.get(p, (0, o["problem_examples"][p]))
                seen[p] = (c0 + count, ex)
        stderrs = [o.get("stderr", {}) for key in ("C1", "C2") for o in obs.get(key, {}).get("rounds", [])]
        stderrs += [o.get("stderr", {}) for o in obs.get("start", [])]
        nonempty = [e for e in stderrs if e.get("bytes")]
        if nonempty:
            w(f"stderr was not empty in {len(nonempty)} of {len(stderrs)} runs; last lines of one:\n")
            w("```\n" + nonempty[0]["tail"][-1500:] + "\n```\n")
        else:
            w(f"stderr was empty in all {len(stderrs)} runs.\n")
        if seen:
            w("Warnings and errors the supervisor logged (all runs, count, one example):\n")
            for p, (count, ex) in sorted(seen.items(), key=lambda kv: -kv[1][0]):
                w(f"- {count} x `{p}`  \n  `{ex[:400]}`")
            w("")
        else:
            w("No warning or error lines in the supervisor's log.\n")

    # noise
    w("## Noise\n")
    others = [x["cpu"]["other_pct"] for runs in thr.values() for x in runs] + \
             [x["cpu"]["other_pct"] for runs in lat.values() for x in runs]
    loads = [x["cpu"]["loadavg1_before"] for runs in thr.values() for x in runs]
    spreads = []
    for key, runs in thr.items():
        if len(runs) == 2 and min(runs[0]["rps"], runs[1]["rps"]) > 0:
            spreads.append((key, abs(runs[0]["rps"] - runs[1]["rps"]) / max(runs[0]["rps"], runs[1]["rps"])))
    if others:
        w(f"CPU used by other processes during the tests: up to {max(others)}% of the machine "
          f"(median {statistics.median(others)}%); 1-min load average before the wrk runs: "
          + ", ".join(f"{x:.2f}" for x in loads) + ".")
    if spreads:
        w("Round-to-round spread of req/s: " + ", ".join(f"{k} {s * 100:.0f}%" for k, s in spreads) + ".")
    waits = [x.get("quiet_wait", {}) for runs in list(thr.values()) + list(lat.values()) for x in runs]
    not_quiet = sum(1 for q in waits if q and not q.get("quiet"))
    if waits:
        w(f"Before each test the script waited (up to {r['options']['quiet_wait_s']:.0f} s) for a second in which "
          f"other processes used < 0.25 cores; {not_quiet} of {len(waits)} tests started without getting one.")
    outside = bool(others) and max(others) >= 5
    wide = [k for k, sp in spreads if sp >= 0.10]
    if outside:
        w("\n**The machine was shared with other work during this run** (other engineers' tests and editors "
          "on the same 2 cores) and it showed: figures from tests with a high \"other CPU\" share are "
          "pessimistic; compare targets within a round rather than across rounds.")
    else:
        w("\nThe machine is shared with other work (other engineers' tests on the same 2 cores), but no "
          "significant outside load was measured during these tests.")
    if wide:
        w(f"Round-to-round spread of 10 % or more for {', '.join(wide)}"
          + (" without outside load to explain it: treat single runs as +-that much." if not outside else "."))
    w("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
