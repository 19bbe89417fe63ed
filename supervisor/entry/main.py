"""``supervisor run``: the PID-1 process that keeps the two planes alive.

Small and single-threaded, never on the request path. It:
- refuses a bad config before starting anything (exit 2);
- holds ``run_dir/supervisor.lock`` so a second supervisor on the same
  run_dir refuses to start (exit 1) instead of taking the sockets over;
- binds the CA port and the metrics port itself (``listeners.py``) and
  hands the listening sockets to every data plane it starts, so the ports
  outlive a data plane: connections made while one is replaced wait in the
  backlog for the next;
- starts the control plane and the data plane, and waits for both READY.
  It imports both planes' code once the config is accepted, and then forks
  each plane (it is single-threaded: nothing it imports starts a thread,
  which is checked, else the planes are spawned): the planes share those
  pages (~35 MiB less PSS than three interpreters) and start in ~20 ms
  instead of ~250 ms of imports each; a plane restarted later is forked
  again;
- reaps every child, and every orphan re-parented to it (it is PID 1 or a
  child subreaper), restarts a plane that dies (``components.py`` policy)
  and exits non-zero when one is FATAL;
- on SIGTERM/SIGINT drains in order: the data plane first (it stops taking
  invocations and waits for the in-flight ones), then the control plane
  (it stops the workers), then exits 0. The whole stop has one budget,
  ``grace_period``, written as ``stop_deadline`` in supervisor.json so
  that both planes spend it between them: at its end the data plane
  answers what still runs (503 ShuttingDownError) and the control plane
  kills the workers that did not stop; a plane still running after
  ``DATA_KILL_S`` / ``CONTROL_KILL_S`` more is killed, and the supervisor
  exits within ``grace_period`` + 1 s. A second signal is a fast shutdown
  with a budget of ``FAST_STOP_S``.

Signal handlers only record: ``signal.set_wakeup_fd`` writes each signal's
number into a pipe that the loop reads, and the loop acts.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import resource
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from supervisor import listeners as listening
from supervisor.config import Config, ConfigError, load_config
from supervisor.control.sandbox import check_config
from supervisor.entry.components import STARTUP_TIMEOUT_S, Component
from supervisor.logs import configure_logging, get_logger
from supervisor.runstate import NOTIFY_ENV, AlreadyRunning, RunPaths, forget_accepted_config, hold_lock, write_state

PR_SET_CHILD_SUBREAPER = 36
PR_SET_NAME = 15
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2)
FAST_STOP_S = 1.0
# Past the stop's deadline: when each plane is killed if still running, and when
# leftover processes are (the control plane kills its workers at deadline + 0.4 s).
DATA_KILL_S = 0.5
CONTROL_KILL_S = 0.8
LEFTOVER_KILL_S = 0.95
EXIT_FATAL = 1

log = get_logger()


class Supervisor:
    def __init__(self, config_path: Path, config: Config, paths: RunPaths, preloaded: bool = False,
                 listeners: dict[str, list[socket.socket]] | None = None) -> None:
        self.config = config
        # The CA and metrics ports' listening sockets, for the data plane; closed when stopping.
        self.listeners = listeners or {}
        self.config_path = config_path
        self.paths = paths
        python = sys.executable
        # The run_dir too: a plane restarted after a reload runs the accepted
        # config found there, even when the file has been broken since.
        run_dir = str(paths.run_dir)
        self.control = Component("control-plane", [python, "-m", "supervisor.control.main", str(config_path), run_dir])
        self.data = Component("data-plane", [python, "-m", "supervisor.data.main", str(config_path), run_dir])
        self.components = [self.control, self.data]
        # Forked (preload_planes ran) or spawned; either way the same plane code runs.
        self.preloaded = preloaded
        self.selector = selectors.DefaultSelector()
        self.notify: dict[int, Component] = {}  # read end of a READY pipe -> component
        self.state = "starting"
        self.stop_signals = 0
        self.stop_by: float | None = None  # the stop's budget ends (monotonic); planes read it from the state
        self.stop_deadline: float | None = None  # when the current stop phase's plane is killed
        self._stop_phase = "data"
        self.exit_code = 0

    # ---- the loop ----------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, lambda signum, frame: None)  # recorded by the wakeup fd
        self.selector.register(wake_r, selectors.EVENT_READ)
        # Both at once: the data plane attaches to the control plane with
        # retries, and workers dial the data plane with retries.
        for component in self.components:
            self._start(component)
        while True:
            timeout = self._next_timeout()
            for key, _ in self.selector.select(timeout):
                if key.fd == wake_r:
                    self._read_signals(wake_r)
                else:
                    self._read_notify(key.fd)
            self._reap()
            if self._tick():
                break
        self._write_state()
        return self.exit_code

    def _next_timeout(self) -> float:
        now = time.monotonic()
        deadlines = [c.next_start_at for c in self.components if c.state == "backoff" and c.next_start_at]
        deadlines += [c.started_at + STARTUP_TIMEOUT_S for c in self.components
                      if c.state == "starting" and c.started_at is not None]
        if self.stop_deadline is not None:
            deadlines.append(self.stop_deadline)
        if not deadlines:
            return 1.0
        return max(0.0, min(min(deadlines) - now, 1.0))

    def _tick(self) -> bool:
        """Acts on the current state; True when the supervisor should exit."""
        now = time.monotonic()
        if self.state in ("starting", "running"):
            for component in self.components:
                if component.state == "fatal":
                    log.critical("component is FATAL; shutting down", component=component.name,
                                 reason=component.fatal_reason)
                    self.exit_code = EXIT_FATAL
                    self._begin_stop(fatal=True)
                    return False
                if component.startup_overdue(now):
                    log.error("component not ready in time; killing it", component=component.name)
                    self._kill(component, signal.SIGKILL)
                if component.due(now):
                    component.restarts += 1
                    self._start(component)
            if self.state == "starting" and all(c.state == "running" for c in self.components):
                self.state = "running"
                log.info("supervisor running", ca_port=self.config.supervisor.ca_port,
                         metrics_port=self.config.supervisor.metrics_port, pid=os.getpid())
                self._write_state()
            return False
        return self._stop_progress(now)

    # ---- components ----------------------------------------------------------

    def _start(self, component: Component) -> None:
        notify_r, notify_w = os.pipe2(os.O_CLOEXEC)
        os.set_inheritable(notify_w, True)
        handed = self.listeners if component is self.data else {}
        handed_fds = listening.fds(handed)
        try:
            if self.preloaded:
                pid = self._fork_plane(component, notify_w, handed)
            else:
                env = dict(os.environ, **{NOTIFY_ENV: str(notify_w)}, PYTHONUNBUFFERED="1")
                if handed:
                    env[listening.LISTEN_FDS_ENV] = listening.encode(handed)
                for fd in handed_fds:  # inherited by this one child only (this loop is single-threaded)
                    os.set_inheritable(fd, True)
                # Own session: a terminal's Ctrl-C reaches only the supervisor, which
                # then stops the planes in the right order. No Popen: this loop reaps
                # every child itself with waitpid(-1).
                pid = os.posix_spawn(component.argv[0], component.argv, env, setsid=True,
                                     setsigdef=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD),
                                     file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)])
        except OSError as exc:
            os.close(notify_r)
            log.error("could not start component", component=component.name, error=str(exc))
            component.on_exit(None, time.monotonic(), restart=True)
            return
        finally:
            os.close(notify_w)
            for fd in handed_fds:
                os.set_inheritable(fd, False)
        component.on_started(pid, time.monotonic())
        self.notify[notify_r] = component
        self.selector.register(notify_r, selectors.EVENT_READ)
        log.info("component starting", component=component.name, pid=pid)
        self._write_state()

    def _fork_plane(self, component: Component, notify_w: int, handed: dict[str, list[socket.socket]]) -> int:
        """Forks a plane from this preloaded, single-threaded process: the planes
        share the imported modules' pages and skip ~200 ms of imports each."""
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()  # what is loaded now stays shared: collections in the planes leave it alone
        # Blocked across the fork: a signal must not reach the child while it still
        # has this loop's handlers and wakeup fd (it would be reported to the parent).
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            return pid
        code = 70
        try:  # the child: never returns into this loop
            os.setsid()
            signal.set_wakeup_fd(-1)
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            # Nothing of this loop's (selector, wakeup pipe, run_dir lock, the
            # other planes' READY pipes) reaches the plane; only its own READY
            # pipe, and the data plane the listening sockets.
            close_all_but({notify_w, *listening.fds(handed)})
            if handed:
                os.environ[listening.LISTEN_FDS_ENV] = listening.encode(handed)
            for socks in self.listeners.values():
                for sock in socks:
                    sock.detach()  # the plane makes its own objects; these must never close its fds
            os.environ[NOTIFY_ENV] = str(notify_w)
            os.environ["PYTHONUNBUFFERED"] = "1"
            _set_process_name(component.name)
            code = _plane_runner(component.name)(self.config_path, self.paths.run_dir)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _read_notify(self, fd: int) -> None:
        component = self.notify.get(fd)
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        if component is not None and data.startswith(b"READY"):
            component.on_ready(time.monotonic())
            log.info("component ready", component=component.name, pid=component.pid,
                     restarts=component.restarts)
            self._write_state()
        self.selector.unregister(fd)
        os.close(fd)
        self.notify.pop(fd, None)

    def _read_signals(self, fd: int) -> None:
        try:
            data = os.read(fd, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._on_stop_signal(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                # The control plane owns the config: it reloads, or refuses and says why.
                if self.state == "running" and self.control.pid and self.control.state == "running":
                    log.info("SIGHUP: asking the control plane to reload the config")
                    self._kill(self.control, signal.SIGHUP)
                else:
                    log.warning("SIGHUP while the supervisor or its control plane is not running; nothing reloaded",
                                state=self.state)
            elif signum in (signal.SIGUSR1, signal.SIGUSR2):
                log.info("signal ignored", signal=signal.Signals(signum).name)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            component = next((c for c in self.components if c.pid == pid), None)
            if component is None:
                continue  # an orphan re-parented to us: reaped, nothing else to do
            restart = self.state in ("starting", "running")
            level = log.info if not restart else log.error
            level("component exited", component=component.name, pid=pid, exit_code=code)
            component.on_exit(code if code >= 0 else None, time.monotonic(), restart=restart)
            if restart and component.state == "backoff":
                log.info("component will restart", component=component.name,
                         in_s=round(component.backoff_delay(), 3), restarts=component.restarts + 1)
            self._write_state()

    def _kill(self, component: Component, sig: int) -> None:
        if component.pid is not None:
            try:
                os.kill(component.pid, sig)
            except ProcessLookupError:
                pass

    # ---- shutdown --------------------------------------------------------------

    def _on_stop_signal(self, name: str) -> None:
        self.stop_signals += 1
        if self.stop_signals == 1:
            log.info("stop signal: draining", signal=name, grace_period_s=self.config.supervisor.grace_period)
            self._begin_stop(fatal=False)
        else:
            log.warning("second stop signal: fast shutdown", signal=name)
            self.stop_by = min(self.stop_by or float("inf"), time.monotonic() + FAST_STOP_S)
            self._write_state()
            for component in self.components:
                self._kill(component, signal.SIGTERM)  # a plane's second signal means "now"
            self._set_phase_deadline()

    def _begin_stop(self, fatal: bool) -> None:
        self.state = "draining"
        self.stop_by = time.monotonic() + self.config.supervisor.grace_period
        # The ports close with the data plane's copies now: a stopping instance
        # refuses new connections instead of parking them in a backlog.
        self._close_listeners()
        for component in self.components:
            if component.state in ("backoff", "stopped"):
                component.state = "exited"
        self._write_state()
        self._stop_phase = "data"
        self._signal_phase()

    def _signal_phase(self) -> None:
        component = self.data if self._stop_phase == "data" else self.control
        self._set_phase_deadline()
        if component.pid is not None:
            self._kill(component, signal.SIGTERM)

    def _set_phase_deadline(self) -> None:
        assert self.stop_by is not None
        self.stop_deadline = self.stop_by + (DATA_KILL_S if self._stop_phase == "data" else CONTROL_KILL_S)

    def _stop_progress(self, now: float) -> bool:
        component = self.data if self._stop_phase == "data" else self.control
        if component.pid is None:
            if self._stop_phase == "data":
                self._stop_phase = "control"
                self.state = "stopping"
                self._write_state()
                self._signal_phase()
                return False
            return self._finish()
        if self.stop_deadline is not None and now >= self.stop_deadline:
            log.error("component did not stop in time; killing it", component=component.name)
            self._kill(component, signal.SIGKILL)
            self.stop_deadline = now + 5.0  # SIGKILL cannot be refused: only the reap is waited for
        return False

    def _finish(self) -> bool:
        """Everything stopped; wait briefly for stragglers (orphans) and reap them."""
        now = time.monotonic()
        deadline = max(now + 0.1, (self.stop_by or now) + LEFTOVER_KILL_S)
        while time.monotonic() < deadline:
            self._reap()
            if not _children():
                break
            time.sleep(0.02)
        for pid in _children():
            log.warning("killing a leftover process", pid=pid)
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self._reap()
        log.info("supervisor stopped", exit_code=self.exit_code)
        return True

    def _close_listeners(self) -> None:
        listening.close(self.listeners)
        self.listeners = {}

    def _write_state(self) -> None:
        settings = self.config.supervisor
        try:
            write_state(self.paths, {
                "pid": os.getpid(), "ca_port": settings.ca_port, "host": settings.host,
                "metrics_port": settings.metrics_port, "config": str(self.config_path), "state": self.state,
                "stop_deadline": self.stop_by, "components": [c.record() for c in self.components]})
        except OSError as exc:
            log.error("could not write the state file", path=str(self.paths.state), error=str(exc))


def close_all_but(keep: set[int]) -> None:
    """Closes every descriptor from 3 up, except ``keep``."""
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _children() -> list[int]:
    try:
        import psutil

        return [p.pid for p in psutil.Process().children(recursive=True)]
    except Exception:
        return []


def raise_nofile() -> None:
    """The soft descriptor limit up to the hard one, for this process and the planes
    (every client connection costs the data plane one): a soft limit of 1024 under a
    hard one of a million would cap the CA port for nothing."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the descriptor limit", soft=soft, hard=hard, error=str(exc))


def become_subreaper() -> None:
    """Orphans re-parent to us even when we are not PID 1, so we reap them."""
    if os.getpid() == 1:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    except OSError as exc:
        log.warning("cannot become a child subreaper; orphans go to init", error=str(exc),
                    errno=errno.errorcode.get(exc.errno or 0, ""))


def _set_process_name(name: str) -> None:
    """What ps and top show for a forked plane (its argv stays the supervisor's)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except OSError:
        pass


def _plane_runner(name: str) -> Callable[[Path, Path | None], int]:
    if name == "control-plane":
        from supervisor.control.main import run_plane
    else:
        from supervisor.data.main import run_plane
    return run_plane


def preload_planes() -> bool:
    """Imports both planes' code so they can be forked; False (spawn them) when
    that left this process with threads, which would make forking unsafe."""
    from supervisor.control import main as control_main
    from supervisor.data import main as data_main

    control_main.preload()
    data_main.preload()
    threads = len(os.listdir("/proc/self/task"))
    if threads > 1:
        log.warning("importing the planes started threads; they will be spawned instead of forked",
                    threads=threads)
        return False
    return True


def run(config_path: Path) -> int:
    """Runs the supervisor in the foreground; returns the exit code."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"{config_path}: invalid configuration, nothing started:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem.path}: {problem.message}", file=sys.stderr)
        return 2
    problems = check_config(config)
    if problems:
        print(f"{config_path}: invalid configuration, nothing started:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem.path}: {problem.message}", file=sys.stderr)
        return 2
    configure_logging("supervisor", config.supervisor.log_format)
    raise_nofile()
    paths = RunPaths(config.supervisor.run_dir)
    try:
        lock_fd = hold_lock(paths)
    except AlreadyRunning:
        log.error("another supervisor is running with this run_dir; refusing to start",
                  run_dir=str(paths.run_dir))
        return 1
    settings = config.supervisor
    ports = {"ca_port": settings.ca_port, "metrics_port": settings.metrics_port}
    try:
        bound = listening.bind_all(settings.host, {key: port for key, port in ports.items() if port})
    except listening.CannotListen as exc:
        log.critical("cannot start", error=str(exc))
        os.close(lock_fd)
        return 1
    try:
        forget_accepted_config(paths)  # a reload of an earlier run does not carry over
        become_subreaper()
        return Supervisor(config_path.resolve(), config, paths, preloaded=preload_planes(), listeners=bound).run()
    finally:
        listening.close(bound)
        os.close(lock_fd)
