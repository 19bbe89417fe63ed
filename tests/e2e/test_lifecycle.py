"""FC lifecycle and start-up rules on real supervisors: /pre-stop, failed
initializers, routing without a default, one supervisor per run_dir, and
refusing bad configs before anything starts."""

from __future__ import annotations

import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from tests.e2e.harness import function, start, started, wait_for, write_config


def test_pre_stop_drains_in_flight_runs_hooks_then_refuses(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    hooks.chmod(0o1777)  # workers (another user when the tests run as root) write their markers here
    with started(tmp_path, {"slow": function(min_warm=2, max_workers=2, pre_stop="fns:pre_stop",
                                              env={"HOOK_DIR": str(hooks)})}) as sup:
        pids = {w["pid"] for w in sup.ready_workers("slow")}
        with ThreadPoolExecutor(4) as pool:
            inflight = [pool.submit(sup.invoke, {"op": "sleep", "s": 1.5}) for _ in range(2)]
            wait_for(lambda: sum(w["inflight"] for w in sup.workers("slow")) == 2, 10, "two invocations in flight")
            with sup.client() as client:
                pre_stop = client.get("/pre-stop", headers={"x-fc-request-id": "stop-1"})
            assert pre_stop.status_code == 200
            assert [f.result().status_code for f in inflight] == [200, 200]
        refused = sup.invoke({})
        assert refused.status_code == 503
        assert refused.json()["errorType"] == "ShuttingDownError"
        assert refused.headers["x-fc-status"] == "404" and refused.headers["retry-after"]
        written = sorted(p.name for p in hooks.iterdir())
        assert written == sorted(f"pre_stop-{pid}" for pid in pids)
        wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), 10, "workers stopped after /pre-stop")
        # It stays up, drained, until the platform's SIGTERM; then exits 0 with nothing left.
        assert sup.proc.poll() is None


def test_failed_initializer_is_404_on_initialize_and_502_on_invoke(tmp_path: Path) -> None:
    with started(tmp_path, {"broken": function(initializer="fns:bad_init")}, initialize=False) as sup:
        response = wait_for(lambda: (r := sup.post("/initialize")).status_code == 404 and r, 30, "/initialize 404")
        body = response.json()
        assert body["errorType"] == "InitializationError"
        assert "initializer refuses to start" in body["errorMessage"]
        assert response.headers["x-fc-status"] == "404"
        invoked = sup.invoke({})
        assert invoked.status_code == 502
        assert invoked.json()["errorType"] == "InitializationError"
        status = sup.cli("status", "--run-dir", str(sup.run_dir))
        assert status.returncode == 3  # not ready


def test_without_default_function_an_unknown_name_is_404(tmp_path: Path) -> None:
    with started(tmp_path, {"a": function(), "b": function()}) as sup:
        assert sup.invoke({}, function="b").status_code == 200
        for headers in ({"x-fc-function-name": "nope"}, {}):
            response = sup.post("/invoke", b"{}", headers)
            assert response.status_code == 404
            assert response.json()["errorType"] == "FunctionNotFoundError"


def test_second_supervisor_on_the_same_run_dir_refuses(tmp_path: Path) -> None:
    with started(tmp_path / "first", {"hello": function()}) as sup:
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        config = second_dir / "supervisor.toml"
        write_config(config, {"ca_port": 1, "metrics_port": 0, "run_dir": str(sup.run_dir)},
                     {"hello": function()})
        result = subprocess.run([sys.executable, "-m", "supervisor.cli", "run", "--config", str(config)],
                                capture_output=True, timeout=60, env=sup.env)
        assert result.returncode == 1
        assert b"another supervisor is running" in result.stdout + result.stderr
        assert sup.invoke({}).status_code == 200  # the first one is untouched


BAD_CONFIGS = {
    "unknown key": ('[functions.f]\nhandler = "fns:handler"\ncode_dir = "{code}"\ntimout = "1s"\n',
                    "functions.f.timout"),
    "bad duration": ('[functions.f]\nhandler = "fns:handler"\ncode_dir = "{code}"\ntimeout = "10 parsecs"\n',
                     "functions.f.timeout"),
    "bad size": ('[functions.f]\nhandler = "fns:handler"\ncode_dir = "{code}"\nmax_body = "6MB"\n',
                 "functions.f.max_body"),
    "wrong type": ('[functions.f]\nhandler = "fns:handler"\ncode_dir = "{code}"\nconcurrency = "four"\n',
                   "functions.f.concurrency"),
    "missing module": ('[functions.f]\nhandler = "nosuchmodule:handler"\ncode_dir = "{code}"\n',
                       "functions.f.handler"),
    "missing callable": ('[functions.f]\nhandler = "fns:nosuchcallable"\ncode_dir = "{code}"\n',
                         "functions.f.handler"),
    "min over max": ('[functions.f]\nhandler = "fns:handler"\ncode_dir = "{code}"\nmin_warm = 5\nmax_workers = 2\n',
                     "functions.f.min_warm"),
    "command not found": ('[functions.f]\nruntime = "custom"\ncommand = ["./no-bootstrap"]\n'
                          'code_dir = "{code}"\n', "functions.f.command"),
    "bad default": ('[supervisor]\ndefault_function = "g"\n[functions.f]\nhandler = "fns:handler"\n'
                    'code_dir = "{code}"\n', "supervisor.default_function"),
}


def test_validate_and_run_refuse_bad_configs_naming_the_key(tmp_path: Path) -> None:
    code = Path(__file__).parent / "functions"
    for name, (text, key) in BAD_CONFIGS.items():
        config = tmp_path / f"{name.replace(' ', '_')}.toml"
        config.write_text(f'[supervisor]\nrun_dir = "{tmp_path / "run"}"\n' + text.format(code=code)
                          if not text.startswith("[supervisor]") else text.format(code=code))
        validate = subprocess.run([sys.executable, "-m", "supervisor.cli", "validate", "--config", str(config)],
                                  capture_output=True, timeout=60)
        assert validate.returncode == 2, (name, validate.stdout, validate.stderr)
        assert key.encode() in validate.stderr, (name, validate.stderr)
        run = subprocess.run([sys.executable, "-m", "supervisor.cli", "run", "--config", str(config)],
                             capture_output=True, timeout=60)
        assert run.returncode == 2, (name, run.stdout, run.stderr)
        assert key.encode() in run.stderr, (name, run.stderr)
        assert not (tmp_path / "run" / "supervisor.json").exists(), f"{name}: something was started"


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    config = tmp_path / "many.toml"
    config.write_text('[supervisor]\nca_port = "x"\n[functions.f]\nhandler = "fns:handler"\n'
                      'code_dir = "/nonexistent"\ntimeout = "1y"\nbogus = 1\n')
    result = subprocess.run([sys.executable, "-m", "supervisor.cli", "validate", "--config", str(config)],
                            capture_output=True, timeout=60)
    assert result.returncode == 2
    for key in (b"supervisor.ca_port", b"functions.f.code_dir", b"functions.f.timeout", b"functions.f.bogus"):
        assert key in result.stderr, result.stderr


def test_sigint_is_a_graceful_stop_too(tmp_path: Path) -> None:
    sup = start(tmp_path, {"hello": function()})
    assert sup.invoke({}).status_code == 200
    sup.remember_processes()
    assert sup.stop(signal.SIGINT) == 0
    assert not sup.leaked()
