"""What bench/run.py and bench/pools.py share: started processes and their clean-up, CPU accounting, small helpers.

Both scripts run as ``.venv/bin/python bench/<script>.py``, which puts bench/ on sys.path: they import
this module as ``common``.

Every process started through :class:`Managed` lives in its own session, carries this run's tag in its
environment and is stopped (SIGTERM, then SIGKILL to its group and every descendant seen, with a
deadline) on exit, on error and on the signals :func:`clean_up_on_exit` turns into KeyboardInterrupt.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a dependency of the project
    psutil = None  # type: ignore[assignment]

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BODY = b'{"name":"bench","n":42}'
TAG_VAR = "CA_SUPERVISOR_BENCH_TAG"
TAG = uuid.uuid4().hex
NCPU = os.cpu_count() or 1
# bench/pools.py's section of RESULTS.md, which bench/run.py carries over when it rewrites the file
POOLS_START, POOLS_END = "<!-- pools:start -->", "<!-- pools:end -->"
# bench/run.py's raw results; other scripts keep theirs under a top-level key of their own (save_results_part)
RESULTS_JSON = BENCH / "results.json"

_say_file: TextIO | None = None  # None: sys.stdout


def say_to(file: TextIO) -> None:
    """Where `say` (and the clean-up's messages) go from now on; stdout until called."""
    global _say_file
    _say_file = file


def say(*parts: Any) -> None:
    print(*parts, file=_say_file, flush=True)


# ---------------------------------------------------------------------------
# processes: every one in its own session, all stopped on the way out
# ---------------------------------------------------------------------------


class Managed:
    """A started process tree: the child, its process group, and every descendant seen."""

    stop_grace = 10.0  # default deadline of stop()
    cleanup_grace = 8.0  # deadline when cleanup_all() stops it
    term_group = True  # SIGTERM to the whole group; False: to the child only (it stops its own descendants)

    def __init__(self, name: str, argv: list[str], *, stdout: Any = subprocess.DEVNULL,
                 stderr: Any = subprocess.STDOUT, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None) -> None:
        self.name = name
        env = dict(os.environ if env is None else env)
        env[TAG_VAR] = TAG
        self.started = time.perf_counter()
        self.started_wall = time.time()
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                      env=env, cwd=cwd, start_new_session=True)
        self.pid = self.popen.pid
        self.known: dict[int, Any] = {}
        self.stopped = False
        self.exit_code: int | None = None
        self.killed = False  # stop() had to SIGKILL
        self.leftovers: list[int] = []  # descendants still alive after the child exited (killed)
        RUNNING.append(self)

    def snapshot(self) -> list[Any]:
        """Remembers (and returns) the current processes of the tree (they may live in other sessions)."""
        if psutil is None:
            return []
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        for proc in procs:
            self.known.setdefault(proc.pid, proc)
        return procs

    def tree(self) -> list[Any]:
        """Live processes of the tree, every one seen so far (for CPU accounting)."""
        self.snapshot()
        return self._alive(self.known.values())

    def alive(self) -> bool:
        return self.popen.poll() is None

    @staticmethod
    def _alive(procs: Iterable[Any]) -> list[Any]:
        out = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
            except psutil.Error:
                pass
        return out

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM, wait up to `grace`; then SIGKILL the group and every descendant seen."""
        if self.stopped:
            return self.popen.returncode
        self.stopped = True
        grace = self.stop_grace if grace is None else grace
        self.snapshot()
        deadline = time.monotonic() + grace
        try:
            if self.term_group:
                os.killpg(self.pid, signal.SIGTERM)
            else:
                os.kill(self.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        left = self._alive(proc for pid, proc in self.known.items() if pid != self.pid)
        if psutil is not None and left:
            _, left = psutil.wait_procs(left, timeout=max(0.5, deadline - time.monotonic()))
        if self.popen.poll() is None or left:
            self.killed = True
            say(f"  [{self.name}] did not stop within {grace:.0f}s: SIGKILL to its group and {len(left)} descendant(s)")
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            for proc in left:
                try:
                    proc.kill()  # psutil checks that the pid was not reused
                except psutil.Error:
                    pass
        self.leftovers = [p.pid for p in left]
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            say(f"  [{self.name}] pid {self.pid} still not reaped")
        self.exit_code = self.popen.returncode
        if self in RUNNING:
            RUNNING.remove(self)
        return self.exit_code


RUNNING: list[Managed] = []


def sweep_tagged() -> int:
    """Last resort: kill any process still carrying this run's tag in its environment."""
    if psutil is None:
        return 0
    me, killed = os.getpid(), 0
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(TAG_VAR) == TAG:
                say(f"  cleanup: pid {proc.pid} still alive: {' '.join(proc.cmdline())[:120]}")
                proc.kill()
                killed += 1
        except psutil.Error:
            pass
    return killed


def cleanup_all() -> None:
    """Stops every process started here that still runs, then sweeps the tagged ones."""
    # A second Ctrl-C must not abandon the clean-up half way; every step has a deadline.
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
    try:
        for managed in reversed(list(RUNNING)):
            try:
                managed.stop(grace=managed.cleanup_grace)
            except Exception as exc:  # keep cleaning up the others
                say(f"  cleanup of {managed.name} failed: {exc!r}")
        killed = sweep_tagged()
        if killed:
            say(f"  cleanup: killed {killed} stray process(es) tagged by this run")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def clean_up_on_exit(signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)) -> None:
    """cleanup_all() at exit; `signals` raise KeyboardInterrupt (so `finally` blocks run) instead of killing."""
    for sig in signals:
        signal.signal(sig, _on_signal)
    atexit.register(cleanup_all)


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path | None, lines: int = 15) -> str:
    """The last lines of a log file; "" when there is none."""
    if path is None or not path.exists():
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 8192))
            return b"\n".join(fh.read().splitlines()[-lines:]).decode(errors="replace")
    except OSError:
        return ""


def pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def run_text(argv: list[str], timeout: float = 15) -> str:
    """A command's stdout, stripped; "" when it could not run."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine(packages: Sequence[str], python: str = "",
            dirty_note: str = " (uncommitted changes in the work tree)") -> dict[str, Any]:
    """The machine, the versions of `packages` and the commit a run measured (for the report)."""
    model, mem = "?", "?"
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        kib = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal"))
        mem = f"{kib / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in packages:
        try:
            from importlib.metadata import version
            versions[pkg] = version(pkg)
        except Exception:
            versions[pkg] = "-"
    commit = run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = run_text(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {"nproc": NCPU, "affinity": len(os.sched_getaffinity(0)), "cpu_model": model, "memory": mem,
            "kernel": platform.release(), "python": python or platform.python_version(), "versions": versions,
            "git": (commit or "?") + (dirty_note if dirty else ""),
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def save_results_part(key: str, value: Any, path: Path = RESULTS_JSON) -> None:
    """Puts one script's results under `key` of bench/results.json, keeping every other key as it was."""
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def carry_over_results(new: dict[str, Any], path: Path = RESULTS_JSON) -> dict[str, Any]:
    """`new` plus every top-level key of the existing results.json that `new` lacks (other scripts' parts)."""
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        old = {}
    return {**new, **{k: v for k, v in old.items() if k not in new}} if isinstance(old, dict) else new


# ---------------------------------------------------------------------------
# CPU accounting: how busy was the machine with things that are not this benchmark
# ---------------------------------------------------------------------------


def _busy_seconds() -> float:
    """Busy CPU seconds summed over all CPUs, from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _label(proc: Any) -> str:
    """A short name for a process of a target: `-m module`, the script, or the executable."""
    try:
        argv = proc.cmdline()
    except psutil.Error:
        return "?"
    if "-m" in argv[:-1]:
        return str(argv[argv.index("-m") + 1])
    for arg in argv[1:3]:
        if arg and not arg.startswith("-"):
            name = os.path.basename(arg)
            return f"{name} {argv[argv.index(arg) + 1]}" if name == "supervisor" and len(argv) > 2 else name
    return os.path.basename(argv[0]) if argv else "?"


def _tree_cpu(trees: Sequence[Managed], reaped: bool) -> dict[int, tuple[str, float]]:
    """CPU seconds (and a short name) per process of the trees; with `reaped`, with what each has reaped."""
    out: dict[int, tuple[str, float]] = {}
    if psutil is None:
        return out
    for managed in trees:
        for proc in managed.snapshot() if reaped else managed.tree():
            try:
                t = proc.cpu_times()
                used = t.user + t.system + (t.children_user + t.children_system if reaped else 0.0)
                out[proc.pid] = (_label(proc), used)
            except psutil.Error:
                pass
    return out


class CpuWatch:
    """CPU used during a test by the target trees, by this client (and its children) and by everything else.

    Approximate, from /proc/stat. With `reaped`, a process of a tree counts what it has reaped (spent
    workers), and one gone since the start has its CPU taken back (its reaper counts it now).
    """

    def __init__(self, trees: Sequence[Managed], reaped: bool = False) -> None:
        self.trees = trees
        self.reaped = reaped
        self.result: dict[str, Any] = {}

    def __enter__(self) -> CpuWatch:
        self.load = os.getloadavg()[0]
        self.t0 = time.monotonic()
        self.busy0 = _busy_seconds()
        self.me0 = sum(os.times()[:4])
        self.tree0 = _tree_cpu(self.trees, self.reaped)
        return self

    def __exit__(self, *exc: Any) -> None:
        elapsed = max(1e-6, time.monotonic() - self.t0)
        total = _busy_seconds() - self.busy0
        tree1 = _tree_cpu(self.trees, self.reaped)
        per: dict[str, float] = {}
        for pid, (label, v) in tree1.items():
            per[label] = per.get(label, 0.0) + v - self.tree0.get(pid, (label, 0.0))[1]
        if self.reaped:
            for pid, (label, v) in self.tree0.items():
                if pid not in tree1:
                    per[label] = per.get(label, 0.0) - v
        target = sum(per.values())
        client = sum(os.times()[:4]) - self.me0  # this process and what it reaped (wrk, CLI calls)
        other = max(0.0, total - max(0.0, target) - client)
        self.result = {
            "elapsed_s": round(elapsed, 3),
            "loadavg1_before": round(self.load, 2),
            "machine_busy_cores": round(total / elapsed, 2),
            "target_cores": round(target / elapsed, 2),
            "client_cores": round(client / elapsed, 2),
            "other_cores": round(other / elapsed, 2),
            "other_pct": round(100 * other / elapsed / NCPU, 1),
            "target_processes": {k: round(v / elapsed, 2)
                                 for k, v in sorted(per.items(), key=lambda kv: kv[1], reverse=True)},
        }


def wait_for_quiet(trees: Sequence[Managed], max_wait: float, threshold_cores: float = 0.25,
                   reaped: bool = False) -> dict[str, Any]:
    """Waits (up to max_wait s) for a 1-second window in which other processes use < threshold cores."""
    t0 = time.monotonic()
    while True:
        with CpuWatch(trees, reaped) as watch:
            time.sleep(1.0 if max_wait > 0 else 0.2)
        other = watch.result["other_cores"]
        waited = time.monotonic() - t0
        if other < threshold_cores or waited >= max_wait:
            return {"waited_s": round(waited, 1), "other_cores": other, "quiet": other < threshold_cores}

