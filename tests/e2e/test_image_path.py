"""The image's path: start.sh as ENTRYPOINT, the supervisor as PID 1.

The Dockerfile runs `start.sh --install-only` at build time and `start.sh` as
ENTRYPOINT; these tests run the same script (the venv already exists, so it
goes straight to `exec supervisor run`) and check what a container needs:
signals reach the supervisor, orphans are reaped, a broken boot is FATAL.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.harness import FUNCTIONS_DIR, free_port, function, started, wait_for, write_config

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def process_group(argv: list[str], **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own process group, killed with the group if the test fails."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            **kwargs)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def image_env(tmp_path: Path, ca_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FC_", "SUPERVISOR_"))}
    env.update({"FC_SERVER_PORT": str(ca_port), "SUPERVISOR_RUN_DIR": str(tmp_path / "run")})
    return env


def test_start_sh_runs_the_bundled_example_and_stops_cleanly(tmp_path: Path) -> None:
    ca_port = free_port()
    env = image_env(tmp_path, ca_port)
    # The bundled example also opens metrics_port 9464; give it a free one instead.
    config = tmp_path / "supervisor.toml"
    bundled = (ROOT / "examples" / "hello" / "supervisor.toml").read_text()
    config.write_text(bundled.replace("metrics_port = 9464", f"metrics_port = {free_port()}")
                      .replace('code_dir = "."', f'code_dir = "{ROOT / "examples" / "hello"}"'))
    env["SUPERVISOR_CONFIG"] = str(config)
    with process_group([str(ROOT / "start.sh")], env=env, cwd=tmp_path) as proc:
        base = f"http://127.0.0.1:{ca_port}"
        wait_for(lambda: httpx.post(f"{base}/initialize", trust_env=False).status_code == 200, 60, "initialize")
        # exec: the process start.sh became is the supervisor itself.
        assert "supervisor.cli" in " ".join(psutil.Process(proc.pid).cmdline()) or \
            psutil.Process(proc.pid).cmdline()[1].endswith("supervisor")
        response = httpx.post(f"{base}/invoke", content=b'{"name": "image"}', trust_env=False)
        assert response.status_code == 200 and response.json()["hello"] == "image"
        tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not [pid for pid in tree if psutil.pid_exists(pid)]


def test_orphans_are_reaped_by_the_supervisor(tmp_path: Path) -> None:
    with started(tmp_path, {"hello": function()}) as sup:
        planes = {sup.component_pid("control-plane"), sup.component_pid("data-plane")}
        supervisor = psutil.Process(sup.proc.pid)
        assert sup.invoke({"op": "orphan", "s": 3}).status_code == 200
        # The grandchild was re-parented to the supervisor (child subreaper)...
        orphan = wait_for(lambda: [p for p in supervisor.children() if p.pid not in planes], 3, "the orphan")
        # ...and once it exits, it is reaped: no zombie stays.
        wait_for(lambda: not psutil.pid_exists(orphan[0].pid), 10, "the orphan reaped")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1)")
def test_as_pid_1_it_reaps_orphans_and_forwards_sigterm(tmp_path: Path) -> None:
    ca_port = free_port()
    config = tmp_path / "supervisor.toml"
    write_config(config, {"ca_port": ca_port, "metrics_port": 0, "host": "127.0.0.1",
                          "run_dir": str(tmp_path / "run")}, {"hello": function(min_warm=1)})
    # A new PID namespace: the supervisor is PID 1 there, as in a container.
    with process_group(["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-m", "supervisor.cli",
                        "run", "--config", str(config)]) as proc:
        base = f"http://127.0.0.1:{ca_port}"
        wait_for(lambda: httpx.post(f"{base}/initialize", trust_env=False).status_code == 200, 60, "initialize")
        pid1 = wait_for(lambda: psutil.Process(proc.pid).children(), 5, "the namespace's init")[0]
        assert pid1.cmdline()[2:4] == ["supervisor.cli", "run"]
        with open(f"/proc/{pid1.pid}/status") as status:
            nspid = next(line for line in status if line.startswith("NSpid:")).split()
        assert nspid[-1] == "1", nspid  # PID 1 inside its namespace
        for _ in range(3):
            assert httpx.post(f"{base}/invoke", content=b'{"op": "orphan", "s": 0.2}', trust_env=False,
                              timeout=30).status_code == 200

        def zombies() -> list[psutil.Process]:
            return [p for p in pid1.children(recursive=True) if p.status() == psutil.STATUS_ZOMBIE]

        wait_for(lambda: len(pid1.children()) == 2 and not zombies(), 10, "orphans reaped by PID 1")
        tree = [pid1.pid] + [p.pid for p in pid1.children(recursive=True)]
        os.kill(pid1.pid, signal.SIGTERM)  # what the platform sends to PID 1
        assert proc.wait(60) == 0
        assert not [pid for pid in tree if psutil.pid_exists(pid)]


def test_a_port_in_use_stops_the_supervisor_before_any_plane_starts(tmp_path: Path) -> None:
    # The supervisor binds the ports itself (they outlive the data plane): a taken
    # port is refused at once, naming the key, instead of a data plane failing to boot.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ca_port = taken.getsockname()[1]
        config = tmp_path / "supervisor.toml"
        write_config(config, {"ca_port": ca_port, "metrics_port": 0, "host": "127.0.0.1",
                              "run_dir": str(tmp_path / "run")},
                     {"hello": function(code_dir=str(FUNCTIONS_DIR))})
        result = subprocess.run([sys.executable, "-m", "supervisor.cli", "run", "--config", str(config)],
                                capture_output=True, timeout=90)
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    refusal = [line for line in lines if line["event"] == "cannot start"]
    assert refusal and "supervisor.ca_port" in refusal[0]["error"], result.stdout[-2000:]
    assert not [line for line in lines if line["event"] == "component starting"]
