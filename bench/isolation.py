#!/usr/bin/env python3
"""The cost of isolation: worker start and invocation latency, isolated vs bare side by side, and each step.

    .venv/bin/python bench/isolation.py            # full run (~3 min), prints a Markdown section
    .venv/bin/python bench/isolation.py --quick    # smoke run (< 1 min)
    .venv/bin/python bench/isolation.py --write    # also put the section into bench/RESULTS.md,
                                                   # between <!-- isolation:start --> and <!-- isolation:end -->

Needs root: as root the supervisor isolates workers; as another user there is nothing to compare.

Parts 1 and 2 run against two supervisors started together, measured interleaved, stopped together:

- ``cg`` sees the machine's cgroup tree. Functions ``isolated-*``: limits = {user "auto", network
  "none", memory 256 MiB, cpu 1, pids 64, nofile 1024, seccomp}; ``bare-*``: limits = {user "root",
  seccomp false}: no uid change, no seccomp, no network namespace, no limit. The tree being
  writable, the control plane still makes a cgroup (with no limit in it) for every bare worker.
- ``nocg`` runs the same bare functions (``nocg-*``) where /sys/fs/cgroup is an empty read-only
  tmpfs: the supervisor sees no cgroup tree, its workers get no cgroup at all.

As root every worker gets its own mount namespace (private /tmp, code read-only): there is no
switch for it, so every row has it (the seed sets it up once for forked workers); its cost is in 3.

1. start    bench/pools.py's start test: disposable functions (``min_warm = 1``, ``concurrency = 1``,
            trivial handler), each invocation spends a worker and its replacement's ``"worker
            ready"`` log line gives ``start_ms`` (the control plane's decision to start -> initialized
            and connected). One start at a time, the next invocation only once the replacement is
            ready and 100 ms have passed (a start right after another finds the kernel's
            cgroup-migration path warm, see 3); the six functions {isolated, bare, nocg} x {fork,
            spawn} round robin, the order rotated every round; warm-up starts not counted.
2. latency  bench/run.py's measure_latency: sequential POST /invoke on one keep-alive connection,
            ``x-fc-function-name`` picking a warm, non-disposable, forked worker of ``lat-isolated``
            or ``lat-bare`` (both in ``cg``) or ``lat-nocg``; rounds rotate the order so that noise
            hits all three; per kind the median of the rounds' p50 and p99.
3. steps    each step of worker/isolation.py's ``apply``, timed with perf_counter_ns inside fresh
            children forked from this process (which has imported worker.isolation and libseccomp's
            binding, as a worker has), reported over a pipe; each child joins a real cgroup made by
            supervisor/control/cgroups.py (and removed after it). Also the control plane's own cost
            per worker: ``CgroupTree.create`` (limits written, procs file chowned), ``Cgroup.kill``,
            ``Cgroup.remove``.

Every answer is checked (non-200s counted and reported; the latency kinds' counts checked against
``supervisor_invocations_total`` so that a request routed to the wrong function shows). Both
supervisors are stopped with SIGTERM and waited for with a deadline (then killed, with every
descendant seen), also on error and Ctrl-C; every cgroup made in 3 is removed.

The Markdown section goes to stdout (progress to stderr). Exit status: 0 done, 1 a part could not
run, 3 done but some invocations were not answered 200 or went missing.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import select
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import pools
import run
from common import BODY, ROOT, CpuWatch, pct, say, verdict

sys.path.insert(0, str(ROOT))  # supervisor/ and worker/, for part 3
common.say_to(sys.stderr)  # stdout is for the Markdown section

RESULTS = common.BENCH / "RESULTS.md"
START_MARK, END_MARK = "<!-- isolation:start -->", "<!-- isolation:end -->"
ISOLATED = {"user": "auto", "network": "none", "memory": "256MiB", "cpu": 1.0, "pids": 64, "nofile": 1024,
            "seccomp": True}
BARE = {"user": "root", "seccomp": False}
# The nocg supervisor's command runs after this: /sys/fs/cgroup is an empty read-only tmpfs in its
# own mount namespace (private: nothing propagates back), so CgroupTree.detect finds no hierarchy.
HIDE_CGROUPS = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs -o ro,size=4k none /sys/fs/cgroup && exec "$@"', "sh")
HANDLER = pools.HANDLER_SPECS["trivial"][0]
# kind -> (the supervisor it runs in, its limits)
KINDS: dict[str, tuple[str, dict[str, Any]]] = {"isolated": ("cg", ISOLATED), "bare": ("cg", BARE),
                                                "nocg": ("nocg", BARE)}
LABELS = {"isolated": "isolated", "bare": "bare", "nocg": "bare, no cgroups"}
MODES = {"fork": True, "spawn": False}  # mode -> seed
GOAL_FORK_DELTA_MS = 2.0  # the target: isolation adds under 2 ms to a forked start
GAP_S = 0.1
CHILD_DEADLINE_S = 10.0
STEP_CODE_DIR = ROOT / "examples" / "hello"
CONTROL_STEPS = ("cgroup create", "cgroup kill", "cgroup remove")


# ---------------------------------------------------------------------------
# 1 and 2: two real supervisors
# ---------------------------------------------------------------------------


def supervisor_functions() -> dict[str, dict[str, dict[str, Any]]]:
    """Per supervisor ("cg", "nocg"): its functions, the start test's and the latency test's."""
    out: dict[str, dict[str, dict[str, Any]]] = {"cg": {}, "nocg": {}}
    for kind, (where, limits) in KINDS.items():
        for mode, seed in MODES.items():  # as bench/pools.py's start_functions
            out[where][f"{kind}-{mode}"] = pools.function_spec(HANDLER, seed, disposable=True, min_warm=1,
                                                               max_workers=2, concurrency=1, limits=limits)
    for kind, (where, limits) in KINDS.items():
        out[where][f"lat-{kind}"] = pools.function_spec(HANDLER, True, min_warm=1, max_workers=1, limits=limits)
    return out


def ready_functions(sup: pools.Supervisor) -> set[str]:
    sup.log.read()
    return {str(ln.get("function")) for ln in sup.log.lines if ln.get("event") == "worker ready"}


def isolation_lines(sup: pools.Supervisor) -> dict[str, Any]:
    """What the supervisor said it enforces: its cgroup tree, and each function's sandbox summary."""
    sup.log.read()
    out: dict[str, Any] = {"cgroups": "?", "functions": {}}
    for ln in sup.log.lines:
        if ln.get("event") == "worker isolation":
            out["cgroups"] = str(ln.get("cgroups"))
        elif ln.get("event") == "function isolation":
            out["functions"][str(ln.get("function"))] = {
                k: v for k, v in ln.items() if k in ("identity", "resources", "namespaces", "seccomp")}
    return out


def invocations(sup: pools.Supervisor, function: str) -> Counter[str]:
    """supervisor_invocations_total of one function, by outcome."""
    out: Counter[str] = Counter()
    for line in sup.metrics().splitlines():
        if line.startswith("supervisor_invocations_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.index("}")]))
            if labels.get("function") == function:
                out[labels.get("outcome", "?")] += int(float(line.rsplit(" ", 1)[1]))
    return out


def rotated(items: list[str], i: int) -> list[str]:
    k = i % len(items)
    return items[k:] + items[:k]


def measure_start(sups: dict[str, pools.Supervisor], n: int, warmup: int, quiet_wait: float) -> dict[str, Any]:
    owner = {f"{kind}-{mode}": sups[where] for kind, (where, _) in KINDS.items() for mode in MODES}
    names = list(owner)
    invokers = {where: pools.Invoker(sup.ca_port) for where, sup in sups.items()}
    per: dict[str, dict[str, Any]] = {f: {"start_ms": [], "modes": Counter(), "errors": Counter(), "error_example": "",
                                          "missing": 0, "extra_ready": 0} for f in names}
    out: dict[str, Any] = {"n": n, "warmup": warmup, "gap_s": GAP_S, "functions": {}}
    trees = list(sups.values())
    out["quiet"] = common.wait_for_quiet(trees, quiet_wait, reaped=True)
    window: dict[str, int] = {}
    try:
        with CpuWatch(trees, reaped=True) as watch:
            for i in range(warmup + n):
                if i == warmup:
                    for where, sup in sups.items():
                        sup.log.read()
                        window[where] = len(sup.log.lines)
                for fname in rotated(names, i):
                    sup, rec = owner[fname], per[fname]
                    sup.log.read()  # everything before this invocation is old news
                    try:
                        status, data = invokers[sup.name](fname)
                    except (OSError, http.client.HTTPException) as exc:
                        status, data = -1, repr(exc).encode()
                    if status != 200:
                        rec["errors"][str(status)] += 1
                        rec["error_example"] = rec["error_example"] or f"{status} {data[:200]!r}"
                    ready: list[dict[str, Any]] = []

                    def replaced(sup: pools.Supervisor = sup, fname: str = fname,
                                 ready: list[dict[str, Any]] = ready) -> bool:
                        ready.extend(ln for ln in sup.log.read()
                                     if ln.get("event") == "worker ready" and ln.get("function") == fname)
                        return bool(ready)

                    try:
                        pools.wait_until(replaced, 15, f"the replacement of a spent {fname} worker", interval=0.001)
                    except pools.Deadline:
                        rec["missing"] += 1
                    else:
                        if i >= warmup:
                            rec["start_ms"].append(float(ready[0].get("start_ms", float("nan"))))
                            rec["modes"][str(ready[0].get("mode"))] += 1
                            rec["extra_ready"] += len(ready) - 1
                    time.sleep(GAP_S)
    finally:
        for invoke in invokers.values():
            invoke.close()
    out["cpu"] = watch.result
    exits: dict[str, Counter[str]] = {f: Counter() for f in names}
    for where, sup in sups.items():
        sup.log.read()
        for ln in sup.log.lines[window.get(where, len(sup.log.lines)):]:
            if ln.get("event") == "worker exited" and ln.get("function") in exits:
                exits[str(ln["function"])][str(ln.get("reason"))] += 1
    for fname, rec in per.items():
        values = sorted(rec["start_ms"])
        kind, mode = fname.rsplit("-", 1)
        out["functions"][fname] = {
            "kind": kind, "mode": mode, "supervisor": owner[fname].name, "n": len(values),
            "p50_ms": pct(values, 50), "p90_ms": pct(values, 90), "p99_ms": pct(values, 99),
            "min_ms": values[0] if values else float("nan"), "max_ms": values[-1] if values else float("nan"),
            "mean_ms": statistics.fmean(values) if values else float("nan"),
            "modes": dict(rec["modes"]), "exits": dict(exits[fname]), "errors": dict(rec["errors"]),
            "error_example": rec["error_example"], "missing": rec["missing"], "extra_ready": rec["extra_ready"],
            "values": values,
        }
    out["deltas"] = {}
    for mode in MODES:
        iso = out["functions"][f"isolated-{mode}"]["values"]
        for base in ("bare", "nocg"):
            other = out["functions"][f"{base}-{mode}"]["values"]
            if iso and other:
                low, high = median_delta_ci(iso, other)
                out["deltas"][f"{mode}-{base}"] = {"p50_ms": pct(iso, 50) - pct(other, 50),
                                                   "p90_ms": pct(iso, 90) - pct(other, 90),
                                                   "ci95_low_ms": low, "ci95_high_ms": high}
    return out


def median_delta_ci(a: list[float], b: list[float], resamples: int = 2000) -> tuple[float, float]:
    """95 % bootstrap interval of median(a) - median(b) (independent samples; a fixed seed)."""
    rnd = random.Random(1)
    diffs = sorted(pct(sorted(rnd.choices(a, k=len(a))), 50) - pct(sorted(rnd.choices(b, k=len(b))), 50)
                   for _ in range(resamples))
    return diffs[int(0.025 * resamples)], diffs[int(0.975 * resamples) - 1]


def measure_latency(sups: dict[str, pools.Supervisor], rounds: int, n: int, quiet_wait: float) -> dict[str, Any]:
    targets = {kind: (sups[where], f"lat-{kind}") for kind, (where, _) in KINDS.items()}
    warmup = max(1, n // 10)
    before = {kind: invocations(sup, fname) for kind, (sup, fname) in targets.items()}
    rec: dict[str, dict[str, Any]] = {kind: {"p50_ms": [], "p90_ms": [], "p99_ms": [], "n": 0, "non_200": 0,
                                             "client_errors": Counter()} for kind in targets}
    out: dict[str, Any] = {"rounds": rounds, "n_per_round": n, "warmup_per_round": warmup, "kinds": rec}
    trees = list(sups.values())
    out["quiet"] = common.wait_for_quiet(trees, quiet_wait)
    with CpuWatch(trees) as watch:
        for i in range(rounds):
            for kind in rotated(list(targets), i):
                sup, fname = targets[kind]
                # body given: without one, run.measure_latency sends its own headers (no function name)
                res = run.measure_latency(sup.ca_port, n, warmup, body=BODY,
                                          headers={"Content-Type": "application/json", "x-fc-function-name": fname})
                r = rec[kind]
                for q in ("p50_ms", "p90_ms", "p99_ms"):
                    r[q].append(res[q])
                r["n"] += res["n"]
                r["non_200"] += res["non_200"]
                r["client_errors"].update(res["client_errors"])
    out["cpu"] = watch.result
    expected = rounds * (n + warmup)
    for kind, (sup, fname) in targets.items():
        r = rec[kind]
        r["client_errors"] = dict(r["client_errors"])
        r["round_p50_ms"] = list(r["p50_ms"])
        for q in ("p50_ms", "p90_ms", "p99_ms"):  # the median round: rotation makes drift hit all alike
            r[q] = statistics.median(r[q]) if r[q] else float("nan")
        # each request reached the function it named: its own counter grew by all of them
        counted: Counter[str] = Counter()
        try:
            def arrived(sup: pools.Supervisor = sup, fname: str = fname, kind: str = kind) -> bool:
                nonlocal counted
                counted = invocations(sup, fname)
                counted.subtract(before[kind])
                return sum(counted.values()) >= expected

            pools.wait_until(arrived, 5, f"{fname}'s invocation counter", interval=0.1)
        except pools.Deadline:
            pass
        r["counted"] = {k: v for k, v in counted.items() if v}
        r["expected"] = expected
    return out


# ---------------------------------------------------------------------------
# 3: each step, in fresh children
# ---------------------------------------------------------------------------


def child_steps(joins: list[tuple[str, str]], keep: str) -> list[tuple[str, Callable[[], Any]]]:
    """The steps of apply, in its order; ``joins``: (label, cgroup.procs) per hierarchy, joined one at a time."""
    from worker import isolation

    return [
        *((f"join cgroup: {label}", lambda path=path: isolation.join_cgroup([path])) for label, path in joins),
        ("unshare mount+net", lambda: isolation.unshare(True, True)),
        ("private mounts", lambda: isolation.private_mounts(
            [{"path": "/tmp", "mode": 0o1777, "size": 64 << 20, "writable": True, "keep": [keep]}],
            [str(STEP_CODE_DIR)], [])),
        ("loopback up", isolation.loopback_up),
        ("rlimits", lambda: isolation.set_rlimits({"nofile": 1024, "core": 0})),
        ("setuid", lambda: isolation.change_identity(65534, 65534)),
        ("no_new_privs", isolation.no_new_privs),
        ("seccomp", isolation.load_seccomp),
    ]


# "join cgroup" is the sum of the per-hierarchy joins (isolation.join_cgroup writes each procs file in turn)
STEPS = ("join cgroup", *(name for name, _ in child_steps([], "")))


def in_child(steps: list[tuple[str, Callable[[], Any]]]) -> dict[str, Any]:
    """Forks a child that runs `steps` in order and sends back how long each took (µs).

    The child never returns into this code (os._exit, also on an exception or a signal); the
    parent waits for its answer and its exit with a deadline, then kills it.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            took: dict[str, Any] = {}
            try:
                for name, step in steps:
                    t0 = time.perf_counter_ns()
                    step()
                    took[name] = (time.perf_counter_ns() - t0) / 1000
                code = 0
            except Exception as exc:  # reported, not raised: this is a forked child
                took["error"] = f"{name}: {exc!r}"
            os.write(write_fd, json.dumps(took).encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    deadline = time.monotonic() + CHILD_DEADLINE_S
    data = b""
    try:
        while time.monotonic() < deadline:
            readable, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                break
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_fd)
        status = None
        while status is None and time.monotonic() < deadline:
            done, wstatus = os.waitpid(pid, os.WNOHANG)
            if done:
                status = wstatus
            else:
                time.sleep(0.001)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # SIGKILL cannot be refused: this returns
    try:
        result: dict[str, Any] = json.loads(data or b"{}")
    except ValueError:
        result = {"error": f"unreadable answer {data[:100]!r}"}
    if status is None:
        result["error"] = f"no exit within {CHILD_DEADLINE_S:g}s (killed)"
    elif os.waitstatus_to_exitcode(status) != 0 and "error" not in result:
        result["error"] = f"exit status {os.waitstatus_to_exitcode(status)}"
    return result


def measure_steps(runs: int) -> dict[str, Any]:
    from supervisor.control.cgroups import CgroupLimits, CgroupTree, Unavailable
    from worker import isolation

    isolation.libseccomp()  # loaded before the children give up root, as a worker has it
    tree = CgroupTree.detect(name=f"ca-bench-{os.getpid()}")
    if isinstance(tree, Unavailable):
        return {"error": f"no cgroup tree: {tree.reason}"}
    limits = CgroupLimits(memory=256 << 20, cpu=1.0, pids=64)
    samples: dict[str, list[float]] = {name: [] for name in (*STEPS, *CONTROL_STEPS)}
    joins: list[str] = []  # "join cgroup: <hierarchy>", in the order they are joined
    errors: list[str] = []
    made: list[Any] = []
    left: list[str] = []
    tmp = tempfile.mkdtemp(prefix="ca-bench-isolation-steps-", dir="/tmp")
    keep = os.path.join(tmp, "run")
    os.mkdir(keep)
    try:
        for i in range(runs):
            time.sleep(GAP_S)  # apart, as the starts are
            t0 = time.perf_counter_ns()
            cgroup = tree.create("bench", f"w{i}", limits, owner_uid=65534)
            created_us = (time.perf_counter_ns() - t0) / 1000
            made.append(cgroup)
            hierarchies = [(",".join(sorted(c)) or path.parent.parent.name, str(path / "cgroup.procs"))
                           for path, c in cgroup.dirs.items()]
            joins = [f"join cgroup: {label}" for label, _ in hierarchies]
            took = in_child(child_steps(hierarchies, keep))
            if all(name in took for name in joins):
                took["join cgroup"] = sum(took[name] for name in joins)
            t1 = time.perf_counter_ns()
            cgroup.kill()
            t2 = time.perf_counter_ns()
            removed = cgroup.remove()
            t3 = time.perf_counter_ns()
            if "error" in took:
                errors.append(str(took.pop("error")))
            if not removed:
                errors.append(f"cgroup w{i} not removed")
                continue
            made.remove(cgroup)
            if not all(name in took for name in STEPS):
                continue  # a failed child: its partial timings would skew the steps it reached
            for name in (*STEPS, *joins):
                samples.setdefault(name, []).append(took[name])
            samples["cgroup create"].append(created_us)
            samples["cgroup kill"].append((t2 - t1) / 1000)
            samples["cgroup remove"].append((t3 - t2) / 1000)
    finally:
        for cgroup in made:  # whatever is still there: killed and removed
            try:
                cgroup.kill()
                if not cgroup.remove():
                    left += list(cgroup.procs_files)
            except OSError as exc:
                left.append(f"{cgroup.procs_files}: {exc}")
        tree.close()
        left += [str(base) for base in tree.bases if base.exists()]
        shutil.rmtree(tmp, ignore_errors=True)
    stats = {name: {"n": len(v), "p50_us": statistics.median(v) if v else float("nan"),
                    "p90_us": pct(sorted(v), 90)} for name, v in samples.items()}
    totals = [sum(samples[name][j] for name in STEPS) for j in range(len(samples[STEPS[0]]))]
    return {"runs": runs, "errors": errors, "left_behind": left, "steps": stats, "joins": joins,
            "total": {"p50_us": statistics.median(totals) if totals else float("nan"), "p90_us": pct(sorted(totals), 90)},
            "cgroups": tree.describe()}


# ---------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------


def describe_machine() -> dict[str, Any]:
    return common.machine(("ca-supervisor", "psutil"),
                          python=common.run_text([pools.PYTHON, "-c", "import platform; print(platform.python_version())"]))


def _ms(x: float) -> str:
    return "-" if x != x else f"{x:.2f}"


def _us(x: float) -> str:
    return "-" if x != x else f"{x:.0f}"


def render(r: dict[str, Any]) -> str:
    m, o = r["machine"], r["options"]
    out: list[str] = []
    w = out.append
    w("## Isolation: what it costs\n")
    w(f"`.venv/bin/python bench/isolation.py{' --quick' if o['quick'] else ''}`, {m['date_utc']}, commit {m['git']}; "
      f"{m['cpu_model']}, {m['nproc']} cores ({m['affinity']} usable), {m['memory']}, kernel {m['kernel']}, "
      f"Python {m['python']}, libseccomp over ctypes; run as root. "
      "One run on a shared machine: the start deltas carry a bootstrap interval, the latency rounds their spread; "
      "read anything inside those as noise.\n")
    w("Two supervisors side by side, started together and measured interleaved:\n")
    w("| kind | supervisor | limits | what its workers get |")
    w("|---|---|---|---|")
    iso = r.get("isolation_lines", {})
    for kind, (where, limits) in KINDS.items():
        summary = iso.get(where, {}).get("functions", {}).get(f"{kind}-fork", {})
        got = "; ".join(f"{k}: {v}" for k, v in summary.items()) or "?"
        w(f"| {LABELS[kind]} | `{where}` | `{json.dumps(limits)}` | {got} |")
    w("")
    w(f"`cg` sees the cgroup tree ({iso.get('cg', {}).get('cgroups', '?')}); `nocg` runs where /sys/fs/cgroup is an "
      f"empty read-only tmpfs ({iso.get('nocg', {}).get('cgroups', '?')}). Limits or not, the control plane makes a "
      "cgroup for every worker when the tree is writable, so **bare** workers in `cg` still have one (with no limit "
      "in it; a spawned one moves itself in) and only **bare, no cgroups** is the real baseline. As root every "
      "worker also gets its own mount namespace (private /tmp, code read-only) whatever its limits say: all rows "
      "have it, its cost is in the steps table.\n")

    start = r.get("start")
    if start:
        fns = start["functions"]
        w("### Worker start (control plane's decision -> initialized and connected)\n")
        w(f"bench/pools.py's method: disposable functions, trivial handler, each invocation spends a worker and the "
          f"replacement's `worker ready` log line gives `start_ms`; one start at a time, the next {GAP_S * 1000:.0f} ms "
          f"after the previous replacement was ready, the six functions round robin (order rotated each round); "
          f"{start['warmup']} warm-up starts per function not counted. n = {start['n']} per function, so p99 is the "
          "second-largest value.\n")
        w("| kind | mode | n | p50 ms | p90 ms | p99 ms | max ms |")
        w("|---|---|---|---|---|---|---|")
        for mode in MODES:
            for kind in KINDS:
                f = fns.get(f"{kind}-{mode}")
                if f:
                    w(f"| {LABELS[kind]} | {mode} | {f['n']} | {_ms(f['p50_ms'])} | {_ms(f['p90_ms'])} | "
                      f"{_ms(f['p99_ms'])} | {_ms(f['max_ms'])} |")
        w("")
        deltas = start.get("deltas", {})
        w("What isolation adds (isolated minus the baseline; p50 with a 95 % bootstrap interval, and p90):\n")
        w("| mode | vs bare (same supervisor) p50 ms | p90 ms | vs bare, no cgroups p50 ms | p90 ms |")
        w("|---|---|---|---|---|")
        for mode in MODES:
            b, nc = deltas.get(f"{mode}-bare"), deltas.get(f"{mode}-nocg")
            if b and nc:
                w(f"| {mode} | {b['p50_ms']:+.2f} [{b['ci95_low_ms']:+.2f}, {b['ci95_high_ms']:+.2f}] | "
                  f"{b['p90_ms']:+.2f} | **{nc['p50_ms']:+.2f}** [{nc['ci95_low_ms']:+.2f}, {nc['ci95_high_ms']:+.2f}] | "
                  f"{nc['p90_ms']:+.2f} |")
        w("")
        fork = deltas.get("fork-nocg")
        if fork:
            if fork["ci95_high_ms"] < GOAL_FORK_DELTA_MS:
                judged = "met"
            elif fork["p50_ms"] < GOAL_FORK_DELTA_MS:
                judged = "met at p50, but the interval reaches past the goal: not established at this n"
            else:
                judged = verdict(False)
            w(f"Target: isolation adds under {GOAL_FORK_DELTA_MS:g} ms to a forked start. Against the real baseline "
              f"(bare, no cgroups) it adds {fork['p50_ms']:+.2f} ms at p50 (95 % interval "
              f"[{fork['ci95_low_ms']:+.2f}, {fork['ci95_high_ms']:+.2f}] ms): {judged}.\n")
        steps = r.get("steps") or {}
        bare_s, nocg_s = fns.get("bare-spawn"), fns.get("nocg-spawn")
        if "steps" in steps and bare_s and nocg_s and "spawn-bare" in deltas:
            st = steps["steps"]
            own = sum(st[k]["p50_us"] for k in ("loopback up", "setuid", "no_new_privs", "seccomp")) / 1000
            w(f"Reading the spawn rows: bare minus bare-no-cgroups ({bare_s['p50_ms'] - nocg_s['p50_ms']:+.2f} ms at "
              f"p50) is a spawned worker moving itself into its cgroup (\"join cgroup\" in the steps table: "
              f"{st['join cgroup']['p50_us'] / 1000:.2f} ms, nearly all of it the first hierarchy's RCU grace period). "
              f"Isolated minus bare ({deltas['spawn-bare']['p50_ms']:+.2f} ms, interval "
              f"[{deltas['spawn-bare']['ci95_low_ms']:+.2f}, {deltas['spawn-bare']['ci95_high_ms']:+.2f}]) is the steps only an isolated worker "
              f"takes (lo, setuid, no_new_privs, seccomp: {own:.2f} ms, plus the network half of the unshare) and the "
              "rest of its start-up (uvloop, the handler's import, connecting) running under the seccomp filter, "
              "the memory cgroup and the CPU quota. A forked worker skips all of it: its seed did the steps once and "
              "waits in the next worker's cgroup, so its clone is born there.\n")
        cpu = start.get("cpu", {})
        if cpu:
            w(f"During the start test other processes on the machine used {cpu['other_cores']:.2f} cores on average "
              f"({cpu['other_pct']:.0f} % of the machine); load average before {cpu['loadavg1_before']:.2f}.\n")

    lat = r.get("latency")
    if lat:
        kinds = lat["kinds"]
        w("### Invocation latency (sequential, one keep-alive connection, trivial handler, warm forked worker)\n")
        w(f"bench/run.py's measure_latency, `x-fc-function-name` picking the function: {lat['rounds']} rounds of "
          f"{lat['n_per_round']} requests (+{lat['warmup_per_round']} warm-up) per kind, the order rotated each round; "
          "the table gives the median round.\n")
        w("| kind | n | p50 µs | p90 µs | p99 µs | round p50s µs (min-max) | non-200 |")
        w("|---|---|---|---|---|---|---|")
        for kind in KINDS:
            k = kinds[kind]
            rp = k["round_p50_ms"]
            errors = k["non_200"] + sum(k["client_errors"].values())
            w(f"| {LABELS[kind]} | {k['n']} | {_us(k['p50_ms'] * 1000)} | {_us(k['p90_ms'] * 1000)} | "
              f"{_us(k['p99_ms'] * 1000)} | {_us(min(rp) * 1000) if rp else '-'}-{_us(max(rp) * 1000) if rp else '-'} | "
              f"{errors} |")
        w("")
        i, b, nc = kinds["isolated"], kinds["bare"], kinds["nocg"]
        for other in ("nocg", "bare"):  # paired by round: the three ran back to back in each
            diffs = [(x - y) * 1000 for x, y in zip(i["round_p50_ms"], kinds[other]["round_p50_ms"])]
            if diffs:
                w(f"- isolated - {LABELS[other]}, p50 paired by round: median {statistics.median(diffs):+.0f} µs, "
                  f"isolated slower in {sum(d > 0 for d in diffs)} of {len(diffs)} rounds")
        w("")
        w(f"Isolation adds {(i['p50_ms'] - nc['p50_ms']) * 1000:+.0f} µs at p50 and "
          f"{(i['p99_ms'] - nc['p99_ms']) * 1000:+.0f} µs at p99 against bare, no cgroups "
          f"({(i['p50_ms'] - b['p50_ms']) * 1000:+.0f} / {(i['p99_ms'] - b['p99_ms']) * 1000:+.0f} µs against bare in "
          "the same supervisor). On the request path an isolated worker has the seccomp filter on each of its "
          "syscalls, memory-cgroup accounting and the CPU quota's bookkeeping; not separated here. Compare the "
          "spread of the rounds before reading a difference.\n")
        cpu = lat.get("cpu", {})
        if cpu:
            w(f"Other processes used {cpu['other_cores']:.2f} cores on average during this test.\n")

    steps = r.get("steps")
    if steps and "steps" in steps:
        st = steps["steps"]
        n_ok = st[STEPS[0]]["n"]
        w(f"### Each step of worker/isolation.py's apply (µs; {n_ok} of {steps['runs']} fresh children)\n")
        w("Each child is forked from the benchmark's Python process (worker.isolation and libseccomp loaded), "
          f"{GAP_S * 1000:.0f} ms apart, and times each step with perf_counter_ns, sending the numbers back over a "
          f"pipe. It joins a real cgroup ({steps['cgroups']}; memory 256 MiB, cpu 1, pids 64), unshares mount and "
          "network namespaces, covers /tmp with a tmpfs keeping one directory, binds the code dir read-only, brings "
          "lo up, sets nofile and core, becomes 65534:65534, sets no_new_privs and loads the seccomp filter.\n")
        w("| step | p50 µs | p90 µs | forked worker | spawned worker |")
        w("|---|---|---|---|---|")
        who = {"join cgroup": ("no: born in it (the seed waits there)", "yes (also bare, in `cg`)"),
               "unshare mount+net": ("no: the seed did it", "yes (mount: also bare)"),
               "private mounts": ("no: the seed did it", "yes (also bare)")}
        for name in STEPS:
            v = st[name]
            fork, spawn = who.get(name, ("no: the seed did it", "yes"))
            w(f"| {name} | {_us(v['p50_us'])} | {_us(v['p90_us'])} | {fork} | {spawn} |")
            if name == "join cgroup":
                for j, sub in enumerate(steps.get("joins", [])):
                    v = st[sub]
                    w(f"| - {sub.split(': ', 1)[1]} ({'first' if j == 0 else 'then'}) | {_us(v['p50_us'])} | "
                      f"{_us(v['p90_us'])} | | |")
        w(f"| **all steps** | {_us(steps['total']['p50_us'])} | {_us(steps['total']['p90_us'])} | | |")
        w("")
        w("The control plane's own cost per worker (in the control plane, not in the worker; for a forked worker the "
          "next one's cgroup is made while the current one starts):\n")
        w("| control plane | p50 µs | p90 µs |")
        w("|---|---|---|")
        for name in CONTROL_STEPS:
            v = st[name]
            w(f"| {name} | {_us(v['p50_us'])} | {_us(v['p90_us'])} |")
        w("")
        w("\"join cgroup\" moves a process between cgroups, which (cgroup v1) waits for an RCU grace period unless "
          "another move happened moments before; that is why a seed moves into the next worker's cgroup after a clone "
          "is up, off the start's path, and why starts and children here are spaced out.\n")
        if steps["errors"]:
            w(f"Errors in the children: {len(steps['errors'])}, e.g. `{steps['errors'][0][:200]}`\n")
    elif steps:
        w(f"Steps not measured: {steps.get('error')}\n")

    w("### Checks\n")
    notes = r.get("anomalies", [])
    if notes:
        for note in notes:
            w(f"- {note}")
    else:
        w("Every invocation answered 200 and reached the function it named, every start was in the expected mode "
          "and every spent worker ended as `disposable`, both supervisors exited 0 on SIGTERM with nothing left "
          "behind and no warning or error in their logs, every cgroup made for the steps was removed.")
    w(f"\nRun took {r['elapsed_s']:.0f} s.")
    return "\n".join(out).rstrip() + "\n"


def check(r: dict[str, Any]) -> list[str]:
    """Everything that is not as it should be, in words."""
    notes: list[str] = []
    for name, s in r.get("supervisors", {}).items():
        if s.get("exit_code") not in (0, None):
            notes.append(f"supervisor {name}: exited {s['exit_code']} on SIGTERM")
        if s.get("killed"):
            notes.append(f"supervisor {name}: did not stop within the deadline; its group was killed")
        if s.get("leftovers"):
            notes.append(f"supervisor {name}: processes left after it exited: {s['leftovers']}")
        for key, (count, example) in s.get("log", {}).get("lines", {}).items():
            notes.append(f"supervisor {name}: {count} x log line `{key}`, e.g. `{example[:200]}`")
        if s.get("log", {}).get("stderr_tail", "").strip():
            notes.append(f"supervisor {name}: stderr not empty: `{s['log']['stderr_tail'][-300:]}`")
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
            notes.append(f"start {fname}: spent workers ended as {odd}, not `disposable`")
    for kind, x in (r.get("latency") or {}).get("kinds", {}).items():
        if x["non_200"] or x["client_errors"]:
            notes.append(f"latency {kind}: {x['non_200']} non-200 answers, client errors {x['client_errors']}")
        if x["counted"].get("success", 0) != x["expected"] or set(x["counted"]) - {"success"}:
            notes.append(f"latency {kind}: lat-{kind} counted {x['counted']} in supervisor_invocations_total, "
                         f"expected {x['expected']} successes")
    steps = r.get("steps") or {}
    if steps.get("errors"):
        notes.append(f"steps: {len(steps['errors'])} child(ren) failed, e.g. `{steps['errors'][0][:200]}`")
    if steps.get("left_behind"):
        notes.append(f"steps: cgroups left behind: {steps['left_behind']}")
    for e in r.get("failures", []):
        notes.append(f"**failed**: {e}")
    return notes


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer starts, rounds and children")
    ap.add_argument("--write", action="store_true", help=f"put the section into {RESULTS.relative_to(ROOT)}")
    ap.add_argument("-n", type=int, help="starts measured per function (default 100; --quick 12)")
    ap.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        say("needs root: as another user workers keep the supervisor's uid and there is nothing to compare")
        return 1
    quick = args.quick
    n = args.n if args.n is not None else (12 if quick else 100)
    warmup = 2 if quick else 5
    rounds, per_round = (3, 500) if quick else (12, 1000)
    children = 15 if quick else 50
    quiet_wait = 2.0 if quick else 10.0

    common.clean_up_on_exit((signal.SIGTERM, signal.SIGHUP))
    t0 = time.monotonic()
    r: dict[str, Any] = {"machine": describe_machine(), "failures": [], "supervisors": {}, "isolation_lines": {},
                         "options": {"quick": quick, "n": n, "warmup": warmup, "rounds": rounds,
                                     "per_round": per_round, "children": children}}
    work = Path(tempfile.mkdtemp(prefix="ca-bench-isolation-"))
    say(f"work dir {work}")
    sups: dict[str, pools.Supervisor] = {}
    try:
        try:
            specs = supervisor_functions()
            sups["cg"] = pools.Supervisor("cg", work / "cg", specs["cg"])
            sups["nocg"] = pools.Supervisor("nocg", work / "nocg", specs["nocg"], HIDE_CGROUPS)
            for sup in sups.values():
                sup.initialize()
                say(f"{sup.name}: /initialize 200 after {time.perf_counter() - sup.started:.1f} s")
            for where, sup in sups.items():
                pools.wait_until(lambda sup=sup, where=where: set(specs[where]) <= ready_functions(sup), 30,
                                 f"{where}: a first ready worker of every function")
                r["isolation_lines"][where] = isolation_lines(sup)
            t1 = time.monotonic()
            say(f"start: {n} starts (+{warmup} warm-up) per function, {GAP_S * 1000:.0f} ms apart ...")
            try:
                r["start"] = measure_start(sups, n, warmup, quiet_wait)
                for fname, x in r["start"]["functions"].items():
                    say(f"  {fname}: p50 {x['p50_ms']:.2f} ms, p90 {x['p90_ms']:.2f} ms, max {x['max_ms']:.2f} ms, "
                        f"n {x['n']}, modes {x['modes']}")
                say(f"  ({time.monotonic() - t1:.0f} s)")
            except (pools.Deadline, RuntimeError, OSError, ValueError, KeyError) as exc:
                r["failures"].append(f"start: {exc!r}")
                say(f"  start failed: {exc!r}")
            t1 = time.monotonic()
            say(f"latency: {rounds} rounds x {per_round} requests per kind ...")
            try:
                r["latency"] = measure_latency(sups, rounds, per_round, quiet_wait / 2)
                for kind, x in r["latency"]["kinds"].items():
                    say(f"  {kind}: p50 {x['p50_ms'] * 1000:.0f} µs, p99 {x['p99_ms'] * 1000:.0f} µs, counted "
                        f"{x['counted']}")
                say(f"  ({time.monotonic() - t1:.0f} s)")
            except (pools.Deadline, RuntimeError, OSError, ValueError, KeyError) as exc:
                r["failures"].append(f"latency: {exc!r}")
                say(f"  latency failed: {exc!r}")
        except (pools.Deadline, RuntimeError, OSError) as exc:
            r["failures"].append(f"supervisors: {exc!r}")
            say(f"  supervisors failed: {exc!r}")
        finally:
            for where, sup in sups.items():
                r["supervisors"][where] = {"exit_code": sup.stop(), "killed": sup.killed,
                                           "leftovers": sup.leftovers, "log": sup.log_problems()}
            say("supervisors stopped: " + ", ".join(f"{k} exit {v['exit_code']}" for k, v in r["supervisors"].items()))
        t1 = time.monotonic()
        say(f"steps: {children} fresh children ...")
        try:
            r["steps"] = measure_steps(children)
            if "steps" in r["steps"]:
                say("  " + ", ".join(f"{k} {v['p50_us']:.0f}" for k, v in r["steps"]["steps"].items())
                    + f" µs ({time.monotonic() - t1:.0f} s)")
        except OSError as exc:
            r["failures"].append(f"steps: {exc!r}")
            say(f"  steps failed: {exc!r}")
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
    r["anomalies"] = check(r)
    say(f"done in {r['elapsed_s']:.0f} s; " + (f"{len(r['anomalies'])} finding(s), see 'Checks'"
                                               if r["anomalies"] else "no findings"))
    section = render(r)
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1, default=str))
    if args.write:
        say(f"{pools.write_section(section, RESULTS, START_MARK, END_MARK)} the isolation section in {RESULTS}")
    if r["failures"]:
        return 1
    start_bad = sum(sum(x["errors"].values()) + x["missing"] for x in (r.get("start") or {}).get("functions", {}).values())
    lat_bad = sum(x["non_200"] + sum(x["client_errors"].values())
                  for x in (r.get("latency") or {}).get("kinds", {}).values())
    return 3 if start_bad or lat_bad else 0


if __name__ == "__main__":
    sys.exit(main())
