"""The `supervisor` CLI and the run directory (supervisor/cli.py, supervisor/runstate.py).

Rendering is tested as pure functions on a StatusReply built by hand; the
process-facing parts (lock detection, status over gRPC, invoke over HTTP)
run against real processes and servers standing in for the supervisor.
"""

from __future__ import annotations

import fcntl
import http.server
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from supervisor import cli
from supervisor.cli import (
    COMPONENT_KEYS,
    FUNCTION_KEYS,
    WORKER_KEYS,
    config_run_dir,
    dispatch,
    find_run_dir,
    format_age,
    format_bytes,
    format_duration,
    reload_document,
    render_reload,
    render_reload_refused,
    render_scale,
    render_status,
    resolve_run_dir,
    scale_document,
    scale_request,
    status_document,
    status_exit_code,
)
from supervisor.runstate import (
    AlreadyRunning,
    RunPaths,
    hold_lock,
    lock_held,
    read_state,
    supervisor_alive,
    write_state,
)
from supervisor.v1 import control_pb2, control_pb2_grpc

NOW = 1000.0


def make_reply(ready: bool = True) -> control_pb2.StatusReply:
    return control_pb2.StatusReply(
        ready=ready,
        data_plane_attached=True,
        functions=[
            control_pb2.FunctionStatus(
                name="hello", runtime="python", min_warm=1, max_workers=4, concurrency=2,
                queue_depth=3, inflight=1,
                workers=[
                    control_pb2.WorkerStatus(id="hello-1", pid=4242, state="busy", inflight=1, served=17,
                                             age_s=75.25, rss_bytes=25 * 1024 * 1024, mode="fork"),
                    control_pb2.WorkerStatus(id="hello-2", pid=4243, state="idle", inflight=0, served=0,
                                             age_s=2.0, rss_bytes=900, mode="spawn"),
                ],
            ),
            control_pb2.FunctionStatus(name="web", runtime="custom", min_warm=0, max_workers=2, concurrency=8,
                                       init_error="InitializationError: boom"),
        ],
    )


def make_state(pid: int = 100, **component_states: str) -> dict[str, Any]:
    states = {"control-plane": "running", "data-plane": "running", **component_states}
    return {
        "pid": pid, "ca_port": 9000, "host": "0.0.0.0", "metrics_port": 9464,
        "config": "/etc/supervisor.toml", "state": "running",
        "components": [
            {"name": name, "pid": 200 + i if s in ("running", "starting") else None, "state": s,
             "restarts": i, "started_monotonic": NOW - 3723.5 if s in ("running", "starting") else None}
            for i, (name, s) in enumerate(states.items())
        ],
    }


# --- pure rendering ------------------------------------------------------------------


def test_status_document_has_exactly_the_contract_keys() -> None:
    doc = status_document(make_state(), make_reply(), NOW)
    assert set(doc) == {"ready", "components", "functions"}
    assert doc["ready"] is True
    assert [tuple(c) for c in doc["components"]] == [COMPONENT_KEYS] * 2
    assert doc["components"][0] == {"name": "control-plane", "pid": 200, "state": "running",
                                    "restarts": 0, "uptime_s": 3723.5}
    for function in doc["functions"]:
        # Extra keys are allowed inside function objects only, never fewer.
        assert set(FUNCTION_KEYS) <= set(function)
        for worker in function["workers"]:
            assert tuple(worker) == WORKER_KEYS
    hello, web = doc["functions"]
    assert hello["workers"][0] == {"id": "hello-1", "pid": 4242, "state": "busy", "inflight": 1,
                                   "served": 17, "age_s": 75.25, "rss_bytes": 25 * 1024 * 1024, "mode": "fork"}
    assert (hello["queue_depth"], hello["inflight"], hello["concurrency"]) == (3, 1, 2)
    assert hello["init_error"] is None and web["init_error"] == "InitializationError: boom"
    assert web["workers"] == []
    json.dumps(doc)  # serializable as it is


def test_status_document_without_an_answer_is_not_ready() -> None:
    doc = status_document(make_state(), None, NOW)
    assert doc["ready"] is False and doc["functions"] == [] and len(doc["components"]) == 2
    assert status_document(None, None, NOW) == {"ready": False, "components": [], "functions": []}


def test_uptime_only_for_live_components() -> None:
    doc = status_document(make_state(**{"seed:hello": "backoff"}), make_reply(), NOW)
    seed = doc["components"][2]
    assert seed == {"name": "seed:hello", "pid": None, "state": "backoff", "restarts": 2, "uptime_s": None}


@pytest.mark.parametrize(
    ("states", "ready", "code"),
    [
        ({}, True, 0),
        ({}, False, 3),
        ({"data-plane": "backoff"}, True, 3),
        ({"seed:hello": "starting"}, True, 3),
        ({"control-plane": "fatal"}, True, 3),
    ],
)
def test_status_exit_code(states: dict[str, str], ready: bool, code: int) -> None:
    assert status_exit_code(status_document(make_state(**states), make_reply(ready), NOW)) == code


def test_status_exit_code_no_answer_or_no_components() -> None:
    assert status_exit_code(status_document(make_state(), None, NOW)) == 3
    assert status_exit_code(status_document({"pid": 1, "components": []}, make_reply(), NOW)) == 3


def test_render_status_table() -> None:
    text = render_status(make_state(**{"seed:hello": "backoff"}), make_reply(), NOW)
    lines = text.splitlines()
    assert lines[0] == "supervisor pid 100, RUNNING, ready yes, CA port 9000"
    assert lines[1] == f"{'control-plane':<32}{'RUNNING':<10}pid 200, uptime 1:02:03, restarts 0"
    assert lines[2] == f"{'data-plane':<32}{'RUNNING':<10}pid 201, uptime 1:02:03, restarts 1"
    assert lines[3] == f"{'seed:hello':<32}{'BACKOFF':<10}pid -, uptime -, restarts 2"
    assert lines[4] == ""
    assert lines[5] == ("function hello (python): workers 2/4 (2 ready, min_warm 1), capacity 4, "
                        "inflight 1, queue 3")
    header, busy, idle = lines[6:9]
    assert header.split() == ["ID", "PID", "STATE", "INFLIGHT", "SERVED", "AGE", "RSS", "MODE"]
    assert busy.split() == ["hello-1", "4242", "busy", "1", "17", "1m15s", "25.0MiB", "fork"]
    assert idle.split() == ["hello-2", "4243", "idle", "0", "0", "2.0s", "900B", "spawn"]
    # Fixed columns: every row's PID column ends at the same place.
    assert header.index("PID") + 3 == busy.index("4242") + 4 == idle.index("4243") + 4
    assert lines[10].startswith("function web (custom): workers 0/2")
    assert lines[11:] == ["  init error: InitializationError: boom", "  (no workers)"]


def test_render_status_without_control_plane_lists_components_only() -> None:
    lines = render_status(make_state(), None, NOW).splitlines()
    assert lines[0].endswith("ready no, CA port 9000") and len(lines) == 3


def make_seed(state: str = "running", detail: str = "") -> control_pb2.ComponentStatus:
    running = state == "running"
    return control_pb2.ComponentStatus(name="seed:hello", pid=300 if running else 0, state=state, restarts=1,
                                       uptime_s=61.25 if running else 9.0, detail=detail)


def reply_with_seed(seed: control_pb2.ComponentStatus, ready: bool = True) -> control_pb2.StatusReply:
    reply = make_reply(ready)
    reply.components.append(seed)
    return reply


def test_status_document_appends_the_seeds() -> None:
    doc = status_document(make_state(), reply_with_seed(make_seed()), NOW)
    assert [tuple(c) for c in doc["components"]] == [COMPONENT_KEYS] * 3
    assert doc["components"][2] == {"name": "seed:hello", "pid": 300, "state": "running",
                                    "restarts": 1, "uptime_s": 61.25}
    assert status_exit_code(doc) == 0
    # A seed that is not running has no pid nor uptime, whatever the reply's numbers say.
    doc = status_document(make_state(), reply_with_seed(make_seed("backoff", "exit 1")), NOW)
    assert doc["components"][2] == {"name": "seed:hello", "pid": None, "state": "backoff",
                                    "restarts": 1, "uptime_s": None}
    json.dumps(doc)


def test_status_document_prefers_the_control_planes_word_on_a_seed() -> None:
    doc = status_document(make_state(**{"seed:hello": "backoff"}), reply_with_seed(make_seed()), NOW)
    assert [(c["name"], c["state"]) for c in doc["components"]] == [
        ("control-plane", "running"), ("data-plane", "running"), ("seed:hello", "running")]


@pytest.mark.parametrize("state", ["starting", "backoff", "failed", "stopped", ""])
def test_a_seed_not_running_makes_status_exit_3(state: str) -> None:
    doc = status_document(make_state(), reply_with_seed(make_seed(state)), NOW)
    assert status_exit_code(doc) == 3
    assert doc["components"][2]["state"] == (state or "unknown")


def test_render_status_shows_seeds_with_their_detail() -> None:
    reply = reply_with_seed(make_seed("failed", "ImportError: no module named numpy\n  (gave up after 5 tries)\n"))
    reply.components.append(control_pb2.ComponentStatus(name="seed:web", pid=301, state="running", uptime_s=5))
    lines = render_status(make_state(), reply, NOW).splitlines()
    assert lines[3] == (f"{'seed:hello':<32}{'FAILED':<10}pid -, uptime -, restarts 1 "
                        "(ImportError: no module named numpy | (gave up after 5 tries))")
    assert lines[4] == f"{'seed:web':<32}{'RUNNING':<10}pid 301, uptime 0:00:05, restarts 0"
    assert lines[5] == "" and lines[6].startswith("function hello")


def make_reload_reply(ok: bool = True) -> control_pb2.ReloadReply:
    if ok:
        return control_pb2.ReloadReply(ok=True, added=["a", "b"], changed=["c"], removed=["d"],
                                       unchanged=["e"], generation=3)
    return control_pb2.ReloadReply(ok=False, generation=2, problems=[
        control_pb2.ConfigProblem(path="functions.hello.timeout", message="must be greater than 0"),
        control_pb2.ConfigProblem(path="", message="not valid TOML: line 3"),
    ])


def test_render_reload() -> None:
    assert render_reload(make_reload_reply()) == "reloaded (generation 3): added a, b; changed c; removed d; unchanged e\n"
    # Only what happened is named.
    assert render_reload(control_pb2.ReloadReply(ok=True, unchanged=["hello"], generation=4)) == (
        "reloaded (generation 4): unchanged hello\n")
    assert render_reload(control_pb2.ReloadReply(ok=True, generation=5)) == "reloaded (generation 5)\n"


def test_render_reload_refused() -> None:
    assert render_reload_refused(make_reload_reply(ok=False)).splitlines() == [
        "reload refused, the running config stays (generation 2):",
        "functions.hello.timeout: must be greater than 0",
        "not valid TOML: line 3",
    ]
    assert render_reload_refused(control_pb2.ReloadReply(ok=False)).splitlines()[1] == "(the supervisor gave no reason)"


def test_reload_document() -> None:
    assert reload_document(make_reload_reply()) == {
        "ok": True, "problems": [], "added": ["a", "b"], "removed": ["d"], "changed": ["c"],
        "unchanged": ["e"], "generation": 3}
    doc = reload_document(make_reload_reply(ok=False))
    assert doc["ok"] is False and doc["problems"][0] == {"path": "functions.hello.timeout",
                                                         "message": "must be greater than 0"}
    json.dumps(doc)


def test_scale_request_sets_only_what_was_given() -> None:
    only_max = scale_request("hello", None, 8)
    assert only_max.function == "hello" and only_max.max_workers == 8
    assert only_max.HasField("max_workers") and not only_max.HasField("min_warm")
    # 0 is a value to send (no warm workers), not "unset".
    zero = scale_request("hello", 0, None)
    assert zero.HasField("min_warm") and zero.min_warm == 0 and not zero.HasField("max_workers")
    both = scale_request("hello", 2, 3)
    assert both.HasField("min_warm") and both.HasField("max_workers")


def test_render_scale() -> None:
    reply = control_pb2.ScaleReply(ok=True, min_warm=2, max_workers=6)
    assert render_scale("hello", reply) == "hello: min_warm=2 max_workers=6\n"
    assert scale_document("hello", reply) == {"function": "hello", "ok": True, "error": "",
                                              "min_warm": 2, "max_workers": 6}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["scale", "hello"], "give --min-warm, --max-workers, or both"),
        (["scale", "hello", "--min-warm", "-1"], "argument --min-warm: must be at least 0, got '-1'"),
        (["scale", "hello", "--max-workers", "0"], "argument --max-workers: must be at least 1, got '0'"),
        (["scale", "hello", "--max-workers", "2.5"], "argument --max-workers: expected a whole number, got '2.5'"),
        (["scale", "hello", "--min-warm", str(2**32)], "argument --min-warm: must be at most 4294967295"),
        (["scale", "hello", "--min-warm", "5", "--max-workers", "2"], "--min-warm 5 exceeds --max-workers 2"),
        (["scale", "--min-warm", "1"], "the following arguments are required: FUNCTION"),
        (["reload", "extra"], "unrecognized arguments: extra"),
    ],
)
def test_scale_and_reload_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        dispatch(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err and err.startswith("usage: supervisor ")


def test_formatters() -> None:
    assert format_duration(None) == "-"
    assert format_duration(0.9) == "0:00:00"
    assert format_duration(3723.5) == "1:02:03"
    assert format_duration(90000) == "25:00:00"
    assert [format_age(s) for s in (4.24, 187, 7500, 3 * 86400 + 4 * 3600)] == ["4.2s", "3m07s", "2h05m", "3d04h"]
    assert [format_bytes(n) for n in (0, 1023, 1536, 48 << 20, (3 << 30) // 2, 5 << 40)] == [
        "0B", "1023B", "1.5KiB", "48.0MiB", "1.5GiB", "5.0TiB"]


# --- run-dir resolution ------------------------------------------------------------


def write_config(directory: Path, body: str = "", handler: str = "hello:handler") -> Path:
    (directory / "hello.py").write_text("def handler(event, context):\n    return event\n")
    path = directory / "supervisor.toml"
    path.write_text(textwrap.dedent(f"""\
        [supervisor]
        {body}

        [functions.hello]
        handler = "{handler}"
        code_dir = "."
        """))
    return path


def test_resolve_run_dir_order(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'run_dir = "state"')
    env = {"SUPERVISOR_CONFIG": str(config)}
    assert resolve_run_dir("/a", {**env, "SUPERVISOR_RUN_DIR": "/b"}, tmp_path) == Path("/a")
    assert resolve_run_dir("rel", env, tmp_path) == tmp_path / "rel"  # relative to the cwd
    assert resolve_run_dir(None, {**env, "SUPERVISOR_RUN_DIR": "/b"}, tmp_path) == Path("/b")
    assert resolve_run_dir(None, {**env, "SUPERVISOR_RUN_DIR": ""}, tmp_path) == tmp_path / "state"
    # ./supervisor.toml of the cwd, and an explicit config over the env's.
    assert resolve_run_dir(None, {}, tmp_path) == tmp_path / "state"
    other = tmp_path / "other"
    other.mkdir()
    write_config(other, 'run_dir = "/x/y"')
    assert resolve_run_dir(None, env, tmp_path, str(other / "supervisor.toml")) == Path("/x/y")


def test_resolve_run_dir_falls_back_when_the_config_is_bad(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[supervisor\n")
    assert resolve_run_dir(None, {"SUPERVISOR_CONFIG": str(bad)}, tmp_path) == Path("/tmp/ca-supervisor")
    bad.write_bytes(b"\xff\xfe")
    assert resolve_run_dir(None, {"SUPERVISOR_CONFIG": str(bad)}, tmp_path) == Path("/tmp/ca-supervisor")


def test_find_run_dir_reads_the_run_dir_of_an_invalid_config(tmp_path: Path) -> None:
    bad = write_config(tmp_path, 'run_dir = "state"\nca_prot = 1')
    lookup = find_run_dir(None, {}, tmp_path, str(bad))
    assert lookup.run_dir == tmp_path / "state" and lookup.config == bad
    assert [p.path for p in lookup.problems] == ["supervisor.ca_prot"]
    assert resolve_run_dir(None, {}, tmp_path, str(bad)) == tmp_path / "state"
    # --run-dir and $SUPERVISOR_RUN_DIR decide without judging any config.
    assert find_run_dir("/a", {}, tmp_path, str(bad)) == (Path("/a"), None, [])
    assert find_run_dir(None, {"SUPERVISOR_RUN_DIR": "/b"}, tmp_path, str(bad)) == (Path("/b"), None, [])
    # A valid config: its run_dir, no problems.
    (tmp_path / "good").mkdir()
    good = write_config(tmp_path / "good", 'run_dir = "/x/y"')
    assert find_run_dir(None, {}, tmp_path, str(good)) == (Path("/x/y"), good, [])


@pytest.mark.parametrize(("text", "expected"), [
    ('[supervisor]\nrun_dir = "rel/dir"\nca_port = "nope"\n', "rel/dir"),
    ('[supervisor]\nca_port = "nope"\n', "/tmp/ca-supervisor"),  # the key's default
    ('[functions.f]\ntimout = 1\n', "/tmp/ca-supervisor"),
    ('[supervisor]\nrun_dir = 7\n', None),
    ('[supervisor]\nrun_dir = ""\n', None),
    ('[supervisor]\nrun_dir = "a\\u0000b"\n', None),
    ('supervisor = 3\n', None),
    ('[supervisor\n', None),
])
def test_config_run_dir(tmp_path: Path, text: str, expected: str | None) -> None:
    path = tmp_path / "supervisor.toml"
    path.write_text(text)
    assert config_run_dir(path) == (None if expected is None else tmp_path / expected)
    assert config_run_dir(tmp_path / "missing.toml") is None


# --- runstate --------------------------------------------------------------------


def test_run_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    paths = RunPaths(Path("run"))
    assert paths.run_dir == tmp_path / "run"
    assert paths.lock == tmp_path / "run" / "supervisor.lock"
    assert paths.state == tmp_path / "run" / "supervisor.json"
    assert paths.control_sock == tmp_path / "run" / "control.sock"
    assert paths.worker_sock == tmp_path / "run" / "worker.sock"
    assert paths.ctl_target == f"unix:{tmp_path}/run/control.sock"


def test_write_and_read_state(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path)
    assert read_state(paths) is None
    old_umask = os.umask(0o077)
    try:
        write_state(paths, make_state())
    finally:
        os.umask(old_umask)
    assert read_state(paths) == make_state()
    assert stat.S_IMODE(paths.state.stat().st_mode) == 0o644
    inode = paths.state.stat().st_ino
    write_state(paths, {"pid": 2})
    assert read_state(paths) == {"pid": 2}
    assert paths.state.stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["supervisor.json"]  # no temporary left


def test_write_state_failure_leaves_the_old_file(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path)
    write_state(paths, {"pid": 1})
    with pytest.raises(TypeError):
        write_state(paths, {"pid": object()})
    assert read_state(paths) == {"pid": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["supervisor.json"]


@pytest.mark.parametrize("content", [b"", b"{half", b"[1, 2]", b"\xff\xfe"])
def test_read_state_rejects_garbage(tmp_path: Path, content: bytes) -> None:
    paths = RunPaths(tmp_path)
    paths.state.write_bytes(content)
    assert read_state(paths) is None


_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def lock_holder() -> Iterator[Callable[[RunPaths], subprocess.Popen[bytes]]]:
    """Starts a process that holds the run dir's lock, as a supervisor does."""
    started: list[subprocess.Popen[bytes]] = []

    def start(paths: RunPaths) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([sys.executable, "-c", _HOLDER, str(paths.lock)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        started.append(process)
        assert process.stdout is not None and process.stdout.readline() == b"locked\n"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def stop(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()


def test_supervisor_alive_needs_the_lock_held(tmp_path: Path, lock_holder: Callable[[RunPaths], subprocess.Popen[bytes]]) -> None:
    paths = RunPaths(tmp_path)
    assert not supervisor_alive(paths)  # nothing there
    holder = lock_holder(paths)
    assert lock_held(paths)
    assert not supervisor_alive(paths)  # lock held, but no state file
    write_state(paths, make_state(pid=holder.pid))
    assert supervisor_alive(paths)
    assert supervisor_alive(paths)  # probing does not disturb the holder
    stop(holder)
    assert not lock_held(paths)
    assert not supervisor_alive(paths)  # the kernel dropped the lock with the process


def test_supervisor_alive_false_without_lock_or_live_pid(tmp_path: Path, lock_holder: Callable[[RunPaths], subprocess.Popen[bytes]]) -> None:
    paths = RunPaths(tmp_path)
    # A live pid and a lock file nobody holds: a SIGKILLed supervisor's leftovers.
    write_state(paths, make_state(pid=os.getpid()))
    paths.lock.touch()
    assert not supervisor_alive(paths)
    # The lock held, but the recorded pid is dead.
    lock_holder(paths)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_state(paths, make_state(pid=dead.pid))
    assert not supervisor_alive(paths)
    write_state(paths, {"pid": True})
    assert not supervisor_alive(paths)


def test_hold_lock(tmp_path: Path, lock_holder: Callable[[RunPaths], subprocess.Popen[bytes]]) -> None:
    paths = RunPaths(tmp_path / "new")
    fd = hold_lock(paths)  # creates the directory
    try:
        assert lock_held(paths)  # seen even from the holding process
        with pytest.raises(AlreadyRunning):
            hold_lock(paths)
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(fd)
    assert not lock_held(paths)
    holder = lock_holder(paths)
    with pytest.raises(AlreadyRunning):
        hold_lock(paths)
    stop(holder)


# --- validate ----------------------------------------------------------------------


def test_validate_good_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "ca_port = 9100")
    assert dispatch(["validate", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{config}: OK (1 function: hello)\n" and err == ""


def test_validate_reports_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "ca_prot = 9100")
    with config.open("a") as file:
        file.write('timeout = 10\nmin_warm = 5\nmax_workers = 2\n')
    assert dispatch(["validate", "--config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert any(line.startswith("supervisor.ca_prot: ") for line in lines)
    assert any(line.startswith("functions.hello.timeout: ") for line in lines)
    assert any(line.startswith("functions.hello.min_warm: ") for line in lines)


def test_validate_imports_handlers_of_a_config_with_other_problems(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "ca_prot = 9100", handler="hello:nope")
    assert dispatch(["validate", "--config", str(config)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("supervisor.ca_prot: ")  # structural first, then what importing found
    assert lines[1].startswith("functions.hello.handler: ") and "nope" in lines[1]


def test_status_and_reload_judge_the_config_that_decides_the_run_dir(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, f'run_dir = "{tmp_path / "run"}"\nca_prot = 1')
    assert dispatch(["status", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}: invalid config" in err and "supervisor.ca_prot: " in err
    assert f"no supervisor running in {tmp_path / 'run'}" in err  # looked where the file says
    assert dispatch(["reload", "--json", "--config", str(config)]) == 2
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert [problem["path"] for problem in document.pop("problems")] == ["supervisor.ca_prot"]
    assert document == {"ok": False, "added": [], "removed": [], "changed": [], "unchanged": [], "generation": None}
    assert "reload not requested" in err and "no supervisor running" not in err


def test_validate_imports_handlers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, handler="hello:nope")
    assert dispatch(["validate", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("functions.hello.handler: ") and "nope" in err


@pytest.mark.parametrize("content", [b"[supervisor\n", b"\xff\xfe[supervisor]\n"])
def test_validate_unparseable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes) -> None:
    config = tmp_path / "supervisor.toml"
    config.write_bytes(content)
    assert dispatch(["validate", "--config", str(config)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch(["validate", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read the config file" in capsys.readouterr().err


def test_main_exits_with_the_code(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["validate", "--config", str(write_config(tmp_path))])
    assert exc.value.code == 0


def test_run_calls_the_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Path] = []
    fake = types.ModuleType("supervisor.entry.main")
    fake.run = lambda path: seen.append(path) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "supervisor.entry.main", fake)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SUPERVISOR_CONFIG", "from-env.toml")
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--config", "given.toml"])
    assert exc.value.code == 7
    assert dispatch(["run"]) == 7
    assert seen == [tmp_path / "given.toml", tmp_path / "from-env.toml"]


# --- status against real processes -----------------------------------------------------


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Short: a unix socket path must fit in 107 bytes, pytest's tmp_path may not.
    path = Path(tempfile.mkdtemp(prefix="sv-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_status_no_supervisor(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch(["status", "--run-dir", str(run_dir)]) == 4
    out, err = capsys.readouterr()
    assert out == "" and err == f"no supervisor running in {run_dir}\n"
    assert dispatch(["status", "--json", "--run-dir", str(run_dir)]) == 4
    assert json.loads(capsys.readouterr().out) == {"ready": False, "components": [], "functions": []}


def test_status_uses_env_run_dir(run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPERVISOR_RUN_DIR", str(run_dir))
    assert dispatch(["status"]) == 4
    assert str(run_dir) in capsys.readouterr().err


class FakeControlPlane(control_pb2_grpc.ControlPlaneServicer):
    def __init__(self, reply: control_pb2.StatusReply) -> None:
        self.reply = reply
        self.reload_reply = make_reload_reply()
        self.scale_reply = control_pb2.ScaleReply(ok=True, min_warm=1, max_workers=8)
        self.reloads = 0
        self.scales: list[control_pb2.ScaleRequest] = []

    def GetStatus(self, request: control_pb2.StatusRequest, context: grpc.ServicerContext) -> control_pb2.StatusReply:
        return self.reply

    def Reload(self, request: control_pb2.ReloadRequest, context: grpc.ServicerContext) -> control_pb2.ReloadReply:
        self.reloads += 1
        return self.reload_reply

    def Scale(self, request: control_pb2.ScaleRequest, context: grpc.ServicerContext) -> control_pb2.ScaleReply:
        self.scales.append(request)
        return self.scale_reply


@pytest.fixture
def fake_supervisor(run_dir: Path, lock_holder: Callable[[RunPaths], subprocess.Popen[bytes]]) -> Iterator[FakeControlPlane]:
    """A run dir that looks like a live supervisor's, with a control plane answering GetStatus."""
    paths = RunPaths(run_dir)
    holder = lock_holder(paths)
    state = make_state(pid=holder.pid)
    for component in state["components"]:
        component["started_monotonic"] = time.monotonic() - 10
    write_state(paths, state)
    servicer = FakeControlPlane(make_reply())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    control_pb2_grpc.add_ControlPlaneServicer_to_server(servicer, server)
    server.add_insecure_port(paths.ctl_target)
    server.start()
    yield servicer
    server.stop(None)


def test_status_json_from_a_running_supervisor(run_dir: Path, fake_supervisor: FakeControlPlane, capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch(["status", "--json", "--run-dir", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert err == "" and doc["ready"] is True
    assert [c["name"] for c in doc["components"]] == ["control-plane", "data-plane"]
    assert 10 <= doc["components"][0]["uptime_s"] < 60
    assert [f["name"] for f in doc["functions"]] == ["hello", "web"]
    fake_supervisor.reply = make_reply(ready=False)
    assert dispatch(["status", "--json", "--run-dir", str(run_dir)]) == 3


def test_status_table_from_a_running_supervisor(run_dir: Path, fake_supervisor: FakeControlPlane, capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch(["status", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "control-plane" in out and "uptime 0:00:1" in out and "hello-1" in out


def test_status_with_a_seed_from_a_running_supervisor(run_dir: Path, fake_supervisor: FakeControlPlane, capsys: pytest.CaptureFixture[str]) -> None:
    fake_supervisor.reply = reply_with_seed(make_seed())
    assert dispatch(["status", "--json", "--run-dir", str(run_dir)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["components"][2] == {"name": "seed:hello", "pid": 300, "state": "running",
                                    "restarts": 1, "uptime_s": 61.25}
    fake_supervisor.reply = reply_with_seed(make_seed("backoff", "exited with 1"))
    assert dispatch(["status", "--run-dir", str(run_dir)]) == 3
    out = capsys.readouterr().out
    assert f"{'seed:hello':<32}{'BACKOFF':<10}pid -, uptime -, restarts 1 (exited with 1)" in out.splitlines()


def test_status_when_the_control_plane_does_not_answer(run_dir: Path, lock_holder: Callable[[RunPaths], subprocess.Popen[bytes]], capsys: pytest.CaptureFixture[str]) -> None:
    paths = RunPaths(run_dir)
    write_state(paths, make_state(pid=lock_holder(paths).pid))
    started = time.monotonic()
    assert dispatch(["status", "--json", "--run-dir", str(run_dir)]) == 3
    assert time.monotonic() - started < 5
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["ready"] is False and doc["functions"] == [] and len(doc["components"]) == 2
    assert "control plane did not answer" in err


# --- reload and scale against a control plane ---------------------------------------------


def test_reload_applied(run_dir: Path, fake_supervisor: FakeControlPlane, capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch(["reload", "--run-dir", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert out == "reloaded (generation 3): added a, b; changed c; removed d; unchanged e\n" and err == ""
    assert dispatch(["reload", "--json", "--run-dir", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"ok": True, "problems": [], "added": ["a", "b"], "removed": ["d"],
                               "changed": ["c"], "unchanged": ["e"], "generation": 3}
    assert err == "" and fake_supervisor.reloads == 2


def test_reload_refused(run_dir: Path, fake_supervisor: FakeControlPlane, capsys: pytest.CaptureFixture[str]) -> None:
    fake_supervisor.reload_reply = make_reload_reply(ok=False)
    assert dispatch(["reload", "--run-dir", str(run_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["reload refused, the running config stays (generation 2):",
                                "functions.hello.timeout: must be greater than 0",
                                "not valid TOML: line 3"]
    # --json: the object on stdout (clean for jq), the problems still on stderr.
    assert dispatch(["reload", "--json", "--run-dir", str(run_dir)]) == 2
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["ok"] is False and [p["path"] for p in doc["problems"]] == ["functions.hello.timeout", ""]
    assert "functions.hello.timeout: must be greater than 0" in err.splitlines()


def test_reload_finds_the_supervisor_by_env(run_dir: Path, fake_supervisor: FakeControlPlane, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPERVISOR_RUN_DIR", str(run_dir))
    assert dispatch(["reload"]) == 0
    assert fake_supervisor.reloads == 1


def test_scale_only_max_workers(run_dir: Path, fake_supervisor: FakeControlPlane, capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch(["scale", "hello", "--max-workers", "8", "--run-dir", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert out == "hello: min_warm=1 max_workers=8\n" and err == ""
    [received] = fake_supervisor.scales
    assert received.function == "hello" and received.max_workers == 8
    assert received.HasField("max_workers") and not received.HasField("min_warm")


def test_scale_min_warm_zero_and_json(run_dir: Path, fake_supervisor: FakeControlPlane, capsys: pytest.CaptureFixture[str]) -> None:
    fake_supervisor.scale_reply = control_pb2.ScaleReply(ok=True, min_warm=0, max_workers=4)
    assert dispatch(["scale", "hello", "--min-warm", "0", "--json", "--run-dir", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out) == {"function": "hello", "ok": True, "error": "",
                                                   "min_warm": 0, "max_workers": 4}
    [received] = fake_supervisor.scales
    assert received.HasField("min_warm") and received.min_warm == 0 and not received.HasField("max_workers")


def test_scale_refused(run_dir: Path, fake_supervisor: FakeControlPlane, capsys: pytest.CaptureFixture[str]) -> None:
    fake_supervisor.scale_reply = control_pb2.ScaleReply(ok=False, error="no function named 'nope'")
    assert dispatch(["scale", "nope", "--min-warm", "1", "--max-workers", "2", "--run-dir", str(run_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "scale nope refused: no function named 'nope'\n"
    [received] = fake_supervisor.scales
    assert (received.function, received.min_warm, received.max_workers) == ("nope", 1, 2)


@pytest.mark.parametrize("argv", [["reload"], ["reload", "--json"], ["scale", "hello", "--min-warm", "1"]])
def test_reload_and_scale_without_a_supervisor(run_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert dispatch([*argv, "--run-dir", str(run_dir)]) == 4
    out, err = capsys.readouterr()
    assert out == "" and err == f"no supervisor running in {run_dir}\n"


@pytest.mark.parametrize("argv", [["reload"], ["scale", "hello", "--max-workers", "3"]])
def test_reload_and_scale_when_the_control_plane_does_not_answer(run_dir: Path, lock_holder: Callable[[RunPaths], subprocess.Popen[bytes]], capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    paths = RunPaths(run_dir)
    write_state(paths, make_state(pid=lock_holder(paths).pid))
    started = time.monotonic()
    assert dispatch([*argv, "--run-dir", str(run_dir)]) == 3
    assert time.monotonic() - started < 5  # no socket: refused at once, not after the deadline
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("control plane did not answer ") and "UNAVAILABLE" in err


# --- invoke ----------------------------------------------------------------------


class FakeFront(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        name = self.headers.get("x-fc-function-name")
        FakeFront.seen.append((self.path, name, body))
        if name == "hello":
            status, answer = 200, b"\x00echo:" + body
        else:
            status, answer = 404, b'{"errorType":"FunctionNotFoundError","errorMessage":"no such function"}'
        self.send_response(status)
        self.send_header("x-fc-request-id", "req-123")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output clean


@pytest.fixture
def front(run_dir: Path, lock_holder: Callable[[RunPaths], subprocess.Popen[bytes]]) -> Iterator[Path]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeFront)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    paths = RunPaths(run_dir)
    state = make_state(pid=lock_holder(paths).pid)
    state["ca_port"] = server.server_address[1]
    write_state(paths, state)
    FakeFront.seen = []
    yield run_dir
    server.shutdown()
    server.server_close()


def test_invoke_success(front: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert dispatch(["invoke", "hello", "--data", "hi", "--run-dir", str(front)]) == 0
    out, err = capsysbinary.readouterr()
    assert out == b"\x00echo:hi\n" and err == b""  # a newline ends the output
    assert FakeFront.seen == [("/invoke", "hello", b"hi")]
    assert dispatch(["invoke", "hello", "--raw", "--data", "hi", "--run-dir", str(front)]) == 0
    assert capsysbinary.readouterr().out == b"\x00echo:hi"  # --raw: the bytes exactly


def test_invoke_data_from_file_and_stdin(front: Path, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    event = tmp_path / "event.bin"
    event.write_bytes(b"\xff\x00file")
    assert dispatch(["invoke", "hello", "--data", f"@{event}", "--run-dir", str(front)]) == 0
    assert capsysbinary.readouterr().out == b"\x00echo:\xff\x00file\n"
    stdin = types.SimpleNamespace(buffer=types.SimpleNamespace(read=lambda: b"from stdin"))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert dispatch(["invoke", "hello", "--data", "-", "--run-dir", str(front)]) == 0
    assert capsysbinary.readouterr().out == b"\x00echo:from stdin\n"
    assert dispatch(["invoke", "hello", "--run-dir", str(front)]) == 0  # no --data: empty event
    assert FakeFront.seen[-1] == ("/invoke", "hello", b"")


def test_invoke_error(front: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert dispatch(["invoke", "nope", "--run-dir", str(front)]) == 1
    out, err = capsysbinary.readouterr()
    assert out == b""
    body, trailer = err.decode().splitlines()
    assert json.loads(body)["errorType"] == "FunctionNotFoundError"
    assert trailer == "HTTP 404, x-fc-request-id: req-123"


def test_invoke_unreadable_data_file(front: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch(["invoke", "hello", "--data", f"@{tmp_path}/missing", "--run-dir", str(front)]) == 2
    assert "cannot read --data" in capsys.readouterr().err
    assert FakeFront.seen == []


def test_invoke_no_supervisor(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch(["invoke", "hello", "--data", "x", "--run-dir", str(run_dir)]) == 4
    assert capsys.readouterr().err == f"no supervisor running in {run_dir}\n"


def test_invoke_url() -> None:
    assert cli.invoke_url({"host": "0.0.0.0", "ca_port": 9000}) == "http://127.0.0.1:9000/invoke"
    assert cli.invoke_url({"host": "10.0.0.5", "ca_port": 9001}) == "http://10.0.0.5:9001/invoke"
    assert cli.invoke_url({"host": "::1", "ca_port": 9002}) == "http://[::1]:9002/invoke"


def test_status_says_how_each_function_is_isolated_in_a_stable_order() -> None:
    reply = make_reply()
    reply.functions[1].isolation.update({"seccomp": "deny-list", "resources": "cgroup v1 (memory)",
                                         "identity": "uid 65534 gid 65534 (nobody)"})
    doc = status_document(make_state(), reply, NOW)
    assert list(doc["functions"][1]["isolation"]) == ["identity", "resources", "seccomp"]
    assert doc["functions"][0]["isolation"] == {}
    lines = render_status(make_state(), reply, NOW).splitlines()
    web = lines.index(next(line for line in lines if line.startswith("function web")))
    assert lines[web + 2:web + 5] == ["  isolation identity: uid 65534 gid 65534 (nobody)",
                                      "  isolation resources: cgroup v1 (memory)", "  isolation seccomp: deny-list"]
