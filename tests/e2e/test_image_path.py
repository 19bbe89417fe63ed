"""The image's path: the wheel installed into a fresh venv, run from outside the checkout.

The Dockerfile builds the wheel from what .dockerignore lets into its build
stage and installs it into a venv of a slim runtime stage; a function image
(examples/image/Dockerfile) copies code and supervisor.toml on top, runs
`supervisor deps` and compiles bytecode. No Docker engine runs here, so these
tests take the same steps on this machine: the wheel is built from the same
files, installed into a fresh venv under /var/tmp (once per session), the
function image's COPY and RUN steps are read from examples/image/Dockerfile
and carried out in a directory outside the checkout, and the venv's
`supervisor run` is started there with PYTHONPATH unset, as the image's
ENTRYPOINT (read from the Dockerfile) would be, and talked to as FC does.

The rest checks what a container needs of the supervisor itself: start.sh
(the Quick start) execs it, signals reach it, orphans are reaped as PID 1,
a taken port stops it at once, and SUPERVISOR_METRICS_PORT moves the
metrics port as FC_SERVER_PORT moves the CA port.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.harness import FUNCTIONS_DIR, Running, free_port, function, started, wait_for, write_config

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


def test_supervisor_metrics_port_moves_the_metrics_port(tmp_path: Path) -> None:
    moved = free_port()
    with started(tmp_path, {"hello": function()}, extra_env={"SUPERVISOR_METRICS_PORT": str(moved)}) as sup:
        scraped = httpx.get(f"http://127.0.0.1:{moved}/metrics", timeout=10, trust_env=False)
        assert scraped.status_code == 200 and "supervisor_ready 1.0" in scraped.text
        with pytest.raises(httpx.ConnectError):  # the file's metrics_port is not opened at all
            httpx.get(f"http://127.0.0.1:{sup.metrics_port}/metrics", timeout=10, trust_env=False)
        assert json.loads((sup.run_dir / "supervisor.json").read_text())["metrics_port"] == moved
    # A bad value is refused before anything starts, naming the variable (exit 2, as for FC_SERVER_PORT).
    bad = subprocess.run([sys.executable, "-m", "supervisor.cli", "run", "--config", str(sup.config_path)],
                         env={**sup.env, "SUPERVISOR_METRICS_PORT": "99999"}, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2
    assert "env.SUPERVISOR_METRICS_PORT: expected a port number 0..65535 (0 disables metrics), got '99999'" in \
        bad.stdout + bad.stderr


# --- the image: the wheel in a fresh venv, outside the checkout ------------------------

IMAGE_EXAMPLE = ROOT / "examples" / "image"


@dataclass(frozen=True)
class Instruction:
    name: str  # upper case: FROM, RUN, COPY...
    args: str


def dockerfile(path: Path) -> list[Instruction]:
    """A Dockerfile's instructions: continuation lines joined, comment lines dropped, as Docker reads it."""
    instructions: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        name, _, args = (pending + line).strip().partition(" ")
        instructions.append(Instruction(name.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path} ends in a continuation line"
    return instructions


def runtime_stage() -> list[Instruction]:
    """The product Dockerfile's last stage: what the image is."""
    steps = dockerfile(ROOT / "Dockerfile")
    last = max(i for i, step in enumerate(steps) if step.name == "FROM")
    return steps[last:]


def env_of(steps: list[Instruction]) -> dict[str, str]:
    return dict(pair.split("=", 1) for step in steps if step.name == "ENV" for pair in shlex.split(step.args))


def ignored(path: Path) -> tuple[list[str], list[str]]:
    """A .dockerignore of this project's form: ('!PATH' lines let in, '**/NAME' names left out everywhere)."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    dropped = [line.removeprefix("**/") for line in lines if line.startswith("**/")]
    assert all(line == "*" or line.startswith("!") or (line.startswith("**/") and "/" not in line[3:])
               for line in lines), f"{path}: a pattern this test does not read"
    return allowed, dropped


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built as the Dockerfile's build stage does, from what .dockerignore lets in."""
    allowed, dropped = ignored(ROOT / ".dockerignore")
    assert (ROOT / ".dockerignore").read_text().splitlines().count("*") == 1, "the build context is an allowlist"
    context = tmp_path_factory.mktemp("context")
    for name in allowed:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, context / name, ignore=shutil.ignore_patterns(*dropped))
        elif (ROOT / name).exists():
            shutil.copy2(ROOT / name, context / name)
    dist = tmp_path_factory.mktemp("dist")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps",
                            "--wheel-dir", str(dist), "."], cwd=context, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [path] = dist.glob("*.whl")
    return path


@pytest.fixture(scope="session")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv under /var/tmp (when root) with the wheel installed: the runtime stage's /opt/ca-supervisor."""
    root = tmp_path_factory.mktemp("opt") / "ca-supervisor"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    installed = subprocess.run([str(root / "bin" / "pip"), "install", "--disable-pip-version-check", str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return root


def container_env(venv: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The runtime stage's ENV with its venv here (nothing points into the checkout), FC's port free."""
    image = runtime_stage()
    venv_in_image = env_of(image)["VIRTUAL_ENV"]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FC_", "SUPERVISOR_", "PYTHON", "VIRTUAL_ENV")) and k != "CA_PORT"}
    for name, value in env_of(image).items():
        env[name] = value.replace("$PATH", os.environ["PATH"]).replace(venv_in_image, str(venv))
    env.update({"FC_SERVER_PORT": str(free_port()), "SUPERVISOR_RUN_DIR": str(tmp_path / "run"), **extra})
    return env


@contextlib.contextmanager
def image_running(venv: Path, cwd: Path, env: dict[str, str]) -> Iterator[Running]:
    """The image's ENTRYPOINT, started in ``cwd`` (its working directory); stopped with SIGTERM (exit 0, nothing
    left behind)."""
    [entrypoint] = [step for step in runtime_stage() if step.name == "ENTRYPOINT"]
    argv = json.loads(entrypoint.args)
    argv[0] = argv[0].replace(env_of(runtime_stage())["VIRTUAL_ENV"], str(venv))
    log_path = cwd.parent / f"{cwd.name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    running = Running(proc, cwd / "supervisor.toml", Path(env["SUPERVISOR_RUN_DIR"]), int(env["FC_SERVER_PORT"]),
                      int(env.get("SUPERVISOR_METRICS_PORT", "0")), log_path, env)
    try:
        running.initialize(60)
        running.remember_processes()
        yield running
        assert running.stop() == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None or running.leaked():
            running.kill_all()
    assert not running.leaked()
    assert all(isinstance(json.loads(line), dict) for line in log_path.read_text().splitlines())


def supervisor_cli(venv: Path, cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "supervisor"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_dockerfile_installs_only_the_wheel_into_a_slim_runtime() -> None:
    steps = dockerfile(ROOT / "Dockerfile")
    assert [step.args for step in steps if step.name == "FROM"] == ["python:3.11-slim AS build", "python:3.11-slim"]
    image = runtime_stage()
    # From the build stage it takes the wheel only; nothing of the context, no editable install, no start.sh.
    assert [step.args for step in image if step.name == "COPY"] == ["--from=build /dist/ /tmp/dist/"]
    runs = " ".join(step.args for step in image if step.name == "RUN")
    assert "/tmp/dist/*.whl" in runs and " -e " not in runs and "--editable" not in runs and "start.sh" not in runs
    env = env_of(image)
    assert env["FC_SERVER_PORT"] == "9000" and env["PATH"].startswith(env["VIRTUAL_ENV"] + "/bin:")
    assert [step.args.split() for step in image if step.name == "EXPOSE"] == [["9000", "9464"]]
    [entrypoint] = [json.loads(step.args) for step in image if step.name == "ENTRYPOINT"]  # exec form: PID 1
    assert entrypoint == [env["VIRTUAL_ENV"] + "/bin/supervisor", "run"]


def test_the_wheel_holds_every_package_and_the_bundled_example(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert top == set(declared["packages"])
    # Every package of the checkout that runs in production is in it (tests and bench are not).
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages <= top, f"not in the wheel: {packages - top}"
    assert {"supervisor/_bundled/hello/supervisor.toml", "supervisor/_bundled/hello/hello.py"} <= set(names)
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_the_installed_wheel_runs_the_bundled_example_from_any_directory(venv: Path, tmp_path: Path) -> None:
    anywhere = tmp_path / "anywhere"
    anywhere.mkdir()
    env = container_env(venv, tmp_path, SUPERVISOR_METRICS_PORT=str(free_port()))
    found = subprocess.run([str(venv / "bin" / "python"), "-c", "import supervisor.config as c, worker; "
                            "print(c.bundled_config_path()); print(worker.__file__)"],
                           cwd=anywhere, env=env, capture_output=True, text=True, timeout=60, check=True)
    bundled, worker_init = found.stdout.splitlines()
    assert bundled.startswith(str(venv)) and worker_init.startswith(str(venv)), found.stdout  # not the checkout
    validated = supervisor_cli(venv, anywhere, env, "validate")
    assert validated.returncode == 0 and validated.stdout.startswith(f"{bundled}: OK"), validated
    with image_running(venv, anywhere, env) as sup:
        response = sup.invoke({"name": "wheel"})
        assert response.status_code == 200 and response.json()["hello"] == "wheel", response.text
        assert 'supervisor_invocations_total{function="hello",outcome="success"} 1.0' in sup.metrics()
        state = json.loads((sup.run_dir / "supervisor.json").read_text())
        assert state["config"] == bundled and state["metrics_port"] == sup.metrics_port != 9464


def test_a_function_image_as_examples_image_builds_it(venv: Path, tmp_path: Path) -> None:
    """examples/image/Dockerfile's COPY and RUN steps, in a working directory outside the checkout standing for
    /app, on top of the venv standing for the product image; then its ENTRYPOINT there."""
    app = tmp_path / "app"
    app.mkdir()
    env = container_env(venv, tmp_path)
    _, dropped = ignored(IMAGE_EXAMPLE / ".dockerignore")
    workdir: Path | None = None
    for step in dockerfile(IMAGE_EXAMPLE / "Dockerfile"):
        if step.name in ("ARG", "FROM"):
            continue  # FROM the product image: the venv
        if step.name == "WORKDIR":
            assert step.args == "/app"
            workdir = app
        elif step.name == "COPY":
            assert workdir is not None
            *sources, dest = shlex.split(step.args)
            for source in sources:
                assert not source.startswith("--") and not dest.startswith("/"), step
                if (IMAGE_EXAMPLE / source).is_dir():
                    shutil.copytree(IMAGE_EXAMPLE / source, workdir / dest, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns(*dropped))
                else:
                    target = workdir / dest / source if dest.endswith("/") else workdir / dest
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(IMAGE_EXAMPLE / source, target)
        elif step.name == "RUN":
            done = subprocess.run(["sh", "-c", step.args], cwd=workdir, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, f"RUN {step.args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        else:
            pytest.fail(f"examples/image/Dockerfile: this test does not follow {step.name}")
    code_dir = app / "slugs"
    # The requirement went into the function's own directory, not the supervisor's venv; bytecode is compiled.
    assert (code_dir / ".python_packages" / "slugify").is_dir()
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import slugify"], cwd=tmp_path, env=env,
                          capture_output=True, timeout=60).returncode != 0
    assert list((code_dir / "__pycache__").glob("handler.cpython-*.pyc"))

    env["SUPERVISOR_METRICS_PORT"] = str(free_port())  # as `docker run -e SUPERVISOR_METRICS_PORT=...`
    with image_running(venv, app, env) as sup:
        response = sup.invoke({"text": "Héllo Wörld, ça va?"})
        assert response.status_code == 200, response.text
        assert response.json()["slug"] == "hello-world-ca-va"  # text-unidecode, python-slugify's dependency
        assert 'supervisor_invocations_total{function="slugs",outcome="success"} 1.0' in sup.metrics()
        status = supervisor_cli(venv, app, env, "status", "--json")
        assert status.returncode == 0, status
        assert [fn["name"] for fn in json.loads(status.stdout)["functions"]] == ["slugs"]
