"""Starts a real ``supervisor run`` and talks to it the way FC does.

Every wait here has a deadline; nothing sleeps in place of a condition.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

FUNCTIONS_DIR = Path(__file__).parent / "functions"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Raw(str):
    """A TOML fragment written as it is (what a dict cannot say: deep nesting, 400 digits)."""


def toml_value(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(path: Path, supervisor: Mapping[str, Any], functions: Mapping[str, Mapping[str, Any]]) -> None:
    lines = ["[supervisor]"] + [f"{k} = {toml_value(v)}" for k, v in supervisor.items()]
    for name, fn in functions.items():
        lines.append(f"\n[functions.{name}]")
        nested = {k: v for k, v in fn.items() if isinstance(v, Mapping) and k == "limits"}
        lines += [f"{k} = {toml_value(v)}" for k, v in fn.items() if k not in nested]
        for key, table in nested.items():
            lines.append(f"\n[functions.{name}.{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")


def send_raw(port: int, data: bytes, timeout: float = 10.0, shut_write: bool = False) -> bytes:
    """Writes ``data`` on a new connection to 127.0.0.1:``port`` and reads until the server
    closes it; fails when it stays open ``timeout`` s. ``shut_write``: half-close after
    writing (the client has nothing more to send)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if shut_write:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused before reading it all: its answer may still be there
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open for {timeout}s: {received[:200]!r}") from None
    return received


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except Exception as exc:  # the condition may fail until it holds
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" +
                         (f" (last error: {last_error!r})" if last_error else ""))


def function(handler: str = "fns:handler", **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"runtime": "python", "handler": handler, "code_dir": str(FUNCTIONS_DIR),
                            "min_warm": 1, "max_workers": 2, "timeout": "10s"}
    spec.update(overrides)
    return spec


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    config_path: Path
    run_dir: Path
    ca_port: int
    metrics_port: int
    log_path: Path
    env: dict[str, str]
    seen_pids: dict[int, float] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.ca_port}"

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=timeout, trust_env=False)

    def post(self, path: str, data: bytes | str = b"", headers: Mapping[str, str] | None = None,
             timeout: float = 30.0) -> httpx.Response:
        with self.client(timeout) as client:
            return client.post(path, content=data, headers=dict(headers or {}))

    def invoke(self, event: Any = None, function: str | None = None, timeout: float = 30.0,
               headers: Mapping[str, str] | None = None) -> httpx.Response:
        all_headers = dict(headers or {})
        if function:
            all_headers["x-fc-function-name"] = function
        body = event if isinstance(event, (bytes, str)) else json.dumps(event or {})
        return self.post("/invoke", body, all_headers, timeout)

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10, trust_env=False).text

    def cli(self, *args: str, timeout: float = 30.0, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], capture_output=True,
                              timeout=timeout, env=self.env, input=input)

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json", "--run-dir", str(self.run_dir))
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def workers(self, function: str) -> list[dict[str, Any]]:
        for fn in self.status()["functions"]:
            if fn["name"] == function:
                return fn["workers"]  # type: ignore[no-any-return]
        raise KeyError(function)

    def ready_workers(self, function: str) -> list[dict[str, Any]]:
        return [w for w in self.workers(function) if w["state"] in ("idle", "busy")]

    def component_pid(self, name: str) -> int:
        for component in self.status()["components"]:
            if component["name"] == name:
                return int(component["pid"])
        raise KeyError(name)

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": line, "unparsed": True})
        return out

    def initialize(self, timeout: float = 30.0) -> httpx.Response:
        return wait_for(lambda: _ok(self.post("/initialize", timeout=timeout)), timeout, "POST /initialize == 200")

    def remember_processes(self) -> None:
        """Notes every process in the tree now, to check later that none leaked."""
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                self.seen_pids[p.pid] = p.create_time()
        except psutil.NoSuchProcess:
            pass

    def leaked(self) -> list[int]:
        alive = []
        for pid, created in self.seen_pids.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                continue
        return alive

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        self.remember_processes()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError("supervisor did not exit in time") from None

    def kill_all(self) -> None:
        self.remember_processes()
        for pid in list(self.seen_pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def _ok(response: httpx.Response) -> httpx.Response | None:
    return response if response.status_code == 200 else None


def start(tmp_path: Path, functions: Mapping[str, Mapping[str, Any]], *, initialize: bool = True,
          extra_env: Mapping[str, str] | None = None, pass_fds: tuple[int, ...] = (), wrapper: tuple[str, ...] = (),
          **supervisor: Any) -> Running:
    """``wrapper``: argv the supervisor's command is appended to (``unshare ...``)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_dir = tmp_path / "run"
    settings: dict[str, Any] = {"ca_port": free_port(), "metrics_port": free_port(), "host": "127.0.0.1",
                                "run_dir": str(run_dir), "grace_period": "10s"}
    settings.update(supervisor)
    config_path = tmp_path / "supervisor.toml"
    write_config(config_path, settings, functions)
    env = {k: v for k, v in os.environ.items()
           if k not in ("FC_SERVER_PORT", "FC_CUSTOM_LISTEN_PORT", "CA_PORT", "SUPERVISOR_RUN_DIR",
                         "SUPERVISOR_METRICS_PORT")}
    env.update(extra_env or {})
    log_path = tmp_path / "supervisor.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*wrapper, sys.executable, "-m", "supervisor.cli", "run", "--config", str(config_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                pass_fds=pass_fds)
    running = Running(proc, config_path, run_dir, settings["ca_port"], settings["metrics_port"], log_path, env)
    if initialize:
        try:
            running.initialize()
        except BaseException:
            running.kill_all()
            raise
    return running


@contextlib.contextmanager
def started(tmp_path: Path, functions: Mapping[str, Mapping[str, Any]], **kwargs: Any) -> Iterator[Running]:
    """A running supervisor; on exit it is stopped (must exit 0) and checked for leaks."""
    running = start(tmp_path, functions, **kwargs)
    try:
        yield running
    finally:
        if running.proc.poll() is None:
            code = running.stop()
            assert code == 0, f"supervisor exited {code}; log: {running.log_path}"
        leaked = running.leaked()
        if leaked:
            running.kill_all()
        assert not leaked, f"processes left behind: {leaked}"
