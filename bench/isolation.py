#!/usr/bin/env python3
"""The cost of isolation: worker start and invocation latency, isolated vs bare, and each step.

    .venv/bin/python bench/isolation.py            # full run (~3 min), prints a Markdown section
    .venv/bin/python bench/isolation.py --quick    # smoke run (~1 min)
    .venv/bin/python bench/isolation.py --write    # also put the section into bench/RESULTS.md,
                                                   # between <!-- isolation:start --> and <!-- isolation:end -->

Needs root (as root the supervisor isolates workers; otherwise there is nothing to compare).

1. start    bench/pools.py's start test (disposable functions, the "worker ready" line's start_ms, one
            start at a time on an idle supervisor, 100 ms apart) for {fork, spawn} x {isolated: user
            "auto", network "none", memory 256 MiB, cpu 1, pids 64, nofile 1024, seccomp; bare: user
            "root", seccomp off, and a supervisor that sees no cgroup tree (run where /sys/fs/cgroup is
            an empty read-only tmpfs)}. Bare workers have no cgroup, no uid change and no seccomp; as
            root they still get the mount namespace (there is no switch for it), so the spawn delta
            leaves that step out (see 3).
2. latency  sequential POST /invoke on one keep-alive connection to a warm isolated and a warm bare
            worker (one supervisor each), alternating in rounds so that noise hits both.
3. steps    each step of worker/isolation.py's apply, timed inside fresh children forked from this
            process (a real cgroup per child, made and removed by supervisor/control/cgroups.py),
            and the control plane's own per-worker cost (make, kill, remove the cgroup).

The Markdown section goes to stdout (progress to stderr). Exit status: 0 done, 1 it could not run,
3 done but some invocations were not answered 200.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import pools
import run
from common import ROOT, pct, say

RESULTS = common.BENCH / "RESULTS.md"
START_MARK, END_MARK = "<!-- isolation:start -->", "<!-- isolation:end -->"
ISOLATED = {"user": "auto", "network": "none", "memory": "256MiB", "cpu": 1.0, "pids": 64, "nofile": 1024,
            "seccomp": True}
BARE = {"user": "root", "seccomp": False}
# The bare supervisor runs where /sys/fs/cgroup is an empty read-only tmpfs: no cgroups at all.
HIDE_CGROUPS = ("unshare", "--mount", "sh", "-c", 'mount -t tmpfs -o ro,size=4k none /sys/fs/cgroup && exec "$@"', "sh")
GOAL_FORK_DELTA_MS = 2.0
GAP_S = 0.1
STEPS = ("join cgroup", "unshare mount+net", "private mounts", "loopback up", "rlimits", "setuid", "no_new_privs",
         "seccomp")

sys.path.insert(0, str(ROOT))
common.say_to(sys.stderr)


# ---- 1 and 2: a real supervisor --------------------------------------------------------------


KINDS = {"isolated": (ISOLATED, ()), "bare": (BARE, HIDE_CGROUPS)}


def measure_start(workdir: Path, n: int, warmup: int, quiet_wait: float) -> dict[str, Any]:
    """pools.py's start test, once per kind (each its own supervisor), merged."""
    out: dict[str, Any] = {"functions": {}, "exit_codes": {}, "log": {}}
    for kind, (limits, wrapper) in KINDS.items():
        functions = {f"{kind}-{name.rsplit('-', 1)[1]}": fn
                     for name, fn in pools.start_functions(["trivial"], limits=limits).items()}
        # 100 ms between starts: a start right after another finds the kernel's
        # cgroup-migration lock warm (see 3), which would flatter a worker that moves.
        res = pools.measure_start(workdir / kind, n, warmup, GAP_S, quiet_wait, ["trivial"], functions=functions,
                                  wrapper=wrapper)
        out["functions"].update(res["functions"])
        out["exit_codes"][kind] = res["exit_code"]
        out["log"][kind] = res["log"]
    return out


def measure_latency(workdir: Path, rounds: int, n: int) -> dict[str, Any]:
    sups = {kind: pools.Supervisor(f"latency-{kind}", workdir / f"latency-{kind}", {
        kind: pools.function_spec(pools.HANDLER_SPECS["trivial"][0], True, min_warm=1, max_workers=1, limits=limits)},
        wrapper) for kind, (limits, wrapper) in KINDS.items()}
    out: dict[str, Any] = {kind: {"p50_ms": [], "p99_ms": [], "n": 0, "errors": 0} for kind in sups}
    try:
        for sup in sups.values():
            sup.initialize()
        for i in range(rounds):
            for kind in (list(sups) if i % 2 == 0 else list(reversed(sups))):
                res = run.measure_latency(sups[kind].ca_port, n, n // 10)
                rec = out[kind]
                rec["p50_ms"].append(res["p50_ms"])
                rec["p99_ms"].append(res["p99_ms"])
                rec["n"] += res["n"]
                rec["errors"] += res["non_200"] + sum(res["client_errors"].values())
    finally:
        out["exit_codes"] = {kind: sup.stop() for kind, sup in sups.items()}
    for kind in sups:  # the median round: rounds alternate, so drift hits both alike
        rec = out[kind]
        rec["p50_us"] = statistics.median(rec.pop("p50_ms")) * 1000
        rec["p99_us"] = statistics.median(rec.pop("p99_ms")) * 1000
    return out


# ---- 3: the steps, in fresh children ---------------------------------------------------------------


def time_steps(tree: Any, code_dir: str, keep: str) -> dict[str, float]:
    """Forks a child that runs each step of apply() and reports their durations (µs)."""
    from supervisor.control.cgroups import CgroupLimits
    from worker import isolation

    t0 = time.perf_counter_ns()
    cgroup = tree.create("bench", f"w{time.monotonic_ns()}", CgroupLimits(memory=256 << 20, cpu=1.0, pids=64),
                         owner_uid=65534)
    made_us = (time.perf_counter_ns() - t0) / 1000
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: each step, timed; never returns
        os.close(read_fd)
        took: dict[str, float] = {}
        steps = [
            ("join cgroup", lambda: isolation.join_cgroup(cgroup.procs_files)),
            ("unshare mount+net", lambda: isolation.unshare(True, True)),
            ("private mounts", lambda: isolation.private_mounts(
                [{"path": "/tmp", "mode": 0o1777, "size": 64 << 20, "writable": True, "keep": [keep]}],
                [code_dir], [])),
            ("loopback up", isolation.loopback_up),
            ("rlimits", lambda: isolation.set_rlimits({"nofile": 1024, "core": 0})),
            ("setuid", lambda: isolation.change_identity(65534, 65534)),
            ("no_new_privs", isolation.no_new_privs),
            ("seccomp", isolation.load_seccomp),
        ]
        code = 0
        try:
            for name, step in steps:
                t = time.perf_counter_ns()
                step()
                took[name] = (time.perf_counter_ns() - t) / 1000
        except Exception as exc:  # reported, not raised: this is a forked child
            took["error"] = repr(exc)  # type: ignore[assignment]
            code = 1
        os.write(write_fd, json.dumps(took).encode())
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        took = json.loads(f.read() or b"{}")
    os.waitpid(pid, 0)
    t1 = time.perf_counter_ns()
    cgroup.kill()
    removed = cgroup.remove()
    took["cgroup kill + remove (control plane)"] = (time.perf_counter_ns() - t1) / 1000
    took["cgroup create (control plane)"] = made_us
    if not removed:
        took["error"] = "cgroup not removed"  # type: ignore[assignment]
    return took


def measure_steps(runs: int) -> dict[str, Any]:
    from supervisor.control.cgroups import CgroupTree, Unavailable
    from worker import isolation

    isolation.seccomp_module()  # imported before the children give up root (as a worker has it before)
    tree = CgroupTree.detect(f"ca-bench-{os.getpid()}")
    if isinstance(tree, Unavailable):
        return {"error": tree.reason}
    samples: dict[str, list[float]] = {}
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ca-bench-iso-") as tmp:
        keep = os.path.join(tmp, "run")
        os.mkdir(keep)
        try:
            for _ in range(runs):
                time.sleep(GAP_S)  # apart, as starts are: see the note on "join cgroup"
                took = time_steps(tree, str(ROOT / "examples" / "hello"), keep)
                if "error" in took:
                    errors.append(str(took.pop("error")))
                for name, us in took.items():
                    samples.setdefault(name, []).append(us)
        finally:
            tree.close()
    return {"runs": runs, "errors": errors,
            "steps": {name: {"p50_us": statistics.median(v), "p90_us": pct(sorted(v), 90)}
                      for name, v in samples.items()}}


# ---- the report --------------------------------------------------------------------------------------


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = ["## Isolation: what it costs", "",
             f"`bench/isolation.py{' --quick' if r['quick'] else ''}`, {m['date_utc']}, commit {m['git']}; "
             f"{m['cpu_model']}, {m['nproc']} cores, {m['memory']}, kernel {m['kernel']}, Python {m['python']}. "
             "One round on a noisy machine: treat differences under ~10 % (or 0.1 ms) as noise.", ""]
    start = r.get("start")
    if start:
        fns = start["functions"]
        lines += ["### Worker start (decision to start -> initialized and connected)", "",
                  "| function | mode | n | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
        for name, f in fns.items():
            lines.append(f"| {name.rsplit('-', 1)[0]} | {f['mode']} | {f['n']} | {f['p50_ms']:.2f} | "
                         f"{f['p99_ms']:.2f} | {f['max_ms']:.2f} |")
        lines.append("")
        for mode in ("fork", "spawn"):
            iso, bare = fns.get(f"isolated-{mode}"), fns.get(f"bare-{mode}")
            if iso and bare:
                delta = iso["p50_ms"] - bare["p50_ms"]
                goal = (f" (goal: under {GOAL_FORK_DELTA_MS:g} ms: {common.verdict(delta < GOAL_FORK_DELTA_MS)})"
                        if mode == "fork" else "")
                lines.append(f"- isolation adds **{delta:+.2f} ms** at p50 to a {mode}ed start{goal}")
        lines += ["", "A forked worker is born in its cgroup (its seed waits there, having moved in after the "
                  "previous clone) and inherits the rest of its sandbox from the seed, which set it up once: "
                  "what is left is the control plane making the cgroup. A spawned worker does every step "
                  "itself, including the move into its cgroup; the mount namespace is in both rows (root gets "
                  "it always), its cost is in the steps table.", ""]
    lat = r.get("latency")
    if lat:
        lines += ["### Invocation latency (sequential, keep-alive, trivial handler; median of the rounds)", "",
                  "| function | n | p50 µs | p99 µs | errors |", "|---|---|---|---|---|"]
        for kind in ("isolated", "bare"):
            f = lat[kind]
            lines.append(f"| {kind} | {f['n']} | {f['p50_us']:.0f} | {f['p99_us']:.0f} | {f['errors']} |")
        lines += ["", f"- isolation adds **{lat['isolated']['p50_us'] - lat['bare']['p50_us']:+.0f} µs** at p50 "
                  "(a seccomp filter on every syscall the worker makes, memory-cgroup accounting and the CPU quota's bookkeeping; not separated here)", ""]
    codes = {**(start or {}).get("exit_codes", {}), **{f"latency-{k}": v for k, v in (lat or {}).get(
        "exit_codes", {}).items()}}
    if any(codes.values()):
        lines += [f"Supervisors that did not exit 0 on SIGTERM: {codes}", ""]
    steps = r.get("steps")
    if steps and "steps" in steps:
        lines += [f"### Each step (µs, {steps['runs']} fresh children)", "", "| step | p50 | p90 |", "|---|---|---|"]
        for name, v in steps["steps"].items():
            lines.append(f"| {name} | {v['p50_us']:.0f} | {v['p90_us']:.0f} |")
        if steps["errors"]:
            lines.append(f"\nErrors: {steps['errors'][:3]}")
        lines += ["", "\"join cgroup\" is a move between cgroups, which waits for an RCU grace period unless "
                  "another move happened moments before: that is why a seed moves into the next worker's "
                  "cgroup after a clone, off the start's path, instead of each clone moving itself.", ""]
    elif steps:
        lines += [f"Steps not measured: {steps.get('error')}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        say("isolation needs root: as another user workers keep the supervisor's uid and there is nothing to compare")
        return 1
    common.clean_up_on_exit()
    n, warmup = (15, 3) if args.quick else (60, 5)
    r: dict[str, Any] = {"quick": args.quick, "machine": pools.describe_machine()}
    with tempfile.TemporaryDirectory(prefix="ca-bench-isolation-") as tmp:
        work = Path(tmp)
        say("start: isolated vs bare, fork and spawn")
        r["start"] = measure_start(work, n, warmup, 5.0 if args.quick else 10.0)
        say("latency: isolated vs bare")
        r["latency"] = measure_latency(work, 2 if args.quick else 6, 500 if args.quick else 2000)
    say("steps")
    r["steps"] = measure_steps(15 if args.quick else 60)
    section = render(r)
    print(section)
    if args.write:
        say(f"{pools.write_section(section, RESULTS, START_MARK, END_MARK)} the section in {RESULTS}")
    failed = sum(sum(f["errors"].values()) + f["missing"] for f in r["start"]["functions"].values())
    failed += sum(r["latency"][k]["errors"] for k in ("isolated", "bare"))
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
