#!/usr/bin/env python3
"""Pools that breathe: worker start by fork vs spawn, burst from idle, idle memory (PSS).

    .venv/bin/python bench/pools.py            # full run (~3 min), prints a Markdown section
    .venv/bin/python bench/pools.py --quick    # smoke run (N=20, 1 burst round, shorter waits)
    .venv/bin/python bench/pools.py --write    # also put the section into bench/RESULTS.md,
                                               # between <!-- pools:start --> and <!-- pools:end -->
                                               # (appended at the end when the markers are absent)

Every figure comes from a real ``supervisor run`` (``python -m supervisor.cli run --config X``),
with fork (``seed = true``) and spawn (``seed = false``) side by side in the same run.

1. start    New worker ready (docs/performance.md, "Targets": p50 <= 10 ms via the seed). One supervisor with
            four functions: {trivial, imports} handler x {fork, spawn}, each ``disposable = true``,
            ``min_warm = 1``, ``concurrency = 1``. Every invocation spends a worker and the control
            plane starts its replacement; its ``"worker ready"`` log line carries ``start_ms``
            (decision to start -> initialized and connected). The functions are invoked round-robin,
            one at a time, and the next invocation waits for the previous one's replacement to be
            ready, so each start happens on an otherwise idle supervisor. The first few starts of
            each function are warm-up and not counted.
2. burst    Burst from idle: ``min_warm = 1``, ``max_workers = 16``, ``concurrency = 4``, an async
            handler that sleeps 100 ms (bench/handlers/sleep100.py). 64 invocations are sent at once
            over 64 connections opened beforehand; drain = first request written -> last answer
            read. Workers started come from ``supervisor_worker_starts_total``. Lower bound, had all
            16 x 4 slots existed: 64 / 64 x 100 ms = 0.1 s. Fork and spawn rounds alternate in one
            supervisor, each starting from an idle pool back at min_warm (``idle_ttl = 1s``).
3. memory   Idle PSS (psutil ``memory_full_info().pss``, /proc/PID/smaps_rollup) of every process of
            the tree, with min_warm = 1, then after ``supervisor scale FN --min-warm K`` for each K.
            Per extra worker = growth of the whole tree's PSS / added workers (the seed's and the
            other workers' PSS drop as more processes share their pages; the tree total counts that).
            Targets (docs/performance.md): planes idle <= 80 MiB, each extra forked worker <= 5 MiB.

Every invocation's answer is checked (non-200s and failed requests are counted and reported). Every
supervisor started here lives in its own session and is stopped with SIGTERM, waited for with a
deadline, then its process group and every descendant seen are killed on timeout; also on error and
on Ctrl-C/SIGTERM.

The Markdown section goes to stdout (progress to stderr). Exit status: 0 done, 1 a test could not
run (see "Checks"), 3 done but some invocations were not answered 200.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import common
import psutil
from common import BENCH, BODY, ROOT, CpuWatch, Managed, free_port, pct, say, tail, verdict, wait_for_quiet

HANDLERS = BENCH / "handlers"
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
RESULTS = BENCH / "RESULTS.md"
START_MARK, END_MARK = common.POOLS_START, common.POOLS_END
MIB = 1 << 20

GOALS = {"fork_p50_ms": 10.0, "planes_mib": 80.0, "fork_worker_mib": 5.0}
HANDLER_SPECS = {
    "trivial": ("trivial:handler", "bench/handlers/trivial.py: json.loads the event, returns a dict"),
    "imports": ("imports:handler", "bench/handlers/imports.py: the same work, after importing json, orjson, "
                "pydantic (one model), urllib.request, http.client, email, decimal, datetime, uuid, "
                "hashlib, logging, dataclasses at module level"),
}
BURST = {"requests": 64, "concurrency": 4, "max_workers": 16}
BURST_SLEEP_S = 0.1  # what bench/handlers/sleep100.py awaits
# had every slot been warm: ceil(64 / (16 x 4)) rounds of 100 ms
BURST_LOWER_S = -(-BURST["requests"] // (BURST["max_workers"] * BURST["concurrency"])) * BURST_SLEEP_S


common.say_to(sys.stderr)  # stdout is for the Markdown section


class Deadline(Exception):
    pass


def wait_until(condition: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except Exception as exc:  # the condition may fail until it holds
            last = exc
        time.sleep(interval)
    raise Deadline(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last!r})" if last else ""))


# ---------------------------------------------------------------------------
# a running supervisor
# ---------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def function_spec(handler: str, seed: bool, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"runtime": "python", "handler": handler, "interface": "event",
                            "code_dir": str(HANDLERS), "timeout": "10s", "seed": seed,
                            "env": {common.TAG_VAR: common.TAG}}
    spec.update(overrides)
    return spec


class LogTail:
    """Reads the JSON lines the supervisor has written since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.lines: list[dict[str, Any]] = []  # everything read so far

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return []
        self.offset += len(data)
        chunks = (self.partial + data).split(b"\n")
        self.partial = chunks.pop()
        new = []
        for raw in chunks:
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise ValueError
            except ValueError:
                obj = {"event": raw.decode(errors="replace"), "unparsed": True}
            new.append(obj)
        self.lines += new
        return new


class Supervisor(Managed):
    """A ``supervisor run`` of its own config; SIGTERM goes to it alone, it stops its planes and workers."""

    stop_grace, cleanup_grace, term_group = 20.0, 10.0, False

    def __init__(self, name: str, workdir: Path, functions: dict[str, dict[str, Any]],
                 wrapper: tuple[str, ...] = ()) -> None:
        """``wrapper``: argv the supervisor's command is appended to (``unshare ...``)."""
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.run_dir = workdir / "run"
        self.ca_port, self.metrics_port = free_port(), free_port()
        settings = {"ca_port": self.ca_port, "metrics_port": self.metrics_port, "host": "127.0.0.1",
                    "run_dir": str(self.run_dir), "log_format": "json", "grace_period": "5s",
                    "default_function": next(iter(functions))}
        lines = ["# generated by bench/pools.py", "[supervisor]"] + [f"{k} = {toml_value(v)}" for k, v in settings.items()]
        for fname, spec in functions.items():
            lines.append(f"\n[functions.{fname}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in spec.items()]
        self.config = workdir / "supervisor.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("FC_SERVER_PORT", "FC_CUSTOM_LISTEN_PORT", "CA_PORT", "SUPERVISOR_RUN_DIR",
                                 "SUPERVISOR_CONFIG")}
        self.env[common.TAG_VAR] = common.TAG
        self.log_path = workdir / "stdout.jsonl"
        self.err_path = workdir / "stderr.log"
        with open(self.log_path, "wb") as out, open(self.err_path, "wb") as err:
            super().__init__(name, [*wrapper, PYTHON, "-m", "supervisor.cli", "run", "--config", str(self.config)],
                             stdout=out, stderr=err, env=self.env, cwd=str(ROOT))
        self.log = LogTail(self.log_path)

    # -- talking to it -----------------------------------------------------------

    def initialize(self, timeout: float = 60.0) -> float:
        t0 = time.monotonic()

        def ok() -> bool:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name}: supervisor exited {self.popen.returncode}; stderr: "
                                   + self.err_path.read_text(errors="replace")[-1500:])
            conn = http.client.HTTPConnection("127.0.0.1", self.ca_port, timeout=timeout)
            try:
                conn.request("POST", "/initialize", b"")
                return conn.getresponse().status == 200
            except OSError:
                return False
            finally:
                conn.close()

        try:
            wait_until(ok, timeout, f"{self.name}: POST /initialize == 200", interval=0.02)
        except Deadline:
            raise RuntimeError(f"{self.name}: /initialize not 200 within {timeout:.0f}s; log tail:\n"
                               + tail(self.log_path)) from None
        self.snapshot()
        return time.monotonic() - t0

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, "-m", "supervisor.cli", *args, "--run-dir", str(self.run_dir)],
                              capture_output=True, text=True, timeout=timeout, env=self.env, cwd=str(ROOT),
                              stdin=subprocess.DEVNULL)

    def status(self) -> dict[str, Any]:
        done = self.cli("status", "--json")
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    def workers(self, status: dict[str, Any], function: str) -> list[dict[str, Any]]:
        for fn in status["functions"]:
            if fn["name"] == function:
                return fn["workers"]  # type: ignore[no-any-return]
        raise KeyError(function)

    def scale(self, function: str, min_warm: int) -> None:
        done = self.cli("scale", function, "--min-warm", str(min_warm))
        if done.returncode != 0:
            raise RuntimeError(f"{self.name}: scale {function} --min-warm {min_warm} exited {done.returncode}: "
                               f"{(done.stderr or done.stdout).strip()[:500]}")

    def metrics(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            return resp.read().decode(errors="replace")
        finally:
            conn.close()

    def starts(self, function: str) -> Counter[str]:
        """supervisor_worker_starts_total for one function, by mode."""
        out: Counter[str] = Counter()
        for line in self.metrics().splitlines():
            if not line.startswith("supervisor_worker_starts_total{"):
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.index("}")]))
            if labels.get("function") == function:
                out[labels.get("mode", "?")] += int(float(line.rsplit(" ", 1)[1]))
        return out

    def log_problems(self) -> dict[str, Any]:
        """Warning/error lines of its log (by event, with one example) and its stderr."""
        self.log.read()
        seen: dict[str, list[Any]] = {}
        for line in self.log.lines:
            if line.get("unparsed") or line.get("level") in ("warning", "error", "critical", "fatal"):
                key = f"{line.get('level', 'unparsed')}: {str(line.get('event'))[:120]}"
                if key not in seen:
                    seen[key] = [0, json.dumps(line)[:300]]
                seen[key][0] += 1
        stderr = self.err_path.read_text(errors="replace") if self.err_path.exists() else ""
        return {"lines": {k: v for k, v in seen.items()}, "stderr_tail": stderr[-800:]}


# ---------------------------------------------------------------------------
# 1. new worker ready: fork vs spawn
# ---------------------------------------------------------------------------


class Invoker:
    """Sequential POST /invoke over one keep-alive connection; reconnects after a failure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def __call__(self, function: str, body: bytes = BODY, timeout: float = 30.0) -> tuple[int, bytes]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            try:
                self.conn.request("POST", "/invoke", body, {"Content-Type": "application/json",
                                                           "x-fc-function-name": function})
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self.close()
                return resp.status, data
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def log_epoch(line: dict[str, Any]) -> float:
    """A log line's timestamp (ISO 8601 UTC, wall clock) as epoch seconds; NaN without one."""
    try:
        return datetime.datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return float("nan")


def start_functions(handlers: list[str], **overrides: Any) -> dict[str, dict[str, Any]]:
    """``<handler>-<fork|spawn>`` disposable functions, one start per invocation."""
    functions: dict[str, dict[str, Any]] = {}
    for h in handlers:
        for mode, seed in (("fork", True), ("spawn", False)):
            functions[f"{h}-{mode}"] = function_spec(HANDLER_SPECS[h][0], seed, disposable=True, min_warm=1,
                                                     max_workers=2, concurrency=1, **overrides)
    return functions


def measure_start(workdir: Path, n: int, warmup: int, gap_s: float, quiet_wait: float,
                  handlers: list[str]) -> dict[str, Any]:
    functions = start_functions(handlers)
    sup = Supervisor("start", workdir / "start", functions)
    out: dict[str, Any] = {"n": n, "warmup": warmup, "functions": {}}
    try:
        out["initialize_s"] = round(sup.initialize(), 3)
        # every function's first worker (and the seeds) must be up before the first measured start
        def first_ready() -> bool:
            sup.log.read()
            ready = {ln.get("function") for ln in sup.log.lines if ln.get("event") == "worker ready"}
            return set(functions) <= ready

        wait_until(first_ready, 30, "a first ready worker of every function")
        invoke = Invoker(sup.ca_port)
        per: dict[str, dict[str, Any]] = {f: {"start_ms": [], "modes": Counter(), "invoke_ms": [], "errors": Counter(),
                                              "request_to_ready_ms": [],
                                              "error_example": "", "missing": 0, "extra_ready": 0}
                                          for f in functions}
        out["quiet"] = wait_for_quiet([sup], quiet_wait, reaped=True)
        window = 0
        with CpuWatch([sup], reaped=True) as watch:
            for i in range(warmup + n):
                if i == warmup:
                    sup.log.read()
                    window = len(sup.log.lines)
                for fname in functions:
                    rec = per[fname]
                    sup.log.read()  # everything before this invocation is old news
                    wall0 = time.time()
                    t0 = time.perf_counter()
                    try:
                        status, data = invoke(fname)
                    except (OSError, http.client.HTTPException) as exc:
                        status, data = -1, repr(exc).encode()
                    took = (time.perf_counter() - t0) * 1000
                    if status != 200:
                        rec["errors"][str(status)] += 1
                        rec["error_example"] = rec["error_example"] or f"{status} {data[:200]!r}"
                    ready: list[dict[str, Any]] = []

                    def replaced(fname: str = fname, ready: list[dict[str, Any]] = ready) -> bool:
                        ready.extend(ln for ln in sup.log.read()
                                     if ln.get("event") == "worker ready" and ln.get("function") == fname)
                        return bool(ready)

                    try:
                        wait_until(replaced, 15, f"the replacement of a spent {fname} worker", interval=0.001)
                    except Deadline:
                        rec["missing"] += 1
                        continue
                    if i >= warmup:
                        rec["invoke_ms"].append(took)
                        rec["start_ms"].append(float(ready[0].get("start_ms", float("nan"))))
                        rec["modes"][str(ready[0].get("mode"))] += 1
                        rec["request_to_ready_ms"].append((log_epoch(ready[0]) - wall0) * 1000)
                        rec["extra_ready"] += len(ready) - 1
                    if gap_s:
                        time.sleep(gap_s)
        invoke.close()
        out["cpu"] = watch.result
        sup.log.read()
        exits: dict[str, Counter[str]] = {f: Counter() for f in functions}
        for ln in sup.log.lines[window:]:
            if ln.get("event") == "worker exited" and ln.get("function") in exits:
                exits[ln["function"]][str(ln.get("reason"))] += 1
        for fname, rec in per.items():
            values = sorted(rec["start_ms"])
            inv = sorted(rec["invoke_ms"])
            r2r = sorted(rec["request_to_ready_ms"])
            out["functions"][fname] = {
                "handler": fname.rsplit("-", 1)[0], "mode": fname.rsplit("-", 1)[1], "n": len(values),
                "p50_ms": pct(values, 50), "p99_ms": pct(values, 99),
                "mean_ms": statistics.fmean(values) if values else float("nan"),
                "min_ms": values[0] if values else float("nan"), "max_ms": values[-1] if values else float("nan"),
                "invoke_p50_ms": pct(inv, 50), "modes": dict(rec["modes"]), "exits": dict(exits[fname]),
                "r2r_p50_ms": pct(r2r, 50), "r2r_p99_ms": pct(r2r, 99), "r2r_max_ms": r2r[-1] if r2r else float("nan"), "errors": dict(rec["errors"]),
                "error_example": rec["error_example"], "missing": rec["missing"], "extra_ready": rec["extra_ready"],
            }
    finally:
        out["exit_code"] = sup.stop()
        out["killed"], out["leftovers"] = sup.killed, sup.leftovers
        out["log"] = sup.log_problems()
    return out


# ---------------------------------------------------------------------------
# 2. burst from idle
# ---------------------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, body
            body += chunk[:-2]
    return status, await reader.read()


async def _burst(port: int, function: str, count: int, timeout: float) -> dict[str, Any]:
    request = (f"POST /invoke HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"x-fc-function-name: {function}\r\nContent-Length: {len(BODY)}\r\n\r\n").encode() + BODY
    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(count)))
    await asyncio.sleep(0.05)  # let the server accept them all before the clock starts
    loop = asyncio.get_running_loop()
    done_at: list[float] = []
    results: Counter[str] = Counter()
    example = ""

    async def one(reader: asyncio.StreamReader) -> None:
        nonlocal example
        try:
            status, body = await asyncio.wait_for(_read_response(reader), timeout)
            results[str(status)] += 1
            if status != 200 and not example:
                example = f"{status} {body[:200]!r}"
        except Exception as exc:
            results[type(exc).__name__] += 1
            example = example or repr(exc)[:200]
        done_at.append(loop.time())

    t0 = loop.time()
    for _, writer in conns:
        writer.write(request)
    tasks = [asyncio.create_task(one(reader)) for reader, _ in conns]
    await asyncio.gather(*tasks)
    drain = max(done_at) - t0
    for _, writer in conns:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    lat = sorted((t - t0) * 1000 for t in done_at)
    return {"drain_s": drain, "p50_ms": pct(lat, 50), "max_ms": lat[-1], "answers": dict(results),
            "errors": sum(v for k, v in results.items() if k != "200"), "error_example": example}


def measure_burst(workdir: Path, rounds: int, quiet_wait: float) -> dict[str, Any]:
    functions = {f"burst-{mode}": function_spec("sleep100:handler", seed, min_warm=1,
                                                max_workers=BURST["max_workers"], concurrency=BURST["concurrency"],
                                                idle_ttl="1s")
                 for mode, seed in (("fork", True), ("spawn", False))}
    sup = Supervisor("burst", workdir / "burst", functions)
    out: dict[str, Any] = {"rounds": []}
    try:
        out["initialize_s"] = round(sup.initialize(), 3)
        for r in range(rounds):
            for mode in ("fork", "spawn"):
                fname = f"burst-{mode}"

                def settled() -> bool:
                    st = sup.status()
                    return all(len(sup.workers(st, f)) == 1 and sup.workers(st, f)[0]["state"] == "idle"
                               for f in functions)

                wait_until(settled, 60, "both pools back at min_warm = 1, idle", interval=0.25)
                quiet = wait_for_quiet([sup], quiet_wait, reaped=True)
                before = sup.starts(fname)
                sup.log.read()
                with CpuWatch([sup], reaped=True) as watch:
                    res = asyncio.run(_burst(sup.ca_port, fname, BURST["requests"], 30.0))
                ready_in = [ln for ln in sup.log.read() if ln.get("event") == "worker ready" and ln.get("function") == fname]
                after = sup.starts(fname)
                time.sleep(1.0)  # late starters: ready after the drain (they only cost)
                late = [ln for ln in sup.log.read() if ln.get("event") == "worker ready" and ln.get("function") == fname]
                later = sup.starts(fname)
                starts = {m: after[m] - before[m] for m in after if after[m] - before[m]}
                ms = sorted(float(ln.get("start_ms", float("nan"))) for ln in ready_in)
                res.update({"mode": mode, "round": r + 1, "starts": starts, "started": sum(starts.values()),
                            "started_after_drain": sum(later.values()) - sum(after.values()),
                            "ready_by_drain": len(ready_in), "ready_after_drain": len(late),
                            "start_p50_ms": pct(ms, 50), "start_max_ms": ms[-1] if ms else float("nan"),
                            "cpu": watch.result, "quiet": quiet})
                out["rounds"].append(res)
                say(f"  burst {mode} round {r + 1}: drain {res['drain_s']:.3f}s, {res['started']} started, "
                    f"{res['errors']} errors")
    finally:
        out["exit_code"] = sup.stop()
        out["killed"], out["leftovers"] = sup.killed, sup.leftovers
        out["log"] = sup.log_problems()
    return out


# ---------------------------------------------------------------------------
# 3. idle memory (PSS)
# ---------------------------------------------------------------------------


def tree_pss(sup: Supervisor, function: str) -> dict[str, Any]:
    """PSS of every process of the tree, by role (from status: components and workers)."""
    st = sup.status()
    roles = {int(c["pid"]): c["name"] for c in st["components"] if c.get("pid")}
    for w in sup.workers(st, function):
        roles[int(w["pid"])] = "worker"
    roles[sup.pid] = "supervisor"
    by_role: Counter[str] = Counter()
    workers: list[int] = []
    for proc in sup.snapshot():
        try:
            pss = proc.memory_full_info().pss
        except psutil.Error:
            continue
        role = roles.get(proc.pid, "other")
        if role.startswith("seed:"):
            role = "seed"
        by_role[role] += pss
        if role == "worker":
            workers.append(pss)
    return {"by_role": dict(by_role), "total": sum(by_role.values()), "workers": sorted(workers)}


def measure_memory(workdir: Path, handler: str, mode: str, ks: list[int], settle_s: float) -> dict[str, Any]:
    fname = f"{handler}-{mode}"
    spec = function_spec(HANDLER_SPECS[handler][0], mode == "fork", min_warm=1, max_workers=max(ks) + 1,
                         concurrency=1, idle_ttl="10m")
    sup = Supervisor(f"pss-{fname}", workdir / f"pss-{fname}", {fname: spec})
    out: dict[str, Any] = {"handler": handler, "mode": mode, "steps": []}
    try:
        sup.initialize()
        for k in ks:
            if k != 1:
                sup.scale(fname, k)

            def at_k(k: int = k) -> bool:
                ws = sup.workers(sup.status(), fname)
                return len(ws) == k and all(w["state"] == "idle" for w in ws)

            wait_until(at_k, 60, f"{fname}: {k} idle workers", interval=0.2)
            time.sleep(settle_s)
            step = tree_pss(sup, fname)
            step["k"] = k
            step["modes"] = dict(sup.starts(fname))
            out["steps"].append(step)
    finally:
        out["exit_code"] = sup.stop()
        out["killed"], out["leftovers"] = sup.killed, sup.leftovers
        out["log"] = sup.log_problems()
    return out


# ---------------------------------------------------------------------------
# machine and report
# ---------------------------------------------------------------------------


def describe_machine() -> dict[str, Any]:
    return common.machine(("ca-supervisor", "pydantic", "orjson", "psutil"),
                          python=common.run_text([PYTHON, "-c", "import platform; print(platform.python_version())"]))


def import_cost_ms(handler: str, runs: int = 3) -> float:
    """Median wall time of a fresh interpreter importing the handler, minus an empty one."""
    def wall(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([PYTHON, "-c", code], cwd=str(HANDLERS), check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        return time.perf_counter() - t0

    module = HANDLER_SPECS[handler][0].split(":")[0]
    full = statistics.median(wall(f"import {module}") for _ in range(runs))
    empty = statistics.median(wall("pass") for _ in range(runs))
    return (full - empty) * 1000


def f1(x: float, digits: int = 1) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def mib(b: float) -> str:
    return f"{b / MIB:.1f}"


def render(r: dict[str, Any]) -> str:
    out: list[str] = []
    w = out.append
    m = r["machine"]
    o = r["options"]
    w("## Pools: new workers, burst from idle, idle memory\n")
    w(f"Generated by `.venv/bin/python bench/pools.py{' --quick' if o['quick'] else ''}` (with `--write` it "
      "replaces this section, between its markers). Fork (`seed = true`) and spawn (`seed = false`) are measured "
      "side by side in the same run, each against a real `supervisor run`.\n")
    if o["quick"]:
        w("**Smoke run (`--quick`): small counts; not a measurement to quote.**\n")
    w(f"- Machine: {m['nproc']} CPUs (nproc; affinity {m['affinity']}), {m['cpu_model']}, {m['memory']} RAM; "
      f"kernel {m['kernel']}, Python {m['python']}")
    w(f"- ca-supervisor {m['versions'].get('ca-supervisor')} commit {m['git']}; "
      + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if k != "ca-supervisor") + f"; run {m['date_utc']}")
    w("- Handlers: " + "; ".join(f"**{h}** = {HANDLER_SPECS[h][1]} (import: {f1(r['import_ms'].get(h, float('nan')), 0)} ms "
                                f"in a fresh interpreter)" for h in o["handlers"]))
    w("")

    targets: list[tuple[str, str, str, str]] = []

    if "start" in r:
        s = r["start"]
        w("### New worker ready (scale-out)\n")
        w(f"One supervisor, one `disposable = true`, `min_warm = 1`, `concurrency = 1` function per handler and "
          f"mode. {s['n']} sequential invocations per function (after {s['warmup']} warm-up ones), round-robin "
          "over the functions; each waits until the previous one's replacement is ready, so every start runs on "
          "an otherwise idle supervisor. `start_ms` is the control plane's own figure from its `worker ready` log "
          "line: decision to start -> initialized and connected to the data plane. Request -> ready: from just "
          "before the invocation was sent to the timestamp of its replacement's `worker ready` line (same wall "
          "clock; includes the invocation itself and any delay before the control plane decided to start). "
          "Exits: how the spent workers ended, from `worker exited` lines. Anchors (docs/performance.md): Noslate's Node.js "
          "worker 182 ms; a fresh Python with the stack ~135 ms.\n")
        w("| handler | mode | n | start p50 ms | p99 ms | mean ms | min ms | max ms | request -> ready p50 / p99 / max ms "
          "| modes seen | exits | non-200 | invoke p50 ms |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for x in s["functions"].values():
            errors = sum(x["errors"].values())
            w(f"| {x['handler']} | {x['mode']} | {x['n']} | **{f1(x['p50_ms'], 2)}** | {f1(x['p99_ms'], 2)} | "
              f"{f1(x['mean_ms'], 2)} | {f1(x['min_ms'], 2)} | {f1(x['max_ms'], 2)} | "
              f"{f1(x['r2r_p50_ms'], 1)} / {f1(x['r2r_p99_ms'], 1)} / {f1(x['r2r_max_ms'], 1)} | "
              + ", ".join(f"{k} {v}" for k, v in x["modes"].items()) + " | "
              + ", ".join(f"{k} {v}" for k, v in sorted(x["exits"].items(), key=lambda kv: -kv[1]))
              + f" | {errors} | {f1(x['invoke_p50_ms'], 2)} |")
        fns = s["functions"]
        for h in o["handlers"]:
            fk, sp = fns.get(f"{h}-fork"), fns.get(f"{h}-spawn")
            if fk and sp and fk["p50_ms"] == fk["p50_ms"] and fk["p50_ms"] > 0:
                w(f"\n{h}: spawn / fork = {sp['p50_ms'] / fk['p50_ms']:.1f} x at p50, {sp['p99_ms'] / fk['p99_ms']:.1f} x at p99.")
        c = s.get("cpu", {})
        if c:
            w(f"\nCPU during the test: supervisor tree {c['target_cores']} cores, this client {c['client_cores']}, "
              f"other processes {c['other_pct']} % of the machine; 1-min load average before: {c['loadavg1_before']}.")
        w("")
        for h in o["handlers"]:
            fk = fns.get(f"{h}-fork")
            if fk:
                targets.append((f"new worker ready via the seed ({h} handler), p50", f"<= {GOALS['fork_p50_ms']:.0f} ms",
                                f"{f1(fk['p50_ms'], 2)} ms (p99 {f1(fk['p99_ms'], 2)})",
                                verdict(fk["p50_ms"] <= GOALS["fork_p50_ms"] and fk["n"] > 0)))

    if "burst" in r:
        b = r["burst"]
        w("### Burst from idle\n")
        w(f"`min_warm = 1`, `max_workers = {BURST['max_workers']}`, `concurrency = {BURST['concurrency']}`, an async "
          f"handler that sleeps {BURST_SLEEP_S * 1000:.0f} ms (bench/handlers/sleep100.py). {BURST['requests']} "
          f"invocations sent at once over {BURST['requests']} connections opened beforehand; drain = first request "
          "written -> last answer read. Lower bound had all "
          f"{BURST['max_workers']} x {BURST['concurrency']} slots been warm: **{BURST_LOWER_S:.3f} s**. Workers started: "
          "`supervisor_worker_starts_total` during the burst (by mode); ready by drain: `worker ready` lines "
          "logged by then, with their `start_ms`.\n")
        w("| mode | round | drain s | answer p50 ms | answer max ms | workers started | ready by drain | "
          "start_ms p50 / max | ready after drain | non-200 / failed | other CPU % |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for x in b["rounds"]:
            started = f"{x['started']}" + (f" ({', '.join(f'{k} {v}' for k, v in x['starts'].items())})"
                                           if set(x["starts"]) - {x["mode"]} else "")
            w(f"| {x['mode']} | {x['round']} | **{x['drain_s']:.3f}** | {f1(x['p50_ms'], 0)} | {f1(x['max_ms'], 0)} | "
              f"{started} | {x['ready_by_drain']} | {f1(x['start_p50_ms'], 1)} / {f1(x['start_max_ms'], 1)} | "
              f"{x['ready_after_drain']} | {x['errors']} | {x['cpu'].get('other_pct', '-')} |")
        for mode in ("fork", "spawn"):
            drains = sorted(x["drain_s"] for x in b["rounds"] if x["mode"] == mode)
            if drains:
                w(f"\n{mode}: median drain {statistics.median(drains):.3f} s over {len(drains)} round(s) "
                  f"({statistics.median(drains) / BURST_LOWER_S:.1f} x the lower bound).")
        w("")

    if "memory" in r:
        w("### Idle memory (PSS)\n")
        ks = o["ks"]
        w("PSS from /proc/PID/smaps_rollup (psutil `memory_full_info().pss`) of every process of the tree, one "
          "function, all workers idle and initialized (none has served yet), measured "
          f"{o['settle_s']:.1f} s after the pool reached K workers (`supervisor scale FN --min-warm K`). "
          "Planes = `supervisor run` + control plane + data plane. Per extra worker = growth of the whole tree's "
          f"PSS from K={ks[0]} to K={ks[-1]}, divided by {ks[-1] - ks[0]} (what one more worker really costs: "
          "the seed's share shrinks as more workers share its pages).\n")
        head = " | ".join(f"tree K={k} MiB" for k in ks)
        w(f"| handler | mode | planes MiB | seed MiB (K={ks[0]} / K={ks[-1]}) | first worker MiB | {head} | per extra worker MiB | "
          f"worker PSS at K={ks[-1]} (min-max) MiB |")
        w("|---|---|---|---|---|" + "---|" * len(ks) + "---|---|")
        for x in r["memory"]:
            steps = x["steps"]
            if not steps:
                continue
            first = steps[0]["by_role"]
            planes = sum(first.get(k, 0) for k in ("supervisor", "control-plane", "data-plane"))
            per = (steps[-1]["total"] - steps[0]["total"]) / max(1, steps[-1]["k"] - steps[0]["k"])
            x["planes"], x["per_worker"] = planes, per
            last_w = steps[-1]["workers"]
            seed = (f"{mib(first['seed'])} / {mib(steps[-1]['by_role'].get('seed', 0))}" if "seed" in first else "-")
            w(f"| {x['handler']} | {x['mode']} | {mib(planes)} | {seed} | "
              f"{mib(first.get('worker', 0))} | " + " | ".join(mib(st["total"]) for st in steps)
              + f" | **{mib(per)}** | {mib(last_w[0]) if last_w else '-'}-{mib(last_w[-1]) if last_w else '-'} |")
        one = r["memory"][0]["steps"][0]["by_role"] if r["memory"] and r["memory"][0]["steps"] else {}
        if one:
            w("\nPlanes by process (first row, K=1): " + ", ".join(
                f"{k} {mib(one.get(k, 0))} MiB" for k in ("supervisor", "control-plane", "data-plane")) + ".")
        w("")
        planes = [x["planes"] for x in r["memory"] if "planes" in x]
        if planes:
            targets.append(("supervisor + planes idle PSS", f"<= {GOALS['planes_mib']:.0f} MiB",
                            " / ".join(f"{mib(p)}" for p in planes) + " MiB (rows above)",
                            verdict(max(planes) <= GOALS["planes_mib"] * MIB)))
        for x in r["memory"]:
            if x["mode"] == "fork" and "per_worker" in x:
                targets.append((f"each extra forked worker ({x['handler']} handler), PSS",
                                f"<= {GOALS['fork_worker_mib']:.0f} MiB", f"{mib(x['per_worker'])} MiB",
                                verdict(x["per_worker"] <= GOALS["fork_worker_mib"] * MIB)))

    if targets:
        w("### Against the targets (docs/performance.md)\n")
        w("| target | goal | measured | verdict |")
        w("|---|---|---|---|")
        for t in targets:
            w("| " + " | ".join(t) + " |")
        w("")

    w("### Checks and noise\n")
    notes = r.get("anomalies", [])
    if notes:
        w("Found during this run:\n")
        for n in notes:
            w(f"- {n}")
    else:
        w("No errors: every invocation answered 200, every start was in the expected mode, every supervisor "
          "exited 0 on SIGTERM with nothing left behind, no warning or error in their logs.")
    quiet = r.get("quiet", [])
    if quiet:
        not_quiet = sum(1 for q in quiet if not q["quiet"])
        w(f"\nBefore each test the script waited (up to {o['quiet_wait']:.0f} s) for a second in which other "
          f"processes used < 0.25 cores; {not_quiet} of {len(quiet)} tests started without one. "
          f"The machine is shared with other work, so treat spreads between rounds as noise.")
    w(f"\nRun took {r['elapsed_s']:.0f} s.")
    return "\n".join(out).rstrip() + "\n"


def check(r: dict[str, Any]) -> list[str]:
    """Everything that is not as it should be, in words."""
    notes: list[str] = []
    parts = [("start", r.get("start"))] + [("burst", r.get("burst"))] + \
            [(f"memory {x['handler']}-{x['mode']}", x) for x in r.get("memory", [])]
    for name, part in parts:
        if not part:
            continue
        if part.get("exit_code") not in (0, None):
            notes.append(f"{name}: the supervisor exited {part['exit_code']} on SIGTERM")
        if part.get("killed"):
            notes.append(f"{name}: the supervisor did not stop within the deadline; its group was killed")
        if part.get("leftovers"):
            notes.append(f"{name}: processes left after the supervisor exited: {part['leftovers']}")
        for key, (count, example) in part.get("log", {}).get("lines", {}).items():
            notes.append(f"{name}: {count} x log line `{key}`, e.g. `{example[:200]}`")
        if part.get("log", {}).get("stderr_tail", "").strip():
            notes.append(f"{name}: stderr not empty: `{part['log']['stderr_tail'][-300:]}`")
    for fname, x in (r.get("start") or {}).get("functions", {}).items():
        if x["errors"]:
            notes.append(f"start {fname}: non-200 answers {x['errors']}, e.g. {x['error_example']}")
        if x["missing"]:
            notes.append(f"start {fname}: {x['missing']} invocation(s) with no replacement ready within 15 s")
        if x["extra_ready"]:
            notes.append(f"start {fname}: {x['extra_ready']} more worker(s) became ready than invocations spent")
        if set(x["modes"]) - {x["mode"]}:
            notes.append(f"start {fname}: workers started as {x['modes']}, expected only {x['mode']}")
        odd = {k: v for k, v in x["exits"].items() if k != "disposable"}
        if odd:
            notes.append(f"start {fname}: {sum(odd.values())} of {sum(x['exits'].values())} spent workers ended as "
                         f"{odd}, not `disposable`; their replacement waited (request -> ready max "
                         f"{x['r2r_max_ms']:.0f} ms vs start_ms max {x['max_ms']:.0f} ms)")
    fns = (r.get("start") or {}).get("functions", {})
    for h in r["options"]["handlers"]:
        fk, sp = fns.get(f"{h}-fork"), fns.get(f"{h}-spawn")
        if fk and sp and fk["n"] and sp["n"] and fk["p50_ms"] >= 0.5 * sp["p50_ms"]:
            notes.append(f"start {h}: fork p50 {fk['p50_ms']:.1f} ms is not well below spawn p50 {sp['p50_ms']:.1f} ms")
    for x in (r.get("burst") or {}).get("rounds", []):
        if x["errors"]:
            notes.append(f"burst {x['mode']} round {x['round']}: {x['errors']} of {BURST['requests']} not 200: "
                         f"{x['answers']}, e.g. {x['error_example']}")
        if set(x["starts"]) - {x["mode"]}:
            notes.append(f"burst {x['mode']} round {x['round']}: workers started as {x['starts']}")
        if x["started_after_drain"]:
            notes.append(f"burst {x['mode']} round {x['round']}: {x['started_after_drain']} worker(s) started "
                         "after the burst had drained")
    for x in r.get("memory", []):
        for st in x["steps"]:
            if "other" in st["by_role"]:
                notes.append(f"memory {x['handler']}-{x['mode']} K={st['k']}: processes of unknown role in the tree "
                             f"({mib(st['by_role']['other'])} MiB)")
            if set(st.get("modes", {})) - {x["mode"]}:
                notes.append(f"memory {x['handler']}-{x['mode']} K={st['k']}: workers started as {st['modes']}")
    for e in r.get("failures", []):
        notes.append(f"**failed**: {e}")
    return notes


def write_section(section: str, path: Path = RESULTS, start: str = START_MARK, end: str = END_MARK) -> str:
    """Replaces the block between the markers in RESULTS.md, or appends it. Returns what was done."""
    block = f"{start}\n{section.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text and text.index(start) < text.index(end):
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        path.write_text(before + block.rstrip("\n") + after)
        return "replaced"
    path.write_text(text.rstrip("\n") + ("\n\n" if text.strip() else "") + block)
    return "appended"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: N=20, 1 burst round, short waits")
    ap.add_argument("--write", action="store_true", help=f"put the section into {RESULTS.relative_to(ROOT)}")
    ap.add_argument("--only", default="start,burst,memory", help="a subset of start,burst,memory")
    ap.add_argument("-n", type=int, help="starts measured per function (default 200; --quick 20)")
    ap.add_argument("--warmup", type=int, help="starts not counted per function (default 5; --quick 2)")
    ap.add_argument("--rounds", type=int, help="burst rounds per mode (default 3; --quick 1)")
    ap.add_argument("--handlers", default="trivial,imports", help="start/memory handlers: trivial,imports")
    ap.add_argument("--ks", default="1,5,9", help="pool sizes for the PSS steps (default 1,5,9)")
    ap.add_argument("--gap", type=float, default=0.005, help="pause after each replacement is ready, s")
    ap.add_argument("--quiet-wait", type=float, help="max wait for a quiet second before each test, s (default 5; --quick 1)")
    ap.add_argument("--settle", type=float, help="wait before reading PSS, s (default 1.0; --quick 0.5)")
    ap.add_argument("--results", metavar="PATH", default=str(RESULTS), help="the file --write edits (default: %(default)s)")
    ap.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = ap.parse_args(argv)
    quick = args.quick
    n = args.n if args.n is not None else (20 if quick else 200)
    warmup = args.warmup if args.warmup is not None else (2 if quick else 5)
    rounds = args.rounds if args.rounds is not None else (1 if quick else 3)
    quiet_wait = args.quiet_wait if args.quiet_wait is not None else (1.0 if quick else 5.0)
    settle = args.settle if args.settle is not None else (0.5 if quick else 1.0)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    handlers = [h.strip() for h in args.handlers.split(",") if h.strip()]
    ks = sorted({int(k) for k in args.ks.split(",")})
    if unknown := (only - {"start", "burst", "memory"}) | (set(handlers) - set(HANDLER_SPECS)):
        ap.error(f"unknown: {', '.join(sorted(unknown))}")
    if len(ks) < 2 or ks[0] < 1:
        ap.error("--ks needs at least two pool sizes >= 1")

    common.clean_up_on_exit((signal.SIGTERM, signal.SIGHUP))

    t0 = time.monotonic()
    r: dict[str, Any] = {"machine": describe_machine(), "failures": [], "quiet": [],
                         "options": {"quick": quick, "n": n, "warmup": warmup, "rounds": rounds, "handlers": handlers,
                                     "ks": ks, "gap_s": args.gap, "quiet_wait": quiet_wait, "settle_s": settle}}
    r["import_ms"] = {h: import_cost_ms(h) for h in handlers}
    work = Path(tempfile.mkdtemp(prefix="ca-supervisor-pools-"))
    say(f"work dir {work}")
    try:
        if "start" in only:
            t1 = time.monotonic()
            say(f"start: {n} starts (+{warmup} warm-up) per function: {', '.join(handlers)} x fork, spawn ...")
            try:
                r["start"] = measure_start(work, n, warmup, args.gap, quiet_wait, handlers)
                r["quiet"].append(r["start"].get("quiet", {"quiet": True}))
                for fname, x in r["start"]["functions"].items():
                    say(f"  {fname}: p50 {x['p50_ms']:.2f} ms, p99 {x['p99_ms']:.2f} ms, n {x['n']}, modes {x['modes']}")
                say(f"  ({time.monotonic() - t1:.0f} s)")
            except (Deadline, RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
                r["failures"].append(f"start: {exc}")
                say(f"  start failed: {exc}")
        if "burst" in only:
            t1 = time.monotonic()
            say(f"burst: {BURST['requests']} at once, {rounds} round(s) per mode ...")
            try:
                r["burst"] = measure_burst(work, rounds, quiet_wait)
                r["quiet"] += [x["quiet"] for x in r["burst"]["rounds"]]
                say(f"  ({time.monotonic() - t1:.0f} s)")
            except (Deadline, RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
                r["failures"].append(f"burst: {exc}")
                say(f"  burst failed: {exc}")
        if "memory" in only:
            r["memory"] = []
            for h in handlers:
                for mode in ("fork", "spawn"):
                    say(f"memory: {h} {mode}, K = {ks} ...")
                    t1 = time.monotonic()
                    try:
                        x = measure_memory(work, h, mode, ks, settle)
                        r["memory"].append(x)
                        say("  totals MiB: " + ", ".join(f"K={st['k']} {mib(st['total'])}" for st in x["steps"])
                            + f" ({time.monotonic() - t1:.0f} s)")
                    except (Deadline, RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
                        r["failures"].append(f"memory {h} {mode}: {exc}")
                        say(f"  memory {h} {mode} failed: {exc}")
    except KeyboardInterrupt:
        say("interrupted: stopping everything")
        common.cleanup_all()
        return 130
    finally:
        common.cleanup_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"kept {work}")
    r["elapsed_s"] = time.monotonic() - t0
    r["anomalies"] = check(r)
    say(f"done in {r['elapsed_s']:.0f} s; " + (f"{len(r['anomalies'])} finding(s), see 'Checks'" if r["anomalies"] else "no findings"))
    section = render(r)
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1, default=str))
    if args.write:
        what = write_section(section, Path(args.results))
        say(f"{what} the pools section in {args.results}")
    if r["failures"]:
        return 1
    start_errors = sum(sum(x["errors"].values()) for x in (r.get("start") or {}).get("functions", {}).values())
    burst_errors = sum(x["errors"] for x in (r.get("burst") or {}).get("rounds", []))
    return 3 if start_errors or burst_errors else 0


if __name__ == "__main__":
    sys.exit(main())
