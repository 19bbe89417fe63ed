#!/usr/bin/env python3
"""Chaos and soak: ``kill -9`` each kind of component under steady load; memory and fds under a long one.

    .venv/bin/python bench/chaos.py                     # 10 kills of each kind, then a 600 s soak
    .venv/bin/python bench/chaos.py --quick             # smoke run: 2 kills of each kind, a 20 s soak
    .venv/bin/python bench/chaos.py --kills 10 --soak 0 --write     # the kills only, into RESULTS.md
    .venv/bin/python bench/chaos.py --kills 0 --soak 600 --write    # the soak only, into RESULTS.md

``--write`` puts each part into bench/RESULTS.md between ``<!-- chaos-kills:start/end -->`` and
``<!-- chaos-soak:start/end -->`` (appended when absent; bench/run.py carries both over) and under
``"chaos"`` in bench/results.json (``kills`` and ``soak``; bench/run.py keeps that key too). ``--tag after``
writes ``chaos-kills-after`` / ``kills-after`` instead, leaving the untagged ("before") sections alone.

What runs: ``supervisor run`` (bench/pools.py's ``Supervisor``: JSON logs, its own ports, its run_dir
under a work dir in /var/tmp) with one Python event function, bench/handlers/trivial.py, ``min_warm =
2``, ``max_workers = 4``, ``concurrency = 1`` (bench/run.py's C2 shape, with room to grow), forked from
its seed. The code measured is a commit (``--at``, default HEAD), exported with ``git archive`` into
the work dir and put first on PYTHONPATH (with PYTHONSAFEPATH, so no cwd shadows it): the figures
belong to that commit, whatever else is half-edited in the work tree. ``--at .`` runs the work tree.

The load: bench/loadgen.py in a process of its own, ``--connections`` 8 keep-alive connections, each
request with a deadline, reconnecting after any failure. wrk cannot tell a refused connection from
one that broke, nor say when each failure happened or which ``errorType`` it carried: loadgen
records every request's outcome (ok, ``http STATUS errorType``, refused, reset, closed, timeout) with
its start and end on the machine's monotonic clock, the one this script stamps its kills with.

1. kills  Rounds of one ``kill -9`` of each kind: ``worker``, ``seed``, ``data-plane``,
          ``control-plane``, under a closed loop (``--rate`` 0: the next request as soon as the answer
          is read, so the pool runs at max_workers). Before each kill the system must be steady
          (every component running, ``supervisor_capacity_slots`` at max_workers x concurrency and
          the control plane's ready workers agreeing, for ``--settle`` seconds on end) and the
          victim old enough: a plane or seed up for ``--min-uptime`` (31 s: a run of 30 s resets the
          supervisor's restart backoff, so every kill is a first crash, restarted at once, and 10
          kills never reach the flapping limit), a worker up for 2 s (``EARLY_CRASH_S`` is 1 s: this
          measures crashes while serving). The victim's pid comes from ``supervisor status --json``
          (a worker: one of the function's ready workers at random, ``--seed``); it is checked to
          carry this run's tag before SIGKILL. Then every ``--poll`` s (20 ms) one metrics scrape
          and one GetStatus (in-process, the same call and document as ``supervisor status``) until
          it is back to full capacity, with a deadline (``--recovery-deadline``).

          Per kill:
          - failed: requests whose failure ended between this kill and the next, by outcome;
            ``refused`` and ``reset``/``closed`` are connections, the ``http ...`` ones answers.
          - replaced: the killed component has a successor (a plane or seed ``running`` under a
            new pid, the seed also ``supervisor_seed_ready`` 1; a worker: gone from the status and
            as many ready workers as before).
          - full capacity: replaced, and ``supervisor_capacity_slots`` (the data plane's count of
            connected ready slots) and the control plane's ready workers back to their pre-kill
            values. To within one poll (~20-40 ms on a loaded machine).
          - back: full capacity and invocations succeeding again: the later of full capacity and
            the first ok answer to a request that started after the last failure.
          - no-answer gap: the longest time without a single ok answer from the kill until full
            capacity + 1 s (the 8 connections share it; it shows stalls that fail nothing).
          - reaped: the killed pid is no zombie 5 s later.

2. soak   A new supervisor, paced load (``--soak-rate``, 500 req/s over the 8 connections), a
          warm-up (``--soak-warmup``, 30 s) and then ``--soak`` seconds. RSS and open fds of every
          process (the supervisor, both planes, the seed, each worker; pids from GetStatus, read with
          psutil) at the start (after the warm-up), every ``--soak`` / 10 s and at the end. Pass:
          RSS grew under 5 % and fds did not grow, for every process alive at both ends; a process
          replaced meanwhile is listed. fds are the smallest of 3 reads 0.2 s apart (a metrics
          scrape or status call in progress adds one for a moment).

Every wait has a deadline. Every process started here (the supervisor, whose SIGTERM stops its
planes and workers; the load client) lives in its own session and is stopped at the end, also on
error and Ctrl-C/SIGTERM (bench/common.py), and any process still carrying this run's tag is killed
and reported. The Markdown goes to stdout (progress to stderr). Exit status: 0 done, 1 a part could
not run, 3 done but the soak failed a check or a kill did not recover.
"""

from __future__ import annotations

import argparse
import bisect
import http.client
import importlib
import io
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import pools
import psutil
import run
from common import BENCH, ROOT, Managed, say
from prometheus_client.parser import text_string_to_metric_families

common.say_to(sys.stderr)  # stdout is for the Markdown

RESULTS = BENCH / "RESULTS.md"
MARKS = {"kills": ("<!-- chaos-kills:start -->", "<!-- chaos-kills:end -->"),
         "soak": ("<!-- chaos-soak:start -->", "<!-- chaos-soak:end -->")}
FUNCTION = "trivial"
SHAPE = {"min_warm": 2, "max_workers": 4, "concurrency": 1}
KINDS = ("worker", "seed", "data-plane", "control-plane")
COMPONENT = {"seed": f"seed:{FUNCTION}", "data-plane": "data-plane", "control-plane": "control-plane"}
READY_STATES = ("idle", "busy")
MIN_WORKER_AGE_S = 2.0  # > EARLY_CRASH_S (supervisor/control/manager.py): a crash while serving
RSS_GROWTH_MAX = 0.05
MIB = 1 << 20


class Abort(Exception):
    """The run cannot go on (the supervisor exited, the load client died)."""


# ---------------------------------------------------------------------------
# the code measured, the supervisor, the load
# ---------------------------------------------------------------------------



def wind_up(sup: Any, load: Any, out: dict[str, Any]) -> dict[str, Any]:
    """Stops the load and the supervisor of a part (kills or soak) and notes how they
    ended in ``out``; returns the load's records (empty when there was none)."""
    records: dict[str, Any] = {}
    if load is not None:
        try:
            records = load.stop()
        except Abort as exc:
            out["failures"].append(str(exc))
    out["exit_code"] = sup.stop()
    out["killed_at_stop"], out["leftovers"] = sup.killed, sup.leftovers
    out["log"] = run.analyse_log(sup.log_path)
    out["stderr"] = run.stderr_of(sup.dir)
    return records

def use_source(at: str, work: Path) -> dict[str, Any]:
    """Exports commit `at` (supervisor/ and worker/) into work/src and makes every process started from
    now on import it; `.` keeps the work tree. Returns what is measured."""
    if at == ".":
        m = common.machine(())
        return {"src": str(ROOT), "commit": m["git"], "exported": False}
    full = common.run_text(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{at}^{{commit}}"])
    if not full:
        raise SystemExit(f"--at {at}: not a commit of {ROOT}")
    done = subprocess.run(["git", "-C", str(ROOT), "archive", full, "supervisor", "worker"],
                          capture_output=True, timeout=120, check=True, stdin=subprocess.DEVNULL)
    src = work / "src"
    src.mkdir()
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        tar.extractall(src, filter="data")
    os.chmod(work, 0o755)  # workers run as another user and import from here
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p)
    os.environ["PYTHONSAFEPATH"] = "1"  # `python -m supervisor.cli` from ROOT must not import ROOT's copy
    where = subprocess.run([pools.PYTHON, "-c", "import supervisor, worker; print(supervisor.__file__, worker.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=str(ROOT), stdin=subprocess.DEVNULL)
    if not all(p.startswith(str(src)) for p in where.stdout.split()) or len(where.stdout.split()) != 2:
        raise SystemExit(f"the exported source is not what a child imports: {where.stdout or where.stderr}")
    subject = common.run_text(["git", "-C", str(ROOT), "log", "-1", "--format=%s", full])
    return {"src": str(src), "commit": full[:7], "commit_full": full, "subject": subject, "exported": True}


def start_supervisor(name: str, workdir: Path) -> pools.Supervisor:
    spec = pools.function_spec(pools.HANDLER_SPECS["trivial"][0], True, **SHAPE)
    sup = pools.Supervisor(name, workdir, {FUNCTION: spec})
    sup.initialize()
    return sup


class LoadClient:
    """bench/loadgen.py as a managed process; a thread keeps its progress lines (and the pipe drained)."""

    def __init__(self, port: int, out: Path, connections: int, rate: float) -> None:
        self.out = out
        argv = [pools.PYTHON, str(BENCH / "loadgen.py"), "--port", str(port), "--connections", str(connections),
                "--rate", str(rate), "--out", str(out)]
        self.proc = Managed("load", argv, stdout=subprocess.PIPE, stderr=open(f"{out}.stderr", "wb"))
        self.last: dict[str, Any] = {}
        self.done: dict[str, Any] = {}
        self.reader = threading.Thread(target=self._read, name="loadgen-stdout", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.popen.stdout is not None
        for raw in self.proc.popen.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if line.get("done"):
                self.done = line
            else:
                self.last = line

    def wait_serving(self, timeout: float = 30.0) -> None:
        def serving() -> bool:
            if not self.proc.alive():
                raise Abort(f"the load client exited {self.proc.popen.returncode}: {common.tail(Path(f'{self.out}.stderr'))}")
            return int(self.last.get("ok", 0)) >= 8

        pools.wait_until(serving, timeout, "the load client's first answers")

    def check(self) -> None:
        if not self.proc.alive():
            raise Abort(f"the load client exited {self.proc.popen.returncode}: {common.tail(Path(f'{self.out}.stderr'))}")

    def stop(self) -> dict[str, Any]:
        """Stops it; its records: failures [(start, end, outcome, fresh)], ok starts and ends, summary."""
        code = self.proc.stop(grace=15)
        self.reader.join(timeout=5)
        try:
            data: dict[str, Any] = json.loads(Path(f"{self.out}.json").read_text())
            ok = array_of(Path(f"{self.out}.ok").read_bytes())
        except (OSError, ValueError) as exc:
            raise Abort(f"the load client left no records (exit {code}): {exc}; "
                        f"{common.tail(Path(f'{self.out}.stderr'))}") from None
        data["ok_starts"], data["ok_ends"] = ok[0::2], ok[1::2]
        data["exit_code"] = code
        return data


def array_of(raw: bytes) -> Any:
    import array
    out = array.array("d")
    out.frombytes(raw)
    return out


# ---------------------------------------------------------------------------
# looking at it: one metrics scrape and one GetStatus
# ---------------------------------------------------------------------------


@dataclass
class Snapshot:
    t: float
    capacity: float | None = None  # supervisor_capacity_slots{function}; None: the metrics port did not answer
    seed_ready: float | None = None
    doc: dict[str, Any] = field(default_factory=dict)  # status_document (planes from supervisor.json)
    answered: bool = False  # the control plane answered GetStatus

    def component(self, name: str) -> dict[str, Any] | None:
        return next((c for c in self.doc.get("components", []) if c.get("name") == name), None)

    def workers(self) -> list[dict[str, Any]]:
        for fn in self.doc.get("functions", []):
            if fn.get("name") == FUNCTION:
                return list(fn.get("workers", []))
        return []

    def ready_workers(self) -> list[dict[str, Any]]:
        return [w for w in self.workers() if w.get("state") in READY_STATES]


class Probe:
    """What `supervisor status --json` and the metrics port say, cheaply enough to ask every 20 ms.

    GetStatus is called in-process (supervisor.cli.fetch_status and status_document, the code the
    command runs, from the source measured) instead of starting a Python process per look.
    """

    def __init__(self, sup: pools.Supervisor, src: str) -> None:
        if src not in sys.path:
            sys.path.insert(0, src)
        self.cli = importlib.import_module("supervisor.cli")
        runstate = importlib.import_module("supervisor.runstate")
        self.read_state = runstate.read_state
        self.paths = runstate.RunPaths(sup.run_dir)
        self.sup = sup

    def metrics(self, timeout: float) -> tuple[float | None, float | None]:
        conn = http.client.HTTPConnection("127.0.0.1", self.sup.metrics_port, timeout=timeout)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            text = resp.read().decode(errors="replace")
            if resp.status != 200:
                return None, None
        except (OSError, http.client.HTTPException):
            return None, None
        finally:
            conn.close()
        capacity = seed_ready = None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("function") != FUNCTION:
                    continue
                if sample.name == "supervisor_capacity_slots":
                    capacity = sample.value
                elif sample.name == "supervisor_seed_ready":
                    seed_ready = sample.value
        return capacity, seed_ready

    def status(self, timeout: float) -> tuple[dict[str, Any], bool]:
        state = self.read_state(self.paths)
        try:
            reply = self.cli.fetch_status(self.paths, timeout_s=timeout)
        except Exception:  # grpc.RpcError: the control plane is down or restarting
            reply = None
        return self.cli.status_document(state, reply, time.monotonic()), reply is not None

    def snapshot(self, timeout: float = 1.0) -> Snapshot:
        capacity, seed_ready = self.metrics(timeout)
        doc, answered = self.status(timeout)
        return Snapshot(time.monotonic(), capacity, seed_ready, doc, answered)


def target_capacity(rate: float) -> float:
    """What the pool holds under this load: max_workers under a closed loop of 8 > max_workers slots."""
    return float((SHAPE["max_workers"] if rate <= 0 else SHAPE["min_warm"]) * SHAPE["concurrency"])


def steady(snap: Snapshot, want: float) -> str:
    """Why the system is not steady ("" when it is)."""
    if not snap.answered:
        return "the control plane did not answer"
    bad = [f"{c['name']} {c['state']}" for c in snap.doc.get("components", []) if c.get("state") != "running"]
    if bad:
        return ", ".join(bad)
    if snap.capacity is None:
        return "the metrics port did not answer"
    if snap.capacity < want:
        return f"capacity {snap.capacity:g} < {want:g}"
    ready = len(snap.ready_workers()) * SHAPE["concurrency"]
    if ready != snap.capacity:
        return f"ready workers x concurrency {ready} != capacity {snap.capacity:g}"
    return ""


def victim_ready(kind: str, snap: Snapshot, min_uptime: float) -> str:
    """Why the victim of `kind` is not old enough yet ("" when it is)."""
    if kind == "worker":
        if not any((w.get("age_s") or 0) >= MIN_WORKER_AGE_S for w in snap.ready_workers()):
            return f"no ready worker {MIN_WORKER_AGE_S:g} s old"
        return ""
    comp = snap.component(COMPONENT[kind])
    if comp is None:
        return f"no {COMPONENT[kind]}"
    up = comp.get("uptime_s") or 0.0
    return "" if up >= min_uptime else f"{COMPONENT[kind]} up {up:.1f} s < {min_uptime:g} s"


def replaced(kind: str, killed: int, pre: Snapshot, snap: Snapshot) -> bool:
    if kind == "worker":
        return (snap.answered and all(w.get("pid") != killed for w in snap.workers())
                and len(snap.ready_workers()) >= len(pre.ready_workers()))
    comp = snap.component(COMPONENT[kind])
    ok = comp is not None and comp.get("state") == "running" and comp.get("pid") not in (None, killed)
    if kind == "seed":
        ok = ok and snap.seed_ready == 1
    return ok


def capacity_back(pre: Snapshot, snap: Snapshot) -> bool:
    return (snap.capacity is not None and pre.capacity is not None and snap.capacity >= pre.capacity
            and snap.answered and len(snap.ready_workers()) >= len(pre.ready_workers()))


# ---------------------------------------------------------------------------
# 1. kills
# ---------------------------------------------------------------------------


def choose_victim(kind: str, status: dict[str, Any], rng: random.Random) -> tuple[int, str]:
    """(pid, label) of the component to kill, from `supervisor status --json`."""
    if kind == "worker":
        fn: dict[str, Any] = next((f for f in status.get("functions", []) if f.get("name") == FUNCTION), {})
        ready = [w for w in fn.get("workers", []) if w.get("state") in READY_STATES
                 and (w.get("age_s") or 0) >= MIN_WORKER_AGE_S and w.get("pid")]
        if not ready:
            raise LookupError("no ready worker old enough in `supervisor status --json`")
        w = rng.choice(sorted(ready, key=lambda w: str(w.get("id"))))
        return int(w["pid"]), f"worker {w.get('id')} ({w.get('state')}, served {w.get('served')})"
    comp = next((c for c in status.get("components", []) if c.get("name") == COMPONENT[kind]), None)
    if comp is None or not comp.get("pid"):
        raise LookupError(f"no pid for {COMPONENT[kind]} in `supervisor status --json`")
    return int(comp["pid"]), COMPONENT[kind]


def ours(proc: psutil.Process) -> bool:
    try:
        return proc.environ().get(common.TAG_VAR) == common.TAG
    except psutil.Error:
        return False


def wait_reaped(proc: psutil.Process, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                return False  # cannot happen for a SIGKILLed pid unless it was reused
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return True
        time.sleep(0.05)
    return False


def one_kill(kind: str, n: int, sup: pools.Supervisor, probe: Probe, load: LoadClient, args: argparse.Namespace,
             rng: random.Random) -> dict[str, Any]:
    want = target_capacity(args.rate)
    rec: dict[str, Any] = {"kind": kind, "n": n}
    # 1. steady for `settle` s on end, and the victim old enough
    deadline = time.monotonic() + (args.min_uptime if kind != "worker" else 0) + args.steady_deadline
    since: float | None = None
    why = "not looked yet"
    while time.monotonic() < deadline:
        if not sup.alive():
            raise Abort(f"the supervisor exited {sup.popen.returncode}; log tail:\n{common.tail(sup.log_path)}")
        load.check()
        snap = probe.snapshot()
        why = steady(snap, want) or victim_ready(kind, snap, args.min_uptime)
        if why:
            since = None
        elif since is None:
            since = snap.t
        elif snap.t - since >= args.settle:
            break
        time.sleep(0.25)
    else:
        rec["not_steady"] = why
        say(f"    not steady after the deadline ({why}); killing anyway")
    # 2. the victim, from `supervisor status --json`
    status = sup.status()
    try:
        pid, label = choose_victim(kind, status, rng)
    except LookupError as exc:
        rec["skipped"] = str(exc)
        return rec
    proc = psutil.Process(pid)
    if not ours(proc):
        rec["skipped"] = f"pid {pid} ({label}) does not carry this run's tag"
        return rec
    pre = probe.snapshot()
    rec.update(pid=pid, victim=label, pre_capacity=pre.capacity, pre_ready=len(pre.ready_workers()))
    # 3. kill -9, then look every `poll` s until full capacity
    t_kill = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    rec["t_kill"] = t_kill
    min_cap = pre.capacity
    metrics_down = status_down = 0
    t_replaced = t_full = None
    polls = 0
    deadline = t_kill + args.recovery_deadline
    while time.monotonic() < deadline:
        if not sup.alive():
            rec["supervisor_exit"] = sup.popen.returncode
            break
        snap = probe.snapshot(timeout=min(1.0, args.recovery_deadline))
        polls += 1
        if snap.capacity is None:
            metrics_down += 1
        elif min_cap is None or snap.capacity < min_cap:
            min_cap = snap.capacity
        if not snap.answered:
            status_down += 1
        if t_replaced is None and replaced(kind, pid, pre, snap):
            t_replaced = snap.t
        if t_replaced is not None and capacity_back(pre, snap):
            t_full = snap.t
            break
        time.sleep(args.poll)
    rec.update(min_capacity=min_cap, polls=polls, metrics_unanswered=metrics_down, status_unanswered=status_down,
               replaced_s=None if t_replaced is None else t_replaced - t_kill,
               full_s=None if t_full is None else t_full - t_kill, reaped=wait_reaped(proc))
    if t_full is None:
        rec["not_recovered"] = f"not back to full capacity within {args.recovery_deadline:g} s"
    return rec


def run_kills(work: Path, args: argparse.Namespace, source: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"kills": [], "failures": []}
    rng = random.Random(args.seed)
    sup = start_supervisor("kills", work / "kills")
    load: LoadClient | None = None
    records: dict[str, Any] = {}
    try:
        probe = Probe(sup, source["src"])
        load = LoadClient(sup.ca_port, work / "kills-load", args.connections, args.rate)
        load.wait_serving()
        out["load_started"] = time.monotonic()
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        watch = common.CpuWatch([sup, load.proc], reaped=True)
        with watch:
            for i in range(args.kills):
                for kind in kinds:
                    say(f"  round {i + 1}/{args.kills}: {kind} ...")
                    rec = one_kill(kind, i + 1, sup, probe, load, args, rng)
                    out["kills"].append(rec)
                    say("    " + brief(rec))
                    if "supervisor_exit" in rec:
                        raise Abort(f"the supervisor exited {rec['supervisor_exit']} after the kill of "
                                    f"{rec.get('victim')}")
        out["cpu"] = watch.result
        # let the last kill's consequences show before the load stops
        end = time.monotonic() + args.settle
        while time.monotonic() < end:
            load.check()
            time.sleep(0.1)
        out["status_at_end"] = sup.status()
    except (Abort, pools.Deadline, RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
        out["failures"].append(f"kills: {exc}")
        say(f"  kills failed: {exc}")
    finally:
        records = wind_up(sup, load, out)
    if records:
        out["load"] = attribute(out, records)
    return out


def brief(rec: dict[str, Any]) -> str:
    if "skipped" in rec:
        return f"skipped: {rec['skipped']}"
    full = rec.get("full_s")
    return (f"pid {rec['pid']} ({rec['victim']}): capacity {rec.get('pre_capacity')} -> min {rec.get('min_capacity')}, "
            f"replaced {ms(rec.get('replaced_s'))} ms, full {ms(full)} ms"
            + (f" [{rec['not_recovered']}]" if "not_recovered" in rec else ""))


def attribute(out: dict[str, Any], records: dict[str, Any]) -> dict[str, Any]:
    """Lays the load's records against the kills: each failure belongs to the last kill before its end."""
    kills = [k for k in out["kills"] if "t_kill" in k]
    starts, ends = records["ok_starts"], records["ok_ends"]
    failures = sorted(records["failures"], key=lambda f: f[1])
    t_first = kills[0]["t_kill"] if kills else records["stopped"]
    load_t0 = out.get("load_started", records["started"])
    before = [f for f in failures if f[1] < t_first]
    base_ok = bisect.bisect_left(ends, t_first) - bisect.bisect_left(ends, load_t0)
    summary: dict[str, Any] = {
        "options": records["options"], "ok": records["ok"], "failed": records["failed"],
        "cancelled_at_stop": records["cancelled_at_stop"], "client_cpu_s": records["cpu_s"],
        "duration_s": records["stopped"] - records["started"],
        "baseline_rps": base_ok / (t_first - load_t0) if t_first > load_t0 else float("nan"),
        "failures_before_first_kill": dict(Counter(f[2] for f in before)),
        "exit_code": records["exit_code"],
    }
    for i, k in enumerate(kills):
        t0 = k["t_kill"]
        t1 = kills[i + 1]["t_kill"] if i + 1 < len(kills) else records["stopped"]
        mine = [f for f in failures if t0 <= f[1] < t1]
        k["failed"] = dict(Counter(f[2] for f in mine))
        k["failed_total"] = len(mine)
        k["failed_on_fresh_connection"] = sum(1 for f in mine if f[3])
        k["refused"] = sum(1 for f in mine if f[2] == "refused")
        k["dropped"] = sum(1 for f in mine if f[2] in ("reset", "closed"))
        k["answered_errors"] = sum(1 for f in mine if f[2].startswith("http "))
        k["last_failure_s"] = (mine[-1][1] - t0) if mine else None
        # invocations succeeding again: the first ok answer to a request started after the last failure
        after = mine[-1][1] if mine else t0
        j = bisect.bisect_left(ends, after)
        while j < len(ends) and starts[j] < after:
            j += 1
        k["ok_again_s"] = (ends[j] - t0) if j < len(ends) and ends[j] < t1 else None
        full = k.get("full_s")
        if full is None or (mine and k["ok_again_s"] is None):
            k["back_s"] = None
        else:
            k["back_s"] = max(full, k["ok_again_s"]) if mine else full
        # the longest stretch without an ok answer, from the kill to full capacity + 1 s
        horizon = min(t1, t0 + (full if full is not None else 0.0) + 1.0)
        lo, hi = bisect.bisect_left(ends, t0), bisect.bisect_right(ends, horizon)
        marks = [t0, *ends[lo:hi], horizon]
        k["no_answer_gap_s"] = max(b - a for a, b in zip(marks, marks[1:]))
        # the slowest ok request that overlapped the disruption
        slow = [ends[x] - starts[x] for x in range(lo, hi) if starts[x] <= t0 + (full or 0.0)]
        k["slowest_ok_s"] = max(slow) if slow else None
        k["ok_during"] = hi - lo
    summary["failures_sample"] = failures[:2000]
    return summary


def summarize_kills(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    by: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        ks = [k for k in r.get("kills", []) if k["kind"] == kind and "t_kill" in k]
        if not ks:
            continue
        failed: Counter[str] = Counter()
        for k in ks:
            failed.update(k.get("failed", {}))

        def stats(key: str, ks: list[dict[str, Any]] = ks) -> dict[str, Any]:
            vals = sorted(k[key] for k in ks if k.get(key) is not None)
            return {"n": len(vals), "p50": statistics.median(vals) if vals else None,
                    "max": vals[-1] if vals else None}

        by[kind] = {
            "kills": len(ks), "failed": dict(failed), "failed_total": sum(failed.values()),
            "failed_per_kill": stats("failed_total"), "refused": stats("refused"),
            "refused_total": sum(k.get("refused", 0) for k in ks),
            "dropped_total": sum(k.get("dropped", 0) for k in ks),
            "answered_errors_total": sum(k.get("answered_errors", 0) for k in ks),
            "replaced_s": stats("replaced_s"), "full_s": stats("full_s"), "back_s": stats("back_s"),
            "gap_s": stats("no_answer_gap_s"), "last_failure_s": stats("last_failure_s"),
            "not_recovered": sum(1 for k in ks if "not_recovered" in k),
            "zombies": sum(1 for k in ks if not k.get("reaped", True)),
            "not_steady": sum(1 for k in ks if "not_steady" in k),
        }
    return by


# ---------------------------------------------------------------------------
# 2. soak
# ---------------------------------------------------------------------------


def processes(sup: pools.Supervisor, probe: Probe) -> dict[str, int]:
    """Role -> pid: the supervisor, the planes, the seed, each worker (by id)."""
    doc, _ = probe.status(timeout=5.0)
    out = {"supervisor": sup.pid}
    for c in doc.get("components", []):
        if c.get("pid"):
            out[str(c["name"])] = int(c["pid"])
    for fn in doc.get("functions", []):
        for w in fn.get("workers", []):
            if w.get("pid"):
                out[f"worker {w['id']}"] = int(w["pid"])
    return out


def usage(pids: dict[str, int]) -> dict[str, dict[str, Any]]:
    """RSS, threads and open fds of each process (fds: the smallest of 3 reads 0.2 s apart)."""
    procs: dict[str, psutil.Process] = {}
    for role, pid in pids.items():
        try:
            procs[role] = psutil.Process(pid)
        except psutil.Error:
            pass
    out: dict[str, dict[str, Any]] = {}
    for attempt in range(3):
        if attempt:
            time.sleep(0.2)
        for role, proc in procs.items():
            try:
                with proc.oneshot():
                    rss, fds, threads = proc.memory_info().rss, proc.num_fds(), proc.num_threads()
                    created = proc.create_time()
            except psutil.Error:
                continue
            cur = out.setdefault(role, {"pid": proc.pid, "created": created, "rss": rss, "fds": fds,
                                        "threads": threads})
            cur["fds"] = min(cur["fds"], fds)
            cur["rss"] = rss
    return out


def run_soak(work: Path, args: argparse.Namespace, source: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"samples": [], "failures": []}
    sup = start_supervisor("soak", work / "soak")
    load: LoadClient | None = None
    records: dict[str, Any] = {}
    try:
        probe = Probe(sup, source["src"])
        out["before_load"] = usage(processes(sup, probe))
        load = LoadClient(sup.ca_port, work / "soak-load", args.connections, args.soak_rate)
        load.wait_serving()
        say(f"  warm-up {args.soak_warmup:g} s at {args.soak_rate:g} req/s ...")
        t_load = time.monotonic()
        sleep_watching(sup, load, args.soak_warmup)
        # the planes hold fds per worker: start once the pool has stopped changing
        out["pool_stable_at_start"] = wait_stable_pool(sup, load, probe, hold=10.0, timeout=120.0)
        every = args.sample_every or max(5.0, args.soak / 10)
        t0 = time.monotonic()
        end = t0 + args.soak
        out["warmup_s"] = t0 - t_load
        watch = common.CpuWatch([sup, load.proc], reaped=True)
        watch.__enter__()
        while True:
            now = time.monotonic()
            sample: dict[str, Any] = {"t": now - t0, "ok": int(load.last.get("ok", 0)),
                                      "failed": int(load.last.get("failed", 0)), "usage": usage(processes(sup, probe))}
            out["samples"].append(sample)
            say(f"  soak {sample['t']:.0f}/{args.soak:g} s: {sample['ok']} ok, {sample['failed']} failed; RSS MiB "
                + ", ".join(f"{role} {u['rss'] / MIB:.1f}" for role, u in sample["usage"].items()))
            if now >= end:
                first, last = out["samples"][0]["usage"], sample["usage"]
                # compare the planes' fds at the pool size of the start (waits up to 60 s for it)
                if n_workers(last) == n_workers(first) or now >= end + 60:
                    break
                say(f"  {n_workers(last)} workers now, {n_workers(first)} at the start: sampling again in 5 s")
                sleep_watching(sup, load, 5.0)
                continue
            sleep_watching(sup, load, min(every, end - now))
        watch.__exit__(None, None, None)
        out["cpu"] = watch.result
        out["status_at_end"] = sup.status()
    except (Abort, pools.Deadline, RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
        out["failures"].append(f"soak: {exc}")
        say(f"  soak failed: {exc}")
    finally:
        records = wind_up(sup, load, out)
    if records:
        out["load"] = {"options": records["options"], "ok": records["ok"], "failed": records["failed"],
                       "failed_by": dict(Counter(f[2] for f in records["failures"])),
                       "duration_s": records["stopped"] - records["started"], "client_cpu_s": records["cpu_s"],
                       "exit_code": records["exit_code"]}
    out["verdicts"] = soak_verdicts(out)
    return out


def n_workers(use: dict[str, Any]) -> int:
    return sum(1 for role in use if role.startswith("worker "))


def wait_stable_pool(sup: pools.Supervisor, load: LoadClient, probe: Probe, hold: float, timeout: float) -> bool:
    """Waits until the function's worker pids have not changed for `hold` s (False: not within `timeout`)."""
    deadline = time.monotonic() + timeout
    seen: frozenset[int] | None = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        snap = probe.snapshot()
        pids = frozenset(int(w["pid"]) for w in snap.workers() if w.get("pid"))
        if pids != seen:
            seen, since = pids, time.monotonic()
        elif time.monotonic() - since >= hold:
            return True
        sleep_watching(sup, load, 0.5)
    return False


def sleep_watching(sup: pools.Supervisor, load: LoadClient, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not sup.alive():
            raise Abort(f"the supervisor exited {sup.popen.returncode}; log tail:\n{common.tail(sup.log_path)}")
        load.check()
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))


def soak_verdicts(out: dict[str, Any]) -> dict[str, Any]:
    samples = out.get("samples", [])
    if len(samples) < 2:
        return {"processes": [], "pass": False, "why": "fewer than two samples"}
    first, last = samples[0]["usage"], samples[-1]["usage"]
    rows = []
    for role in sorted(set(first) | set(last), key=role_order):
        a, b = first.get(role), last.get(role)
        same = a is not None and b is not None and a["pid"] == b["pid"] and a["created"] == b["created"]
        row: dict[str, Any] = {"role": role, "start": a, "end": b, "same_process": same}
        if same:
            assert a is not None and b is not None
            row["rss_growth"] = (b["rss"] - a["rss"]) / a["rss"] if a["rss"] else float("nan")
            row["fds_growth"] = b["fds"] - a["fds"]
            row["rss_ok"] = row["rss_growth"] < RSS_GROWTH_MAX
            row["fds_ok"] = row["fds_growth"] <= 0
            trend = [s["usage"][role]["rss"] for s in samples if role in s["usage"]
                     and s["usage"][role]["pid"] == a["pid"]]
            row["rss_trend_mib"] = [x / MIB for x in trend]
            # a leak keeps growing; a warm-up flattens: the growth over the second half of the samples
            row["rss_growth_second_half"] = (trend[-1] - trend[len(trend) // 2]) / a["rss"] if a["rss"] else float("nan")
        rows.append(row)
    judged = [r for r in rows if r["same_process"]]
    replaced_roles = [r["role"] for r in rows if not r["same_process"]]
    return {"processes": rows, "replaced": replaced_roles,
            "workers": [n_workers(first), n_workers(last)],
            "rss_pass": bool(judged) and all(r["rss_ok"] for r in judged),
            "fds_pass": bool(judged) and all(r["fds_ok"] for r in judged),
            "pass": bool(judged) and all(r["rss_ok"] and r["fds_ok"] for r in judged)}


def role_order(role: str) -> tuple[int, str]:
    order = {"supervisor": 0, "control-plane": 1, "data-plane": 2}
    return (order.get(role, 3 if role.startswith("seed") else 4), role)


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def ms(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x * 1000:.0f}"


def p50max(s: dict[str, Any]) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{ms(s['p50'])} / {ms(s['max'])}"


def counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])) or "0"


def header(r: dict[str, Any], part: str) -> list[str]:
    m, src = r["machine"], r["source"]
    w: list[str] = []
    argv = list(r["argv"]) if isinstance(r["argv"], list) else str(r["argv"]).split()
    if "--note" in argv[:-1]:
        argv[argv.index("--note") + 1] = "..."  # it is printed in bold below
    cmd = shlex.join(argv).replace("'...'", "...")
    w.append(f"`.venv/bin/python bench/chaos.py {cmd}`, {m['date_utc']}; code measured: commit **{src['commit']}**"
             + (f" (\"{shorten(src['subject'])}\", exported with git archive)" if src.get("exported")
                else " (the work tree)")
             + f"; {m['cpu_model']}, {m['nproc']} cores, {m['memory']}, kernel {m['kernel']}, Python {m['python']}"
             + f"; run as {'root' if os.geteuid() == 0 else 'uid ' + str(os.geteuid())}.")
    w.append("")
    if r.get("note"):
        w.append(f"**{r['note']}**")
        w.append("")
    w.append(f"Supervisor: one Python event function (bench/handlers/trivial.py), min_warm {SHAPE['min_warm']}, "
             f"max_workers {SHAPE['max_workers']}, concurrency {SHAPE['concurrency']}, workers forked from its seed, "
             "run_dir under /var/tmp. Load: bench/loadgen.py, "
             f"{r['options']['connections']} keep-alive connections, a deadline per request, a new connection after "
             "any failure (10 ms pause after a refused one).")
    return w


def cpu_line(part: dict[str, Any]) -> str:
    cpu = part.get("cpu")
    if not cpu:
        return ""
    return (f"The machine was busy {cpu['machine_busy_cores']:.2f} of {common.NCPU} cores on average meanwhile: the "
            f"supervisor's tree and the load client {cpu['target_cores']:.2f}, other processes "
            f"{cpu['other_cores']:.2f} ({cpu['other_pct']:.0f} % of the machine; 1-min load average "
            f"{cpu['loadavg1_before']:.2f} before)." + (" **The machine was shared with other work: times are "
                                                        "pessimistic.**" if cpu["other_pct"] >= 5 else ""))


def render_kills(r: dict[str, Any]) -> str:
    k = r["kills"]
    o = r["options"]
    w: list[str] = ["## Chaos: kill -9 under steady load" + (f" ({r['tag']})" if r.get("tag") else ""), ""]
    w += header(r, "kills")
    load = k.get("load", {})
    w.append("")
    w.append(f"{o['kills']} round(s) of one kill -9 of each kind ({o['kinds']}), in that order, under "
             + ("a closed loop (the next request as soon as the answer is read)" if o["rate"] <= 0
                else f"{o['rate']:g} req/s") + ". Before each kill: everything running and "
             f"`supervisor_capacity_slots` at {target_capacity(o['rate']):g} for {o['settle']:g} s on end; a plane or the "
             f"seed up for {o['min_uptime']:g} s "
             + ("(so each kill is a first crash: a plane is restarted at once, the seed after its first-failure backoff "
                "of 0.5 s)" if o["min_uptime"] >= 30 else "(**under 30 s: restarts may back off, unlike a first crash**)")
             + ", a worker "
             f"{MIN_WORKER_AGE_S:g} s (a crash while serving, not right after READY). Victims' pids from "
             f"`supervisor status --json`; then a metrics scrape and a GetStatus every {o['poll'] * 1000:.0f} ms.")
    if load:
        w.append(f"Load before the first kill: {load['baseline_rps']:,.0f} req/s; {load['ok']:,} ok and "
                 f"{load['failed']:,} failed requests in {load['duration_s']:.0f} s; the load client used "
                 f"{load['client_cpu_s'] / max(1e-9, load['duration_s']):.2f} cores. Failures before the first kill: "
                 f"{counts(load['failures_before_first_kill'])}.")
    if cpu_line(k):
        w.append(cpu_line(k))
    w.append("")
    w.append("Columns: *failed* = requests that failed between this kill and the next (refused and reset/closed are "
             "connections, `http ...` answers); *gap* = longest time without any ok answer from the kill to full "
             "capacity + 1 s; *replaced* = the successor running (a worker: as many ready workers as before); "
             "*full* = replaced and capacity (metrics and status) back to its pre-kill value; *back* = full capacity "
             "and an ok answer to a request started after the last failure. Times in ms after the kill, to within one "
             "poll.")
    w.append("")
    summary = k.get("summary", {})
    if summary:
        w.append("| kind | kills | failed requests (all kills) | failed per kill p50 / max | refused p50 / max | "
                 "gap ms p50 / max | replaced ms p50 / max | full capacity ms p50 / max | back ms p50 / max | "
                 "not recovered | zombies |")
        w.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for kind, s in summary.items():
            fp = s["failed_per_kill"]
            rf = s["refused"]
            w.append(f"| {kind} | {s['kills']} | {counts(s['failed'])} | {fp['p50']:g} / {fp['max']:g} | "
                     f"{rf['p50']:g} / {rf['max']:g} | {p50max(s['gap_s'])} | {p50max(s['replaced_s'])} | "
                     f"{p50max(s['full_s'])} | {p50max(s['back_s'])} | {s['not_recovered']} | {s['zombies']} |")
        w.append("")
    w.append("<details><summary>Every kill</summary>")
    w.append("")
    w.append("| # | kind | victim | capacity pre -> min | failed | refused | gap ms | last failure ms | replaced ms | "
             "full ms | back ms | slowest ok ms | metrics / status unanswered polls | reaped |")
    w.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, x in enumerate(k.get("kills", [])):
        if "skipped" in x:
            w.append(f"| {i + 1} | {x['kind']} | skipped: {x['skipped']} |" + " |" * 11)
            continue
        cap = f"{fmt(x.get('pre_capacity'))} -> {fmt(x.get('min_capacity'))}"
        flag = (f" ({x['not_recovered']})" if "not_recovered" in x else "") + \
            (f" (not steady before: {x['not_steady']})" if "not_steady" in x else "")
        w.append(f"| {i + 1} | {x['kind']} | {x['victim']} pid {x['pid']}{flag} | {cap} | {counts(x.get('failed', {}))} | "
                 f"{x.get('refused', '-')} | {ms(x.get('no_answer_gap_s'))} | {ms(x.get('last_failure_s'))} | "
                 f"{ms(x.get('replaced_s'))} | {ms(x.get('full_s'))} | {ms(x.get('back_s'))} | "
                 f"{ms(x.get('slowest_ok_s'))} | {x.get('metrics_unanswered')} / {x.get('status_unanswered')} | "
                 f"{'yes' if x.get('reaped') else '**no**'} |")
    w.append("")
    w.append("</details>")
    w.append("")
    w += checks(k)
    return "\n".join(w) + "\n"


def shorten(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3].rstrip() + "..."


def fmt(x: Any) -> str:
    return "-" if x is None else f"{x:g}" if isinstance(x, float) else str(x)


def checks(part: dict[str, Any]) -> list[str]:
    w = ["### Checks", ""]
    st = part.get("status_at_end") or {}
    restarts = {c["name"]: c["restarts"] for c in st.get("components", []) if "restarts" in c}
    if restarts:
        w.append("Component restarts reported by `supervisor status --json` at the end: "
                 + ", ".join(f"{n} {v}" for n, v in restarts.items())
                 + (" (a restarted control plane starts its seeds afresh, counting from 0)." if part.get("kills")
                    else "."))
    log = part.get("log", {})
    if log:
        w.append(f"The supervisor's stdout: {log['stdout_lines']:,} lines, {log['unparsable_lines']} not JSON; "
                 f"worker exits by reason: {counts(log['worker_exits'])}.")
        if log["problems"]:
            grouped: Counter[str] = Counter()
            for p, c in log["problems"].items():  # by the event's first line ("Task ... Task-8 ..." differ)
                grouped[" ".join(p.splitlines()[0].split())[:110].replace("`", "'")] += c
            w.append("")
            w.append("Warnings and errors it logged (count, event's first line):")
            w.append("")
            for p, c in grouped.most_common(15):
                w.append(f"- {c} x `{p}`")
    err = part.get("stderr", {})
    w.append("")
    if err.get("bytes"):
        w.append(f"**stderr was not empty** ({err['bytes']:,} bytes; every line of the supervisor should be JSON on "
                 "stdout). Its last lines:")
        w.append("")
        w.append("```")
        w.append(err["tail"][-1500:])
        w.append("```")
    else:
        w.append("stderr stayed empty.")
    w.append("")
    leftovers = part.get("leftovers") or []
    w.append(f"The supervisor exited {part.get('exit_code')} on SIGTERM"
             + (", **after a SIGKILL**" if part.get("killed_at_stop") else "")
             + (f", **leaving {len(leftovers)} process(es)** (killed)" if leftovers else ", leaving no process behind")
             + ".")
    for f in part.get("failures", []):
        w.append(f"\n**failed**: {f}")
    return w


def render_soak(r: dict[str, Any]) -> str:
    s = r["soak"]
    o = r["options"]
    w: list[str] = ["## Soak: RSS and open fds under moderate load" + (f" ({r['tag']})" if r.get("tag") else ""), ""]
    w += header(r, "soak")
    load = s.get("load", {})
    w.append("")
    w.append(f"{o['soak_rate']:g} req/s paced over the connections; a {s.get('warmup_s', o['soak_warmup']):.0f} s "
             f"warm-up, then {o['soak']:g} s measured from the start sample to the end sample. RSS (psutil "
             "memory_info) and open fds (the smallest of 3 reads 0.2 s apart) of every process of the tree; "
             f"pass: RSS grew under {RSS_GROWTH_MAX * 100:.0f} %, fds did not grow.")
    if load:
        w.append(f"Requests: {load['ok']:,} ok, {load['failed']:,} failed ({counts(load['failed_by'])}) in "
                 f"{load['duration_s']:.0f} s.")
    if cpu_line(s):
        w.append(cpu_line(s))
    w.append("")
    v = soak_verdicts(s)  # from the samples, so a re-render (--render) applies the current rules
    rows = v.get("processes", [])
    if rows:
        w.append("| process | pid | RSS start MiB | RSS end MiB | growth | of which in the 2nd half | fds start | fds end "
                 "| RSS | fds |")
        w.append("|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            a, b = row["start"], row["end"]
            if not row["same_process"]:
                what = "started during the soak" if a is None else "gone during the soak" if b is None else "replaced"
                w.append(f"| {row['role']} | {a['pid'] if a else '-'} / {b['pid'] if b else '-'} | "
                         f"{rss(a)} | {rss(b)} | {what} | - | {a['fds'] if a else '-'} | {b['fds'] if b else '-'} "
                         "| - | - |")
                continue
            w.append(f"| {row['role']} | {a['pid']} | {rss(a)} | {rss(b)} | {row['rss_growth'] * 100:+.2f} % | "
                     f"{row['rss_growth_second_half'] * 100:+.2f} % | "
                     f"{a['fds']} | {b['fds']} | {'pass' if row['rss_ok'] else '**fail**'} | "
                     f"{'pass' if row['fds_ok'] else '**fail**'} |")
        w.append("")
        w.append(f"Verdict: RSS growth under {RSS_GROWTH_MAX * 100:.0f} % "
                 f"{'**passed**' if v.get('rss_pass') else '**failed**'}, fds flat "
                 f"{'**passed**' if v.get('fds_pass') else '**failed**'}"
                 + (f"; not judged (not the same process at both ends): {', '.join(v['replaced'])}"
                    if v.get("replaced") else "")
                 + f". Workers at the start / end: {v['workers'][0]} / {v['workers'][1]}"
                 + ("" if v["workers"][0] == v["workers"][1] else
                    " (the planes hold fds for each worker, so their fds were compared at different pool sizes)")
                 + ("" if s.get("pool_stable_at_start", True) else
                    "; the pool had not been stable for 10 s when the soak started")
                 + ".")
        w.append("")
        w.append("RSS at each sample (MiB):")
        w.append("")
        for row in rows:
            if row.get("rss_trend_mib"):
                w.append(f"- {row['role']}: " + ", ".join(f"{x:.2f}" for x in row["rss_trend_mib"]))
        w.append("")
    before = s.get("before_load") or {}
    if before:
        w.append("Before any load (RSS MiB / fds): "
                 + ", ".join(f"{role} {u['rss'] / MIB:.1f} / {u['fds']}" for role, u in
                             sorted(before.items(), key=lambda kv: role_order(kv[0]))) + ".")
        w.append("")
    w += checks(s)
    return "\n".join(w) + "\n"


def rss(u: dict[str, Any] | None) -> str:
    return "-" if not u else f"{u['rss'] / MIB:.2f}"


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, help="kills of each kind (default 10; --quick 2; 0 skips the kills)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="a subset of " + ",".join(KINDS))
    ap.add_argument("--soak", type=float, help="soak seconds after the warm-up (default 600; --quick 20; 0 skips it)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 kills of each kind, no minimum uptime, 20 s soak")
    ap.add_argument("--at", default="HEAD", help="the commit whose supervisor/ and worker/ run (default HEAD; "
                    "'.' = the work tree as it is)")
    ap.add_argument("--connections", type=int, default=8, help="load connections (default 8)")
    ap.add_argument("--rate", type=float, default=0.0, help="load during the kills, req/s; 0 = closed loop (default)")
    ap.add_argument("--settle", type=float, help="seconds steady before each kill (default 2; --quick 1)")
    ap.add_argument("--min-uptime", type=float, help="seconds a plane or seed must be up before it is killed "
                    "(default 31: the restart backoff resets after 30; --quick 0)")
    ap.add_argument("--poll", type=float, default=0.02, help="seconds between looks after a kill (default 0.02)")
    ap.add_argument("--recovery-deadline", type=float, default=60.0, help="seconds a kill may take to recover")
    ap.add_argument("--steady-deadline", type=float, default=60.0, help="seconds to wait for a steady system")
    ap.add_argument("--seed", type=int, default=11, help="random seed for the choice of workers")
    ap.add_argument("--soak-rate", type=float, default=500.0, help="soak load, req/s (default 500)")
    ap.add_argument("--soak-warmup", type=float, help="seconds of load before the soak's start sample (default 30; --quick 5)")
    ap.add_argument("--sample-every", type=float, help="seconds between soak samples (default soak / 10, >= 5)")
    ap.add_argument("--note", default="", help="a sentence put at the top of each section written (e.g. what it predates)")
    ap.add_argument("--write", action="store_true", help=f"write the sections into {RESULTS.relative_to(ROOT)} and "
                    "bench/results.json")
    ap.add_argument("--results", metavar="PATH", default=str(RESULTS), help="the Markdown file --write edits "
                    "(default: %(default)s)")
    ap.add_argument("--results-json", metavar="PATH", default=str(common.RESULTS_JSON),
                    help="the JSON file --write puts its part into, under \"chaos\" (default: %(default)s)")
    ap.add_argument("--json", metavar="PATH", help="also write the raw results (with a sample of the failures) as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, load records)")
    ap.add_argument("--tag", default="", type=_tag, help="a word (e.g. after) that gives the sections written their "
                    "own markers, title and results.json key, so that they do not replace the untagged ones")
    ap.add_argument("--render", metavar="JSON", help="only render (and with --write, write) the sections of a run "
                    "saved with --json; nothing is measured")
    args = ap.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        saved["tag"] = args.tag or saved.get("tag", "")
        args.tag = saved["tag"]
        report(saved, args)
        return 0
    args.kills = args.kills if args.kills is not None else (2 if args.quick else 10)
    args.soak = args.soak if args.soak is not None else (20.0 if args.quick else 600.0)
    args.settle = args.settle if args.settle is not None else (1.0 if args.quick else 2.0)
    args.min_uptime = args.min_uptime if args.min_uptime is not None else (0.0 if args.quick else 31.0)
    args.soak_warmup = args.soak_warmup if args.soak_warmup is not None else (5.0 if args.quick else 30.0)
    bad = {k.strip() for k in args.kinds.split(",") if k.strip()} - set(KINDS)
    if bad:
        ap.error(f"--kinds takes {', '.join(KINDS)}; got {', '.join(sorted(bad))}")
    if args.kills < 0 or args.soak < 0 or args.connections < 1 or args.poll <= 0:
        ap.error("--kills and --soak >= 0, --connections >= 1, --poll > 0")

    common.clean_up_on_exit((signal.SIGTERM, signal.SIGHUP))
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ca-chaos-", dir="/var/tmp"))
    say(f"work dir {work}")
    r: dict[str, Any] = {"argv": list(argv if argv is not None else sys.argv[1:]), "note": args.note, "tag": args.tag,
                         "options": {k: v for k, v in vars(args).items()
                                     if k not in ("write", "json", "keep", "note", "results", "results_json", "tag", "render")}}
    code = 0
    try:
        r["source"] = use_source(args.at, work)
        r["machine"] = common.machine(("ca-supervisor", "psutil", "httptools", "uvloop"))
        say(f"measuring commit {r['source']['commit']} from {r['source']['src']}")
        if args.kills:
            say(f"kills: {args.kills} round(s) of {args.kinds} ...")
            r["kills"] = run_kills(work, args, r["source"])
            r["kills"]["summary"] = summarize_kills(r["kills"])
            if r["kills"]["failures"] or any("not_recovered" in k for k in r["kills"]["kills"]):
                code = max(code, 1 if r["kills"]["failures"] else 3)
        if args.soak:
            say(f"soak: {args.soak:g} s at {args.soak_rate:g} req/s ...")
            r["soak"] = run_soak(work, args, r["source"])
            if r["soak"]["failures"]:
                code = max(code, 1)
            elif not r["soak"]["verdicts"].get("pass"):
                code = max(code, 3)
    except KeyboardInterrupt:
        say("interrupted: stopping everything")
        common.cleanup_all()
        return 130
    finally:
        common.cleanup_all()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    r["elapsed_s"] = time.monotonic() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1, default=str))
    report(r, args)
    say(f"done in {r['elapsed_s']:.0f} s")
    return code


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    """Prints each part's section; with --write, puts them into RESULTS.md and results.json."""
    sections = {}
    if "kills" in r:
        sections["kills"] = render_kills(r)
    if "soak" in r:
        sections["soak"] = render_soak(r)
    for text in sections.values():
        print(text)
    if not args.write:
        return
    saved = json.loads(json.dumps(r, default=str))
    if "kills" in saved:
        (saved["kills"].get("load") or {}).pop("failures_sample", None)
    results_json = Path(args.results_json)
    tag = getattr(args, "tag", "") or ""
    for part, text in sections.items():
        start, end = MARKS[part]
        key = part
        if tag:  # its own markers and key: a tagged run (before / after) leaves the others' sections alone
            start, end, key = start.replace(":", f"-{tag}:"), end.replace(":", f"-{tag}:"), f"{part}-{tag}"
        say(f"{pools.write_section(text, Path(args.results), start, end)} the chaos {key} section of {args.results}")
        meta = {k: v for k, v in saved.items() if k not in ("kills", "soak")}
        common.save_results_part("chaos", {**_old_chaos(results_json), key: meta | saved[part]}, results_json)
    say(f"updated {results_json}")


def _tag(text: str) -> str:
    if text and not text.replace("-", "").isalnum():
        raise argparse.ArgumentTypeError("letters, digits and '-' only")
    return text


def _old_chaos(path: Path) -> dict[str, Any]:
    try:
        old = json.loads(path.read_text()).get("chaos", {})
    except (OSError, ValueError, AttributeError):
        old = {}
    return old if isinstance(old, dict) else {}


if __name__ == "__main__":
    sys.exit(main())
