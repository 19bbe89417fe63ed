#!/usr/bin/env python3
"""A Python worker's start, before and after it stopped importing the supervisor's packages (issue 12).

    .venv/bin/python bench/python_start.py                 # ~45 s, prints a Markdown section
    .venv/bin/python bench/python_start.py --write         # also into bench/RESULTS.md (python-start markers)
    .venv/bin/python bench/python_start.py --before REV    # the tree to compare with (default 254f32b)

Real ``supervisor run``s, "before" and "after" alternating for ``--rounds`` rounds (the machine's
noise falls on both): "before" is ``git archive REV`` unpacked in a temporary directory and run with
``PYTHONPATH`` pointing at it (same venv, same interpreter), "after" is this checkout. Each runs two disposable functions of bench/handlers/preloaded.py, one forked by
its seed (``seed = true``) and one spawned (``seed = false``), ``min_warm = 1``, ``concurrency = 1``:
every invocation spends a worker and the next one waits for its replacement, whose ``"worker
ready"`` line carries ``start_ms`` (decision to start -> initialized and connected). Measured:

- seed preload: the seed's ``"seed ready"`` line, ``preload_ms`` (the worker runtime and the
  function's module imported, once per seed);
- start: ``start_ms`` of each replacement, fork and spawn (the first ``--warmup`` not counted);
- what the worker had imported before the function's module: the module reports ``sys.modules``
  as it is imported (how many modules, and the top-level names outside the standard library and
  the worker's own ``worker``/``calink``).

One run on a shared machine: differences within the p50-p90 spread are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import pools
from common import BENCH, ROOT, Managed, free_port, pct, say

RESULTS = BENCH / "RESULTS.md"
START_MARK, END_MARK = "<!-- python-start:start -->", "<!-- python-start:end -->"
HANDLER = "preloaded:handler"

common.say_to(sys.stderr)


class Run(Managed):
    """``supervisor run`` of one source tree (its own cwd and PYTHONPATH)."""

    stop_grace, cleanup_grace, term_group = 20.0, 10.0, False

    def __init__(self, name: str, tree: Path, workdir: Path, pythonpath: str | None) -> None:
        workdir.mkdir(parents=True)
        self.ca_port = free_port()
        functions = {f"py-{mode}": pools.function_spec(HANDLER, seed, disposable=True, min_warm=1, max_workers=2,
                                                       concurrency=1)
                     for mode, seed in (("fork", True), ("spawn", False))}
        settings = {"ca_port": self.ca_port, "metrics_port": free_port(), "host": "127.0.0.1",
                    "run_dir": str(workdir / "run"), "grace_period": "5s", "default_function": "py-fork"}
        lines = ["[supervisor]"] + [f"{k} = {pools.toml_value(v)}" for k, v in settings.items()]
        for fname, spec in functions.items():
            lines += [f"\n[functions.{fname}]"] + [f"{k} = {pools.toml_value(v)}" for k, v in spec.items()]
        config = workdir / "supervisor.toml"
        config.write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items() if k not in ("FC_SERVER_PORT", "CA_PORT", "SUPERVISOR_RUN_DIR",
                                                                 "SUPERVISOR_CONFIG", "SUPERVISOR_METRICS_PORT")}
        env.pop("PYTHONPATH", None)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        self.functions = list(functions)
        self.log_path = workdir / "stdout.jsonl"
        with open(self.log_path, "wb") as out:
            super().__init__(name, [pools.PYTHON, "-m", "supervisor.cli", "run", "--config", str(config)],
                             stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(tree))
        self.log = pools.LogTail(self.log_path)

    def ready_lines(self, event: str, function: str) -> list[dict[str, Any]]:
        return [ln for ln in self.log.read() if ln.get("event") == event and ln.get("function") == function]


def measure(run: Run, n: int, warmup: int) -> dict[str, Any]:
    """One run's raw figures: start_ms per function, what its module saw, the seeds' preload_ms."""
    invoke = pools.Invoker(run.ca_port)
    seen: dict[str, list[dict[str, Any]]] = {"seed ready": [], "worker ready": []}

    def read() -> None:
        for line in run.log.read():
            if line.get("event") in seen:
                seen[str(line["event"])].append(line)

    def ready_count(fname: str) -> int:
        read()
        return sum(1 for ln in seen["worker ready"] if ln.get("function") == fname)

    for fname in run.functions:
        pools.wait_until(lambda f=fname: ready_count(f) >= 1, 60, f"{run.name}: a first ready {fname} worker")
    out: dict[str, Any] = {}
    for fname in run.functions:
        starts: list[float] = []
        modules: dict[str, Any] = {}
        for i in range(warmup + n):
            before = ready_count(fname)
            status, body = invoke(fname)
            if status != 200:
                raise RuntimeError(f"{run.name}: {fname} answered {status}: {body[:300]!r}")
            modules = json.loads(body)
            pools.wait_until(lambda f=fname, b=before: ready_count(f) > b, 15,
                             f"{run.name}: the replacement of a spent {fname} worker", interval=0.002)
            if i >= warmup:
                mine = [ln for ln in seen["worker ready"] if ln.get("function") == fname]
                starts.append(float(mine[before].get("start_ms", "nan")))
        modes = {str(ln.get("mode")) for ln in seen["worker ready"] if ln.get("function") == fname}
        out[fname] = {"start_ms": starts, "modes": sorted(modes), "modules": modules["modules"],
                      "outside": modules["outside"]}
    read()
    out["seed_preload_ms"] = [float(ln.get("preload_ms", "nan")) for ln in seen["seed ready"]]
    invoke.close()
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds of one tree together."""
    out: dict[str, Any] = {"seed_preload_ms": [v for r in runs for v in r["seed_preload_ms"]]}
    for fname in ("py-fork", "py-spawn"):
        values = sorted(v for r in runs for v in r[fname]["start_ms"])
        out[fname] = {"n": len(values), "p50_ms": pct(values, 50), "p90_ms": pct(values, 90),
                      "mean_ms": statistics.fmean(values), "modes": sorted({m for r in runs for m in r[fname]["modes"]}),
                      "modules": runs[-1][fname]["modules"], "outside": runs[-1][fname]["outside"]}
    return out


def unpack(rev: str, into: Path) -> Path:
    tree = into / "before"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True,
                             check=True, timeout=60).stdout
    tar_path = into / "before.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(tree, filter="data")
    return tree


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    out = ["## A Python worker's start: the standard library only (issue 12)\n",
           f"`.venv/bin/python bench/python_start.py -n {r['n']} --rounds {r['rounds']}`, {m['date_utc']}, commit {m['git']}, "
           f"before = `{r['before_rev']}`; {m['cpu_model']}, {m['nproc']} cores, kernel {m['kernel']}, "
           f"Python {m['python']}. Real supervisors; a replacement's `start_ms` (decision "
           f"-> initialized and connected) over {r['rounds']} x {r['n']} starts per mode (before and after "
           f"alternating, {r['warmup']} warm-up each); the seed's `preload_ms` (runtime + the function's module, "
           "once per seed, one per round). A shared machine: differences within the p50-p90 spread are noise.\n",
           "| tree | seed preload | fork start p50 / p90 | spawn start p50 / p90 | modules before the function's "
           "(fork / spawn) | outside the standard library and worker/calink |",
           "|---|---|---|---|---|---|"]
    for label in ("before", "after"):
        x = r[label]
        fork, spawn = x["py-fork"], x["py-spawn"]
        preload = f"{statistics.median(x['seed_preload_ms']):.0f} ms (median of {len(x['seed_preload_ms'])})"
        outside = sorted(set(fork["outside"]) | set(spawn["outside"]))
        out.append(f"| {label} | {preload} | {fork['p50_ms']:.1f} / {fork['p90_ms']:.1f} ms | "
                   f"{spawn['p50_ms']:.1f} / {spawn['p90_ms']:.1f} ms | {fork['modules']} / {spawn['modules']} | "
                   f"{len(outside)}: {', '.join(outside) or 'none'} |")
    b, a = r["before"], r["after"]
    out.append(f"\nBefore its module, a Python worker now has {b['py-spawn']['modules'] - a['py-spawn']['modules']} "
               "fewer modules (spawned) and none outside the standard library and its own runtime: no site-packages "
               "`.pth` hook (`_distutils_hack`), no `supervisor` package, protobuf, structlog, orjson, pyseccomp or "
               "uvloop (a function that wants uvloop ships it and sets `event_loop = \"uvloop\"`). A spawned worker "
               f"starts in {a['py-spawn']['p50_ms']:.0f} ms p50 instead of {b['py-spawn']['p50_ms']:.0f} ms; a forked "
               "one costs what it did (the seed imported everything once either way; its own start is the clone, "
               "the loop and the link), within this machine's noise. The seed's preload is the runtime's import "
               "cost plus a trivial module.\n")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="254f32b", help="the revision to compare with (default %(default)s)")
    ap.add_argument("-n", type=int, default=20, help="starts measured per mode, tree and round (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=4, help="before/after alternations (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="starts not counted (default %(default)s)")
    ap.add_argument("--write", action="store_true", help=f"put the section into {RESULTS.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    common.clean_up_on_exit()
    work = Path(tempfile.mkdtemp(prefix="ca-supervisor-pystart-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    r: dict[str, Any] = {"machine": pools.describe_machine(), "n": args.n, "warmup": args.warmup,
                         "rounds": args.rounds, "before_rev": args.before}
    raw: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    t0 = time.monotonic()
    try:
        before_tree = unpack(args.before, work)
        for round_ in range(args.rounds):
            for label, tree, pythonpath in (("before", before_tree, str(before_tree)), ("after", ROOT, None)):
                say(f"round {round_ + 1}, {label}: {tree}")
                run = Run(label, tree, work / f"run-{label}-{round_}", pythonpath)
                try:
                    raw[label].append(measure(run, args.n, args.warmup))
                finally:
                    run.stop()
        for label, runs in raw.items():
            r[label] = summarize(runs)
            say(f"  {label}: {json.dumps(r[label])}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section = render(r)
    print(section)
    if args.write:
        pools.write_section(section, RESULTS, START_MARK, END_MARK)
    say(f"done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
