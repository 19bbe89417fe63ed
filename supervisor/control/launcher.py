"""Starting, watching and killing worker processes (the I/O half of pools).

Rules:
- Workers are started with ``posix_spawn`` (vfork + exec in glibc): the
  control plane runs gRPC threads, and forking a threaded process without
  exec is never safe. Only the seed forks; this process never does.
- Each worker is its own session and process group, so a kill reaches
  everything it started; when the worker ends, what is left of its group is
  killed before the worker is reaped (its zombie pins the group id, so the
  kill cannot reach a stranger). Its spec, with the one-time credential, travels on
  fd 3 (a pipe), never in argv or the environment.
- The environment is built, not inherited: the function's ``env``, FC's
  documented variables and the few the runtime needs. Nothing else of the
  supervisor's environment reaches user code.
- Python workers are forked by their function's seed when it runs
  (``seeds.py``); this module then only reaps and signals them.
- Exits are observed through a pidfd on the event loop (no SIGCHLD handler,
  no polling) and reaped here with ``waitpid`` on that pid only.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.config import FunctionConfig

# -P: the working directory (the function's code dir) is not put on sys.path,
# so nothing there can stand in for a module this process imports as root.
# This is how custom, lambda and scf runtimes start: no user Python runs there.
WORKER_ARGV = [sys.executable, "-P", "-m", "worker.main"]
# A Python function's processes (worker, seed, handler check) start through
# worker/boot.py with -S -P: the standard library and the worker's own code,
# never the supervisor's site-packages (worker/boot.py, worker/python/paths.py).
BOOT = str(Path(__file__).resolve().parents[2] / "worker" / "boot.py")


def python_argv(module: str) -> list[str]:
    """argv of a Python function's process running ``module`` (worker.main, worker.seed, worker.check)."""
    return [sys.executable, "-S", "-P", BOOT, module]
SPEC_FD = 3
# Variables of the supervisor's own environment a worker may see.
PASSTHROUGH_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH")
RESET_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT)


@dataclass(slots=True)
class ExitStatus:
    code: int | None  # exit code, or None when killed by a signal or unknown
    signal: int | None

    def describe(self) -> str:
        if self.signal is not None:
            try:
                return f"killed by {signal.Signals(self.signal).name}"
            except ValueError:
                return f"killed by signal {self.signal}"
        return f"exited with code {self.code}" if self.code is not None else "exited"


@dataclass(slots=True)
class Process:
    pid: int
    stdout_fd: int
    stderr_fd: int
    started_at: float = field(default_factory=time.monotonic)
    exit: ExitStatus | None = None


def worker_env(function: FunctionConfig, instance_id: str, base: Mapping[str, str]) -> dict[str, str]:
    env = {key: base[key] for key in PASSTHROUGH_ENV if key in base}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    memory_mb = (function.limits.memory or 0) // (1024 * 1024)
    env.update({
        "FC_FUNCTION_NAME": function.name,
        "FC_FUNCTION_HANDLER": function.handler or "",
        "FC_FUNCTION_MEMORY_SIZE": str(memory_mb),
        "FC_FUNCTION_TIMEOUT": str(int(function.timeout)),
        "FC_INSTANCE_ID": instance_id,
        "FC_RUNTIME": function.runtime,
        "PYTHONUNBUFFERED": "1",
        "HOME": base.get("HOME", "/tmp") if os.geteuid() != 0 else "/tmp",
    })
    env.update(function.env)
    return env


def spawn(spec: Mapping[str, Any], env: Mapping[str, str], cwd: str) -> Process:
    """Starts ``python -m worker.main`` with ``spec`` on fd 3."""
    spec_r, spec_w = os.pipe()
    try:
        argv = python_argv("worker.main") if spec.get("runtime", "python") == "python" else WORKER_ARGV
        process = spawn_with_fd(argv, env, cwd, spec_r)
    except BaseException:
        os.close(spec_w)
        raise
    finally:
        os.close(spec_r)
    payload = json.dumps(dict(spec)).encode()
    try:
        os.write(spec_w, payload)  # small: fits the pipe buffer, never blocks
    except OSError:
        pass  # the worker died already; its exit is observed like any other
    finally:
        os.close(spec_w)
    return process


def spawn_with_fd(argv: list[str], env: Mapping[str, str], cwd: str, fd3: int) -> Process:
    """Starts ``argv`` in its own session, stdin /dev/null, stdout/stderr on new
    pipes (returned), and ``fd3`` as its file descriptor 3. The caller keeps
    (and closes) ``fd3``."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    moved = -1
    try:
        if fd3 == SPEC_FD:  # dup2 onto itself would keep close-on-exec
            moved = fd3 = os.dup(fd3)
        pid = os.posix_spawn(
            argv[0], argv, dict(env),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
                (os.POSIX_SPAWN_DUP2, fd3, SPEC_FD),
            ],
            setsid=True, setsigdef=RESET_SIGNALS, setsigmask=(),
        )
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (out_w, err_w):
            os.close(fd)
        if moved >= 0:
            os.close(moved)
    return Process(pid=pid, stdout_fd=out_r, stderr_fd=err_r)


def watch_exit(process: Process, on_exit: Callable[[Process], None], kill_group: bool = False) -> None:
    """Calls ``on_exit`` (on the loop) once the process has ended and is reaped.

    With ``kill_group`` (a worker, which leads its own process group), what
    is left of its group is killed before it is reaped: a worker and the
    processes it started are one unit.
    """
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        process.exit = _reap(process.pid)
        loop.call_soon(on_exit, process)
        return

    def readable() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if kill_group:
            # Still a zombie, it keeps its pid and group id from being reused:
            # whatever it started and left behind in its group dies with it.
            _kill_group(process.pid)
        process.exit = _reap(process.pid)
        on_exit(process)

    loop.add_reader(pidfd, readable)


def _reap(pid: int) -> ExitStatus:
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # not our child (adopted) or reaped elsewhere
        return ExitStatus(None, None)
    if os.WIFSIGNALED(status):
        return ExitStatus(None, os.WTERMSIG(status))
    return ExitStatus(os.waitstatus_to_exitcode(status), None)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def signal_group(pid: int, sig: int) -> None:
    """Signals the worker's whole process group (it leads its own session)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
