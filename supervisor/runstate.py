"""The run directory: the files a running supervisor leaves for the CLI and its planes.

This module is the single owner of the file names in `run_dir` and of the
format of `supervisor.json`; nothing else spells them out. The rules:

* `supervisor.lock`: the supervisor holds an exclusive `flock` on it for its
  whole life (`hold_lock`). The kernel drops the lock when the process dies,
  however it dies, so "the lock is held" is the one fact that cannot go
  stale. A pid in a file can: pids are reused, and a SIGKILLed supervisor
  never cleans up.
* `supervisor.json`: what the supervisor is doing, rewritten atomically on
  every change (`write_state`: a temporary file in the same directory, then
  `os.replace`), so a reader sees the old or the new document, never half of
  one. Its shape:

      {"pid": int, "ca_port": int, "host": str, "metrics_port": int,
       "config": str, "state": "starting"|"running"|"draining"|"stopping",
       "components": [{"name": "control-plane"|"data-plane"|"seed:<fn>",
                       "pid": int|null,
                       "state": "starting"|"running"|"backoff"|"exited"|"fatal",
                       "restarts": int, "started_monotonic": float|null}]}

  `started_monotonic` is the supervisor's `time.monotonic()` when it started
  the component; CLOCK_MONOTONIC is system-wide, so any process on the host
  computes the uptime as `time.monotonic() - started_monotonic`.
* `control.sock` (the control plane's gRPC server, mode 0600) and
  `worker.sock` (where workers dial the data plane).
* `marks.fifo` (mode 0600): the data plane tells the control plane which
  invocation runs on which worker, for FC's markers (`supervisor.marks`).
* A supervisor is alive only when all three agree (`supervisor_alive`): the
  state file exists, its pid is alive, and the lock is held.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from supervisor.config import Config

LOCK_NAME = "supervisor.lock"
STATE_NAME = "supervisor.json"
ACCEPTED_CONFIG_NAME = "config.accepted.json"
SEEDS_NAME = "seeds.json"
CONTROL_SOCK_NAME = "control.sock"
WORKER_SOCK_NAME = "worker.sock"
MARKS_FIFO_NAME = "marks.fifo"

# Readable by everyone: the state file holds no secrets, and an operator's
# `supervisor status` may run as another user than the supervisor.
STATE_MODE = 0o644


@dataclass(frozen=True)
class RunPaths:
    """Where the files of one supervisor's run directory live."""

    run_dir: Path

    def __post_init__(self) -> None:
        # Absolute once, so a later chdir cannot change what the paths mean
        # and the gRPC target is valid from any working directory.
        object.__setattr__(self, "run_dir", Path(self.run_dir).expanduser().absolute())

    @property
    def lock(self) -> Path:
        return self.run_dir / LOCK_NAME

    @property
    def state(self) -> Path:
        return self.run_dir / STATE_NAME

    @property
    def control_sock(self) -> Path:
        return self.run_dir / CONTROL_SOCK_NAME

    @property
    def worker_sock(self) -> Path:
        return self.run_dir / WORKER_SOCK_NAME

    @property
    def marks_fifo(self) -> Path:
        return self.run_dir / MARKS_FIFO_NAME

    @property
    def accepted_config(self) -> Path:
        """The config a reload accepted (so a restarted plane runs it, not a newer edit)."""
        return self.run_dir / ACCEPTED_CONFIG_NAME

    @property
    def ctl_target(self) -> str:
        """The gRPC target of the control plane ("unix:/abs/path")."""
        return f"unix:{self.control_sock}"


def write_state(paths: RunPaths, data: dict[str, Any]) -> None:
    """Replace supervisor.json with `data`, atomically (readers never see a partial file)."""
    _write_json(paths.state, data, STATE_MODE)


def read_state(paths: RunPaths) -> dict[str, Any] | None:
    """supervisor.json as a dict; None when it is missing, unreadable or not a JSON object."""
    return _read_json(paths.state)


def stop_deadline(paths: RunPaths, grace_s: float) -> float:
    """When a stop that began now must be over (``time.monotonic()``, the same clock in
    every process): the supervisor's ``stop_deadline`` in supervisor.json, written
    when it began stopping, so that both planes spend one budget between them; else
    ``grace_s`` from now (a plane stopped by hand)."""
    state = read_state(paths) or {}
    deadline = state.get("stop_deadline")
    now = time.monotonic()
    if isinstance(deadline, (int, float)) and not isinstance(deadline, bool) and now - 3600 < deadline:
        return min(float(deadline), now + grace_s)
    return now + grace_s


def _write_json(target: Path, data: Any, mode: int) -> None:
    payload = (json.dumps(data, separators=(",", ":")) + "\n").encode()
    # Same directory as the target, so os.replace is a rename within one file
    # system (atomic); a unique name, so concurrent writers never share a file.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp creates 0600; fchmod states the mode outright, whatever the umask.
        os.fchmod(fd, mode)
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        # No fsync: these files describe a live run; after a power loss there
        # is no run left for them to describe.
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _read_json(source: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(source.read_bytes())
    except (OSError, ValueError):
        # ValueError covers bad JSON and bad UTF-8: a file we cannot read is
        # no evidence of anything.
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (zombies count: they are not reaped yet)."""
    if pid <= 0:
        return False  # 0 and negatives address process groups, not a process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; it just belongs to another user
    return True


def lock_held(paths: RunPaths) -> bool:
    """Whether some process holds a flock on supervisor.lock."""
    try:
        fd = os.open(paths.lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # no lock file: nobody ever started here (or it was cleaned)
    try:
        # A fresh open file description: flock conflicts with every other
        # description, including ones in this very process, so this also
        # answers correctly when called from inside the supervisor.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    else:
        # We got it, so nobody holds it exclusively; closing the fd drops our
        # probe at once, keeping the window in which a starting supervisor's
        # LOCK_EX|LOCK_NB could fail as short as possible.
        return False
    finally:
        os.close(fd)


def supervisor_alive(paths: RunPaths) -> bool:
    """True when the state file exists, its pid is alive and the lock is held."""
    state = read_state(paths)
    if state is None:
        return False
    pid = state.get("pid")
    # bool is an int subclass; a JSON `true` is not a pid.
    if not isinstance(pid, int) or isinstance(pid, bool) or not pid_alive(pid):
        return False
    return lock_held(paths)


class AlreadyRunning(RuntimeError):
    """Another supervisor holds the lock of this run directory."""


def hold_lock(paths: RunPaths) -> int:
    """Create the run dir if needed and take the exclusive lock; returns the fd to keep open.

    The lock lasts as long as the fd (and its duplicates across fork) stays
    open, so the supervisor keeps it for its whole life and never closes it.
    O_CLOEXEC keeps exec'd children (planes, workers) from inheriting it: a
    leaked worker must not make a dead supervisor look alive.
    """
    paths.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    # Workers (other users) connect to a socket here; none may add, replace or
    # remove a file in it (a socket of its own in place of the data plane's).
    st = paths.run_dir.stat()
    if st.st_uid == os.geteuid() and st.st_mode & 0o022:
        paths.run_dir.chmod(stat.S_IMODE(st.st_mode) & ~0o022)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise AlreadyRunning(f"another supervisor is running in {paths.run_dir}") from exc
        raise
    return fd


NOTIFY_ENV = "SUPERVISOR_NOTIFY_FD"
# A plane's exit code for a deterministic boot error (a config it refuses, a
# port it cannot bind): the supervisor declares FATAL instead of retrying.
EXIT_BOOT_ERROR = 2


def hide_notify_fd() -> None:
    """Keeps the READY pipe from being inherited by what this plane starts."""
    fd = os.environ.get(NOTIFY_ENV)
    if fd is not None:
        try:
            os.set_inheritable(int(fd), False)
        except (OSError, ValueError):
            pass


def run_plane(amain: Callable[[Path, Path | None], Coroutine[Any, Any, int]], config_path: Path, run_dir: Path | None,
              flush: Callable[[], None]) -> int:
    """One plane's life on uvloop, to its exit code: forked by the supervisor
    (``entry.main``) or started as ``python -m supervisor.<plane>.main CONFIG [RUN_DIR]``."""
    import uvloop

    hide_notify_fd()
    code: int = uvloop.run(amain(config_path, run_dir))
    flush()
    return code


def plane_argv(argv: list[str]) -> tuple[Path, Path | None]:
    """CONFIG [RUN_DIR] of a spawned plane."""
    return Path(argv[1]), Path(argv[2]) if len(argv) > 2 else None


def notify_ready() -> None:
    """A plane tells the supervisor it is up: READY on the inherited pipe."""
    fd = os.environ.pop(NOTIFY_ENV, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"READY\n")
        os.close(int(fd))
    except OSError:
        pass


def load_plane_config(config_path: Path, plane: str, run_dir: Path | None = None) -> Config | None:
    """A plane's config, or None (reported on stderr) when it is refused.

    When a reload has accepted a config during this run (it is kept in
    ``run_dir``), that one wins over the file: a plane restarted later runs
    what its sibling runs, even if the file was edited (or broken) since.
    """
    from supervisor.config import ConfigError, load_config, parse_config_text

    accepted = read_accepted_config(RunPaths(run_dir)) if run_dir is not None else None
    if accepted is not None:
        try:
            return parse_config_text(accepted["toml"], Path(accepted["base_dir"]), Path(accepted["path"]),
                                     generation=int(accepted["generation"]))
        except (ConfigError, KeyError, ValueError, TypeError) as exc:
            print(f"{plane}: ignoring the reloaded config in {ACCEPTED_CONFIG_NAME}: {exc}", file=sys.stderr)
    try:
        return load_config(config_path)
    except ConfigError as exc:
        print(f"{plane}: invalid configuration: {exc}", file=sys.stderr)
        return None


def write_accepted_config(paths: RunPaths, toml: str, base_dir: Path, path: Path, generation: int) -> None:
    """Atomically records the config a reload accepted (0600: its env may hold secrets)."""
    _write_json(paths.accepted_config, {"toml": toml, "base_dir": str(base_dir), "path": str(path),
                                        "generation": generation}, 0o600)


def read_accepted_config(paths: RunPaths) -> dict[str, Any] | None:
    return _read_json(paths.accepted_config)


def write_seed_restarts(paths: RunPaths, restarts: dict[str, int]) -> None:
    """The seeds' restart counts (component name -> count), for the data plane's metrics."""
    _write_json(paths.run_dir / SEEDS_NAME, restarts, STATE_MODE)


def read_seed_restarts(paths: RunPaths) -> dict[str, int]:
    document = _read_json(paths.run_dir / SEEDS_NAME) or {}
    return {str(k): v for k, v in document.items() if isinstance(v, int)}


def forget_accepted_config(paths: RunPaths) -> None:
    """A new run starts from the file (called by the supervisor before the planes start)."""
    for path in (paths.accepted_config, paths.run_dir / SEEDS_NAME):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
