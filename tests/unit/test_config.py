"""Tests for supervisor.config: the TOML contract (docs/configuration.md), its problems and helpers."""

from __future__ import annotations

import textwrap
from fractions import Fraction
from pathlib import Path
from typing import Any

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.config import (
    Config,
    ConfigError,
    FunctionConfig,
    Limits,
    Problem,
    SupervisorSettings,
    bundled_config_path,
    check_handlers,
    load_config,
    parse_config,
    parse_config_text,
    parse_duration,
    parse_size,
    resolve_config_path,
    show_duration,
    show_size,
)

MiB = 1 << 20

# The contract's original example config, every key with a comment, verbatim.
DESIGN_EXAMPLE = """
[supervisor]
ca_port = 9000          # env FC_SERVER_PORT, then FC_CUSTOM_LISTEN_PORT, then CA_PORT override it
host = "0.0.0.0"        # FC requires 0.0.0.0; 127.0.0.1 times out there
metrics_port = 9464     # /metrics, /healthz, /readyz; 0 disables
run_dir = "/tmp/ca-supervisor"   # sockets and state; env SUPERVISOR_RUN_DIR
log_format = "json"     # json | console
default_function = "hello"       # which function /invoke hits when the request names none
grace_period = "30s"    # drain budget for /pre-stop and SIGTERM

[functions.hello]
runtime = "python"      # python | custom | lambda | scf
handler = "hello:handler"        # python: module:callable, imported from code_dir
interface = "event"     # python: event (handler(event, context)) | asgi | wsgi (an HTTP app)
code_dir = "examples/hello"      # relative paths are relative to the config file
initializer = "hello:init"       # optional; runs once in every worker before it serves
pre_freeze = "hello:pre_freeze"  # optional
pre_stop = "hello:pre_stop"      # optional
timeout = "10s"         # per invocation; on expiry: 504, the worker is killed and replaced
concurrency = 1         # in-flight invocations per worker (Noslate maxActivateRequests)
min_warm = 1            # workers kept started and initialized (Noslate reservationCount)
max_workers = 4         # hard cap (Noslate replicaCountLimit)
max_queue = 64          # waiting invocations per function; beyond it: 503 + Retry-After
idle_ttl = "60s"        # a worker above min_warm idle this long is retired
shrink_strategy = "lcc" # lcc (least current concurrency) | fifo | filo
max_requests = 0        # recycle a worker after N invocations (0 = never), with jitter
recycle_memory_share = 0.9       # recycle a worker whose RSS passes this share of limits.memory (0 = never)
disposable = false      # one invocation per worker, then it is destroyed
max_body = "6MiB"       # larger request: 413
env = { GREETING = "hi" }

[functions.hello.limits]
memory = "256MiB"       # enforced per worker; exceeding it kills the worker (OOM, reported as such)
cpu = 1.0               # cores
pids = 64
nofile = 1024
user = "nobody"         # when the supervisor runs as root: a user name, or "auto" (a distinct uid per function); never root by default
network = "inherit"     # inherit | none (own empty network namespace)
seccomp = true          # the syscall deny-list
require_isolation = false        # true: refuse to start when a limit above cannot be enforced

[functions.web]
runtime = "custom"      # any language: a command that starts an HTTP server
command = ["node", "server.js"]  # or ["./bootstrap"]
code_dir = "examples/express"
ready = "http:/"        # http:PATH | tcp ; the server gets its port in FC_SERVER_PORT and PORT
startup_timeout = "15s"
hooks = []              # lifecycle calls forwarded to each worker's server: "initialize", "pre-freeze", "pre-stop"

[functions.lam]
runtime = "lambda"      # pull model: the command talks to AWS_LAMBDA_RUNTIME_API
command = ["python", "-m", "awslambdaric", "app.handler"]
code_dir = "examples/lambda"
"""


def minimal(**function: Any) -> dict[str, Any]:
    """The smallest valid config (one python function in base_dir), with overrides."""
    return {"functions": {"hello": {"handler": "hello:handler", "code_dir": ".", **function}}}


def problems_of(data: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None) -> list[Problem]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, tmp_path, env or {})
    return caught.value.problems


def paths_of(problems: list[Problem]) -> list[str]:
    return [p.path for p in problems]


# --- the contract example and defaults ----------------------------------------------


def test_design_example_parses(tmp_path: Path) -> None:
    for name in ("hello", "express", "lambda"):
        (tmp_path / "examples" / name).mkdir(parents=True)
    (tmp_path / "supervisor.toml").write_text(DESIGN_EXAMPLE)

    config = load_config(tmp_path / "supervisor.toml", env={})

    assert config.path == (tmp_path / "supervisor.toml").absolute()
    assert list(config.functions) == ["hello", "web", "lam"]  # file order kept
    s = config.supervisor
    assert (s.ca_port, s.host, s.metrics_port, s.run_dir) == (9000, "0.0.0.0", 9464, Path("/tmp/ca-supervisor"))
    assert (s.log_format, s.default_function, s.grace_period) == ("json", "hello", 30.0)
    hello = config.functions["hello"]
    assert hello.code_dir == (tmp_path / "examples" / "hello").resolve()
    assert (hello.handler, hello.initializer, hello.pre_freeze, hello.pre_stop) == (
        "hello:handler", "hello:init", "hello:pre_freeze", "hello:pre_stop")
    assert (hello.timeout, hello.idle_ttl, hello.max_body) == (10.0, 60.0, 6 * MiB)
    assert hello.env == {"GREETING": "hi"}
    assert hello.limits == Limits(memory=256 * MiB, cpu=1.0, pids=64, nofile=1024, user="nobody",
                                  network="inherit", seccomp=True, require_isolation=False)
    web, lam = config.functions["web"], config.functions["lam"]
    assert (web.runtime, web.command, web.ready, web.startup_timeout, web.hooks) == (
        "custom", ("node", "server.js"), "http:/", 15.0, ())
    assert (lam.runtime, lam.command) == ("lambda", ("python", "-m", "awslambdaric", "app.handler"))


def test_every_default(tmp_path: Path) -> None:
    config = parse_config(minimal(), tmp_path, {})
    assert config.path is None
    assert config.supervisor == SupervisorSettings(
        ca_port=9000, host="0.0.0.0", metrics_port=9464, run_dir=Path("/tmp/ca-supervisor"),
        log_format="json", default_function=None, grace_period=30.0)
    f = config.functions["hello"]
    assert f.name == "hello" and f.code_dir == tmp_path.resolve()
    expected = {
        "runtime": "python", "interface": "event", "initializer": None, "pre_freeze": None, "pre_stop": None,
        "timeout": 60.0, "concurrency": 1, "min_warm": 1, "max_workers": 4, "max_queue": 64, "idle_ttl": 60.0,
        "shrink_strategy": "lcc", "max_requests": 0, "recycle_memory_share": 0.9, "disposable": False,
        "max_body": 6 * MiB, "env": {}, "command": None, "ready": "http:/", "startup_timeout": 15.0, "hooks": (),
    }
    assert {key: getattr(f, key) for key in expected} == expected
    assert f.limits == Limits()
    assert (f.limits.memory, f.limits.cpu, f.limits.pids, f.limits.nofile, f.limits.user) == (None,) * 5
    assert (f.limits.network, f.limits.seccomp, f.limits.require_isolation) == ("inherit", True, False)


def test_objects_are_frozen(tmp_path: Path) -> None:
    config = parse_config(minimal(), tmp_path, {})
    with pytest.raises(pydantic.ValidationError):
        config.functions["hello"].timeout = 1.0  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        config.supervisor.ca_port = 1  # type: ignore[misc]


def test_relative_paths_start_at_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf" / "code").mkdir(parents=True)
    (tmp_path / "conf" / "supervisor.toml").write_text(
        '[supervisor]\nrun_dir = "run"\n[functions.f]\nhandler = "m:f"\ncode_dir = "code"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("conf/supervisor.toml"), env={})
    assert config.functions["f"].code_dir == (tmp_path / "conf" / "code").resolve()
    assert config.supervisor.run_dir == (tmp_path / "conf" / "run").resolve()


def test_other_runtimes_and_values(tmp_path: Path) -> None:
    data = minimal(interface="asgi", hooks=[], limits={"cpu": 2, "memory": "16MiB", "network": "none"},
                   timeout="250ms", max_body="512KiB", recycle_memory_share=0)
    data["functions"]["srv"] = {"runtime": "custom", "command": ["./bootstrap"], "code_dir": ".", "ready": "tcp",
                                "hooks": ["initialize", "pre-freeze", "pre-stop"]}
    data["supervisor"] = {"metrics_port": 0, "log_format": "console", "grace_period": "1.5m"}
    config = parse_config(data, tmp_path, {})
    f, srv = config.functions["hello"], config.functions["srv"]
    assert (f.interface, f.timeout, f.max_body, f.recycle_memory_share) == ("asgi", 0.25, 512 * 1024, 0.0)
    assert (f.limits.cpu, f.limits.memory, f.limits.network) == (2.0, 16 * MiB, "none")
    assert (srv.ready, srv.hooks) == ("tcp", ("initialize", "pre-freeze", "pre-stop"))
    assert (config.supervisor.metrics_port, config.supervisor.grace_period) == (0, 90.0)


# --- problems -----------------------------------------------------------------------

F = "functions.hello"


@pytest.mark.parametrize(
    ("function", "path", "message"),
    [
        ({"timout": "1s"}, f"{F}.timout", "unknown key (did you mean 'timeout'?)"),
        ({"limits": {"memroy": "1MiB"}}, f"{F}.limits.memroy", "unknown key (did you mean 'memory'?)"),
        ({"name": "x"}, f"{F}.name", "unknown key"),
        ({"concurrency": "x"}, f"{F}.concurrency", "expected an integer, got 'x'"),
        ({"concurrency": 0}, f"{F}.concurrency", "must be at least 1, got 0"),
        ({"concurrency": True}, f"{F}.concurrency", "expected an integer, got true"),
        ({"min_warm": -1}, f"{F}.min_warm", "must be at least 0"),
        ({"max_workers": 0}, f"{F}.max_workers", "must be at least 1"),
        ({"max_queue": -1}, f"{F}.max_queue", "must be at least 0"),
        ({"max_requests": 1.5}, f"{F}.max_requests", "expected an integer, got 1.5"),
        ({"disposable": "yes"}, f"{F}.disposable", "expected true or false, got 'yes'"),
        ({"recycle_memory_share": 1.5}, f"{F}.recycle_memory_share", "must be at most 1"),
        ({"recycle_memory_share": -0.1}, f"{F}.recycle_memory_share", "must be at least 0"),
        ({"timeout": 10}, f"{F}.timeout", 'a duration needs a unit: write it as a string, e.g. "10s"'),
        ({"timeout": "10"}, f"{F}.timeout", "'10' has no unit"),
        ({"timeout": "soon"}, f"{F}.timeout", "expected a duration such as '10s'"),
        ({"timeout": "0s"}, f"{F}.timeout", "must be at least 1ms, got '0s'"),
        ({"idle_ttl": [1]}, f"{F}.idle_ttl", "expected a duration such as '10s', '250ms', '1.5m' or '2h'"),
        ({"startup_timeout": "0ms"}, f"{F}.startup_timeout", "must be at least 1ms"),
        ({"max_body": "6MB"}, f"{F}.max_body", "use binary units B, KiB, MiB, GiB or TiB"),
        ({"max_body": "lots"}, f"{F}.max_body", "expected a size such as '6MiB'"),
        ({"max_body": 0}, f"{F}.max_body", "must be greater than 0"),
        ({"limits": {"memory": "0.3B"}}, f"{F}.limits.memory", "not a whole number of bytes"),
        ({"limits": {"cpu": 0}}, f"{F}.limits.cpu", "must be at least 0.01, got 0"),
        ({"limits": {"cpu": True}}, f"{F}.limits.cpu", "expected a number, got true"),
        ({"limits": {"cpu": float("nan")}}, f"{F}.limits.cpu", "expected a finite number"),
        ({"limits": {"pids": 0}}, f"{F}.limits.pids", "must be at least 4"),
        ({"limits": {"nofile": "many"}}, f"{F}.limits.nofile", "expected an integer, got 'many'"),
        ({"limits": {"user": 0}}, f"{F}.limits.user", "expected a string, got 0"),
        ({"limits": {"network": "host"}}, f"{F}.limits.network", "expected 'inherit' or 'none', got 'host'"),
        ({"limits": {"seccomp": 1}}, f"{F}.limits.seccomp", "expected true or false, got 1"),
        ({"limits": 5}, f"{F}.limits", "expected a table, got 5"),
        ({"runtime": "java"}, f"{F}.runtime", "expected 'python', 'custom', 'lambda' or 'scf', got 'java'"),
        ({"interface": "http"}, f"{F}.interface", "expected 'event', 'asgi' or 'wsgi', got 'http'"),
        ({"shrink_strategy": "lifo"}, f"{F}.shrink_strategy", "expected 'lcc', 'fifo' or 'filo'"),
        ({"handler": "hello.handler"}, f"{F}.handler", 'expected "module:callable"'),
        ({"handler": None}, f"{F}.handler", 'missing: a python function needs handler = "module:callable"'),
        ({"initializer": "init"}, f"{F}.initializer", 'expected "module:callable"'),
        ({"pre_freeze": "a:b:c"}, f"{F}.pre_freeze", 'expected "module:callable"'),
        ({"pre_stop": ":stop"}, f"{F}.pre_stop", 'expected "module:callable"'),
        ({"command": ["x"]}, f"{F}.command", "only custom, lambda and scf functions take a command"),
        ({"command": ["x", 1]}, f"{F}.command[1]", "expected a string, got 1"),
        ({"env": {"1BAD": "x"}}, f"{F}.env.1BAD", "not a valid environment variable name"),
        ({"env": {"A-B": "x"}}, f"{F}.env.A-B", "not a valid environment variable name"),
        ({"env": {"PORT": 80}}, f"{F}.env.PORT", "expected a string, got 80"),
        ({"env": "A=1"}, f"{F}.env", "expected a table, got 'A=1'"),
        ({"ready": "http"}, f"{F}.ready", 'expected "tcp" or "http:/PATH"'),
        ({"hooks": ["init"]}, f"{F}.hooks[0]", "expected 'initialize', 'pre-freeze' or 'pre-stop', got 'init'"),
        ({"hooks": "initialize"}, f"{F}.hooks", "expected a list"),
        ({"hooks": ["initialize"]}, f"{F}.hooks", "a python function uses initializer, pre_freeze and pre_stop"),
        ({"ready": "tcp"}, f"{F}.ready", "a python function is ready when its initializer has run"),
        ({"runtime": "custom", "command": ["x"], "handler": None, "interface": "asgi"}, f"{F}.interface",
         "only python functions take interface"),
        ({"runtime": "custom", "command": ["x"]}, f"{F}.handler", "a custom function runs its command"),
        ({"runtime": "lambda", "command": ["x"], "hooks": ["pre-stop"], "handler": None}, f"{F}.hooks",
         "only custom functions take hooks"),
        ({"runtime": "scf", "command": ["x"], "ready": "tcp", "handler": None}, f"{F}.ready",
         "only custom functions take ready"),
        ({"runtime": "lambda", "command": ["x"], "handler": " "}, f"{F}.handler", "must not be an empty string"),
        ({"code_dir": "missing"}, f"{F}.code_dir", "does not exist"),
        ({"code_dir": 3}, f"{F}.code_dir", "expected a directory path as a string, got 3"),
        ({"code_dir": None}, f"{F}.code_dir", "expected a directory path"),
        ({"min_warm": 5, "max_workers": 4}, f"{F}.min_warm", "min_warm (5) cannot exceed max_workers (4)"),
        ({"min_warm": 5}, f"{F}.min_warm", "min_warm (5) cannot exceed max_workers (4)"),
    ],
)
def test_function_problem(tmp_path: Path, function: dict[str, Any], path: str, message: str) -> None:
    problems = problems_of(minimal(**function), tmp_path)
    assert len(problems) == 1, problems
    assert problems[0].path == path
    assert message in problems[0].message


def test_code_dir_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    [problem] = problems_of(minimal(code_dir="file"), tmp_path)
    assert problem.path == f"{F}.code_dir" and "is not a directory" in problem.message


def test_code_dir_is_required(tmp_path: Path) -> None:
    data = minimal()
    del data["functions"]["hello"]["code_dir"]
    assert problems_of(data, tmp_path) == [Problem(f"{F}.code_dir", "missing (this key is required)")]


@pytest.mark.parametrize("runtime", ["custom", "lambda", "scf"])
def test_non_python_runtimes(tmp_path: Path, runtime: str) -> None:
    data = {"functions": {"web": {"runtime": runtime, "code_dir": "."}}}
    [problem] = problems_of(data, tmp_path)
    assert problem.path == "functions.web.command" and problem.message.startswith(f"missing: a {runtime} function needs")
    data["functions"]["web"]["command"] = []
    assert problems_of(data, tmp_path) == [Problem("functions.web.command", "must not be empty")]
    data["functions"]["web"].update(command=["./bootstrap"], interface="wsgi", handler="a:b", initializer="a:c",
                                    pre_freeze="a:d", pre_stop="a:e")
    # lambda and scf take their runtime's handler name (Lambda's _HANDLER) as it is.
    handler = ["functions.web.handler"] if runtime == "custom" else []
    assert paths_of(problems_of(data, tmp_path)) == [
        *handler, "functions.web.initializer", "functions.web.pre_freeze",
        "functions.web.pre_stop", "functions.web.interface"]


@pytest.mark.parametrize(
    ("supervisor", "path", "message"),
    [
        ({"ca_port": "x"}, "supervisor.ca_port", "expected an integer, got 'x'"),
        ({"ca_port": 0}, "supervisor.ca_port", "must be at least 1"),
        ({"ca_port": 70000}, "supervisor.ca_port", "must be at most 65535, got 70000"),
        ({"metrics_port": -1}, "supervisor.metrics_port", "must be at least 0"),
        ({"metrics_port": 9000}, "supervisor.metrics_port", "must differ from ca_port (9000)"),
        ({"host": ""}, "supervisor.host", "must not be an empty string"),
        ({"run_dir": 1}, "supervisor.run_dir", "expected a directory path as a string, got 1"),
        ({"log_format": "text"}, "supervisor.log_format", "expected 'json' or 'console', got 'text'"),
        ({"grace_period": 30}, "supervisor.grace_period", "a duration needs a unit"),
        ({"default_function": "nope"}, "supervisor.default_function", "'nope' is not a configured function (configured: 'hello')"),
        ({"default_function": 1}, "supervisor.default_function", "expected a string, got 1"),
        ({"port": 1}, "supervisor.port", "unknown key"),
    ],
)
def test_supervisor_problem(tmp_path: Path, supervisor: dict[str, Any], path: str, message: str) -> None:
    problems = problems_of({**minimal(), "supervisor": supervisor}, tmp_path)
    assert len(problems) == 1, problems
    assert problems[0].path == path and message in problems[0].message


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ({}, "functions", "no function is configured"),
        ({"functions": {}}, "functions", "no function is configured"),
        ({"functions": 3}, "functions", "expected tables of functions such as [functions.hello], got 3"),
        ({"functions": {"hello": "x"}}, "functions.hello", "expected a table, got 'x'"),
        ({**minimal(), "supervisor": []}, "supervisor", "expected a table, got a list"),
        ({**minimal(), "function": {}}, "function", "unknown key"),
    ],
)
def test_top_level_problem(tmp_path: Path, data: dict[str, Any], path: str, message: str) -> None:
    problems = problems_of(data, tmp_path)
    assert len(problems) == 1, problems
    assert problems[0].path == path and message in problems[0].message


@pytest.mark.parametrize(("name", "path"), [("a b", 'functions."a b"'), ("a.b", 'functions."a.b"'),
                                           ("héllo", 'functions."h\\u00e9llo"'), ("a/b", 'functions."a/b"'),
                                           ("", 'functions.""'), ("a\nb", 'functions."a\\nb"')])
def test_function_names(tmp_path: Path, name: str, path: str) -> None:
    """A key that is not bare is quoted as TOML would, so a problem stays one line of ASCII."""
    data = {"functions": {name: minimal()["functions"]["hello"]}}
    [problem] = problems_of(data, tmp_path)
    assert problem.path == path and "letters, digits, '_' and '-'" in problem.message


def test_function_names_are_at_most_64_characters(tmp_path: Path) -> None:
    body = minimal()["functions"]["hello"]
    assert list(parse_config({"functions": {"a" * 64: body}}, tmp_path, {}).functions) == ["a" * 64]
    [problem] = problems_of({"functions": {"a" * 65: body}}, tmp_path)
    assert problem == Problem(f"functions.{'a' * 65}", "a function name must be at most 64 characters, got 65")


def test_good_function_names(tmp_path: Path) -> None:
    body = minimal()["functions"]["hello"]
    config = parse_config({"functions": {"A-z_09": body, "x": body}}, tmp_path, {})
    assert list(config.functions) == ["A-z_09", "x"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    data = {
        "supervisr": {},
        "supervisor": {"ca_port": "x", "default_function": "nope", "grace_period": 5},
        "functions": {
            "bad name": {"code_dir": "missing", "timout": "1s", "concurrency": "x", "min_warm": 5,
                         "max_workers": 2, "env": {"1A": "x"}, "limits": {"memory": "1MB"}, "ready": "x"},
            "web": {"runtime": "custom", "code_dir": ".", "interface": "asgi"},
        },
    }
    problems = problems_of(data, tmp_path, {"FC_SERVER_PORT": "abc"})
    assert sorted(paths_of(problems)) == sorted([
        "supervisr", "supervisor.ca_port", "supervisor.grace_period", "supervisor.default_function",
        "env.FC_SERVER_PORT", 'functions."bad name"', 'functions."bad name".handler', 'functions."bad name".code_dir',
        'functions."bad name".timout', 'functions."bad name".concurrency', 'functions."bad name".min_warm',
        'functions."bad name".env.1A', 'functions."bad name".limits.memory', 'functions."bad name".ready',
        "functions.web.command", "functions.web.interface",
    ])
    assert all(p.message for p in problems)


def test_config_error_text(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal(timout="1s", concurrency="x"), tmp_path, {})
    assert str(caught.value).splitlines() == [
        "functions.hello.concurrency: expected an integer, got 'x'",
        "functions.hello.timout: unknown key (did you mean 'timeout'?)",
    ]
    assert str(ConfigError([Problem("a.b", "bad"), Problem("c", "worse")])) == "a.b: bad\nc: worse"


def test_load_config_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.toml", env={})
    [problem] = caught.value.problems
    assert problem.path == str(tmp_path / "absent.toml") and "cannot read the config file" in problem.message
    (tmp_path / "bad.toml").write_text("[functions.hello\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "bad.toml", env={})
    assert "not valid TOML" in caught.value.problems[0].message


# --- environment overrides ----------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "port"),
    [
        ({}, 8000),
        ({"CA_PORT": "9003"}, 9003),
        ({"FC_CUSTOM_LISTEN_PORT": "9002", "CA_PORT": "9003"}, 9002),
        ({"FC_SERVER_PORT": "9001", "FC_CUSTOM_LISTEN_PORT": "9002", "CA_PORT": "9003"}, 9001),
        ({"FC_SERVER_PORT": "9001", "CA_PORT": "9003"}, 9001),
        ({"FC_SERVER_PORT": "", "CA_PORT": "9003"}, 9003),  # empty counts as unset
    ],
)
def test_port_override_precedence(tmp_path: Path, env: dict[str, str], port: int) -> None:
    config = parse_config({**minimal(), "supervisor": {"ca_port": 8000}}, tmp_path, env)
    assert config.supervisor.ca_port == port


@pytest.mark.parametrize("var", ["FC_SERVER_PORT", "FC_CUSTOM_LISTEN_PORT", "CA_PORT"])
@pytest.mark.parametrize("value", ["x", "90.5", "0", "65536", "-1"])
def test_bad_port_in_env(tmp_path: Path, var: str, value: str) -> None:
    [problem] = problems_of(minimal(), tmp_path, {var: value, "CA_PORT": "9003"} if var != "CA_PORT" else {var: value})
    assert problem.path == f"env.{var}" and problem.message == f"expected a port number 1..65535, got {value!r}"


def test_env_port_clashing_with_metrics(tmp_path: Path) -> None:
    [problem] = problems_of(minimal(), tmp_path, {"FC_SERVER_PORT": "9464"})
    assert problem.path == "supervisor.metrics_port"


@pytest.mark.parametrize(
    ("env", "port"),
    [
        ({}, 8001),
        ({"SUPERVISOR_METRICS_PORT": "9470"}, 9470),
        ({"SUPERVISOR_METRICS_PORT": " 9470\n"}, 9470),
        ({"SUPERVISOR_METRICS_PORT": "0"}, 0),  # disables metrics, as the key does
        ({"SUPERVISOR_METRICS_PORT": "65535"}, 65535),
        ({"SUPERVISOR_METRICS_PORT": ""}, 8001),  # empty counts as unset
    ],
)
def test_metrics_port_override(tmp_path: Path, env: dict[str, str], port: int) -> None:
    config = parse_config({**minimal(), "supervisor": {"metrics_port": 8001}}, tmp_path, env)
    assert config.supervisor.metrics_port == port


@pytest.mark.parametrize("value", ["x", "90.5", "65536", "-1", "0x10", "9" * 5000, "1 2"])
def test_bad_metrics_port_in_env(tmp_path: Path, value: str) -> None:
    [problem] = problems_of(minimal(), tmp_path, {"SUPERVISOR_METRICS_PORT": value})
    assert problem.path == "env.SUPERVISOR_METRICS_PORT"
    assert problem.message.startswith("expected a port number 0..65535 (0 disables metrics), got ")
    assert len(problem.message) < 200  # one readable line, also for a huge value


def test_huge_ca_port_in_env_is_a_problem(tmp_path: Path) -> None:
    # int() refuses more than 4300 digits with a ValueError: never a traceback.
    [problem] = problems_of(minimal(), tmp_path, {"FC_SERVER_PORT": "9" * 5000})
    assert problem.path == "env.FC_SERVER_PORT" and len(problem.message) < 200


def test_env_problems_are_reported_together(tmp_path: Path) -> None:
    problems = problems_of(minimal(), tmp_path, {"FC_SERVER_PORT": "x", "SUPERVISOR_METRICS_PORT": "y"})
    assert paths_of(problems) == ["env.FC_SERVER_PORT", "env.SUPERVISOR_METRICS_PORT"]


def test_env_metrics_port_clashing_with_ca_port_names_the_variable(tmp_path: Path) -> None:
    [problem] = problems_of(minimal(), tmp_path, {"SUPERVISOR_METRICS_PORT": "9000"})
    assert problem.path == "env.SUPERVISOR_METRICS_PORT" and "must differ from ca_port (9000)" in problem.message
    [problem] = problems_of(minimal(), tmp_path, {"SUPERVISOR_METRICS_PORT": "9100", "FC_SERVER_PORT": "9100"})
    assert problem.path == "env.SUPERVISOR_METRICS_PORT"
    # The environment resolves a clash in the file, too.
    data = {**minimal(), "supervisor": {"ca_port": 9000, "metrics_port": 9000}}
    assert parse_config(data, tmp_path, {"SUPERVISOR_METRICS_PORT": "0"}).supervisor.metrics_port == 0


def test_run_dir_override(tmp_path: Path) -> None:
    data = {**minimal(), "supervisor": {"run_dir": "/tmp/x"}}
    assert parse_config(data, tmp_path, {"SUPERVISOR_RUN_DIR": "/run/sup"}).supervisor.run_dir == Path("/run/sup")
    assert parse_config(data, tmp_path, {"SUPERVISOR_RUN_DIR": ""}).supervisor.run_dir == Path("/tmp/x")


def test_load_config_reads_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "supervisor.toml").write_text('[functions.f]\nhandler = "m:f"\ncode_dir = "."\n')
    for var in ("FC_SERVER_PORT", "FC_CUSTOM_LISTEN_PORT", "CA_PORT", "SUPERVISOR_RUN_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CA_PORT", "9100")
    assert load_config(tmp_path / "supervisor.toml").supervisor.ca_port == 9100


# --- function_for -----------------------------------------------------------------


def test_function_for(tmp_path: Path) -> None:
    body = minimal()["functions"]["hello"]
    one = parse_config({"functions": {"a": body}}, tmp_path, {})
    assert one.function_for(None) is one.functions["a"] and one.function_for("zz") is one.functions["a"]
    two = parse_config({"functions": {"a": body, "b": body}}, tmp_path, {})
    assert two.function_for("b") is two.functions["b"]
    assert two.function_for(None) is None and two.function_for("zz") is None
    dflt = parse_config({"supervisor": {"default_function": "b"}, "functions": {"a": body, "b": body}}, tmp_path, {})
    assert dflt.function_for("a") is dflt.functions["a"]
    assert dflt.function_for(None) is dflt.functions["b"] and dflt.function_for("zz") is dflt.functions["b"]


# --- durations and sizes ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("250ms", 0.25), ("1.5m", 90.0), ("2h", 7200.0), ("0s", 0.0), (".5s", 0.5), (" 3 ms ", 0.003)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [("10", "'10' has no unit; write e.g. '10s' or '10ms' (units: ms, s, m, h)"), ("1.5", "has no unit"),
     ("10sec", "expected a duration such as '10s'"), ("-1s", "expected a duration"), ("1d", "expected a duration"),
     ("", "expected a duration"), ("s", "expected a duration"), ("10S", "expected a duration"), ("infs", "expected")],
)
def test_parse_duration_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(text)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "size"),
    [("6MiB", 6 * MiB), ("512KiB", 512 << 10), ("1GiB", 1 << 30), ("1TiB", 1 << 40), ("100B", 100), ("1024", 1024),
     ("0.5KiB", 512), ("0", 0)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [("6MB", "use binary units"), ("1k", "use binary units"), ("1G", "use binary units"), ("1.5B", "whole number"),
     ("lots", "expected a size"), ("-1", "expected a size"), ("", "expected a size"), ("1TB", "use binary units"),
     ("1" * 1001, "more than 1000 characters")],
)
def test_parse_size_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_size(text)
    assert message in str(caught.value)


@given(st.integers(min_value=0, max_value=10**15))
def test_duration_round_trips(n: int) -> None:
    assert parse_duration(f"{n}ms") == n / 1000
    assert parse_duration(f"{n}s") == float(n)
    assert parse_duration(f"{n}m") == float(n * 60)
    assert parse_duration(f"{n}h") == float(n * 3600)


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=999))
def test_decimal_durations(whole: int, millis: int) -> None:
    assert parse_duration(f"{whole}.{millis:03d}s") == (whole * 1000 + millis) / 1000


@given(st.integers(min_value=0, max_value=1 << 40), st.sampled_from([("B", 1), ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)]))
def test_size_round_trips(n: int, unit: tuple[str, int]) -> None:
    assert parse_size(f"{n}{unit[0]}") == n * unit[1]
    assert parse_size(str(n)) == n


@given(st.integers(min_value=0, max_value=10**9))
def test_bare_numbers_are_not_durations(n: int) -> None:
    with pytest.raises(ValueError, match="has no unit"):
        parse_duration(str(n))


# --- resolve_config_path and the bundled example -------------------------------------


def test_resolve_config_path_order(tmp_path: Path) -> None:
    env = {"SUPERVISOR_CONFIG": "from-env.toml"}
    assert resolve_config_path("cli.toml", env, tmp_path) == tmp_path / "cli.toml"
    assert resolve_config_path("/abs/cli.toml", env, tmp_path) == Path("/abs/cli.toml")
    assert resolve_config_path(None, env, tmp_path) == tmp_path / "from-env.toml"
    assert resolve_config_path(None, {"SUPERVISOR_CONFIG": "/abs/env.toml"}, tmp_path) == Path("/abs/env.toml")
    assert resolve_config_path(None, {}, tmp_path) == bundled_config_path()  # no ./supervisor.toml yet
    (tmp_path / "supervisor.toml").write_text("")
    assert resolve_config_path(None, {}, tmp_path) == tmp_path / "supervisor.toml"
    assert resolve_config_path(None, {"SUPERVISOR_CONFIG": ""}, tmp_path) == tmp_path / "supervisor.toml"
    assert resolve_config_path("", env, tmp_path) == tmp_path / "from-env.toml"


def test_bundled_example_is_valid() -> None:
    path = bundled_config_path()
    assert path.name == "supervisor.toml" and path.is_file()
    config = load_config(path, env={})
    assert config.supervisor.default_function == "hello"
    hello = config.functions["hello"]
    assert (hello.handler, hello.initializer, hello.timeout, hello.code_dir) == (
        "hello:handler", "hello:init", 10.0, path.parent.resolve())
    assert check_handlers(config) == []


# --- check_handlers -----------------------------------------------------------------


def write_module(directory: Path, name: str, source: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


def config_with(tmp_path: Path, **functions: dict[str, Any]) -> Config:
    data = {"functions": {name: {"code_dir": name, **body} for name, body in functions.items()}}
    for name in functions:
        (tmp_path / name).mkdir(exist_ok=True)
    return parse_config(data, tmp_path, {})


def test_check_handlers(tmp_path: Path) -> None:
    write_module(tmp_path / "good", "app", """
        import os, sys
        print("noise on stdout while importing")
        assert os.environ["GREETING"] == "hi"           # the function env is applied
        assert os.getcwd() == os.path.dirname(__file__)  # cwd is code_dir
        def handler(event, context): return event
        def init(context): pass
        class Hooks:
            @staticmethod
            def stop(context): pass
    """)
    write_module(tmp_path / "good" / "pkg", "__init__", "")
    write_module(tmp_path / "good" / "pkg", "mod", "def handler(event, context): return 1\n")
    write_module(tmp_path / "noattr", "app", "def handler(event, context): pass\nvalue = 3\n")
    write_module(tmp_path / "boom", "boom", "raise RuntimeError('boom at import')\n")
    write_module(tmp_path / "exits", "bye", "import sys; sys.exit(3)\n")
    config = config_with(
        tmp_path,
        good={"handler": "app:handler", "initializer": "app:init", "pre_stop": "app:Hooks.stop", "env": {"GREETING": "hi"}},
        dotted={"handler": "pkg.mod:handler", "code_dir": "good"},
        missing={"handler": "hello:handler"},
        noattr={"handler": "app:handler", "initializer": "app:init", "pre_freeze": "app:value"},
        boom={"handler": "boom:handler"},
        exits={"handler": "bye:handler"},
        web={"runtime": "custom", "command": ["./not-there"], "code_dir": "good"},
    )
    assert check_handlers(config) == [
        Problem("functions.web.command", f"'./not-there' does not exist (relative to code_dir {str(tmp_path / 'good')!r})"),
        Problem("functions.missing.handler", "cannot import 'hello:handler': ModuleNotFoundError: No module named 'hello'"),
        Problem("functions.noattr.initializer", "cannot import 'app:init': module 'app' has no attribute 'init'"),
        Problem("functions.noattr.pre_freeze", "'app:value' is not callable (it is 'int')"),
        Problem("functions.boom.handler", "cannot import 'boom:handler': RuntimeError: boom at import"),
        Problem("functions.exits.handler", "cannot import 'bye:handler': SystemExit: 3"),
    ]


def test_check_handlers_crashing_interpreter(tmp_path: Path) -> None:
    write_module(tmp_path / "crash", "app", "import os\nos._exit(7)\n")
    [problem] = check_handlers(config_with(tmp_path, crash={"handler": "app:handler"}))
    assert problem.path == "functions.crash" and "exit code 7" in problem.message


def test_check_handlers_times_out_each_function(tmp_path: Path) -> None:
    for name in ("hang1", "hang2", "hang3"):
        write_module(tmp_path / name, "slow", "import time\ntime.sleep(60)\n")
    write_module(tmp_path / "ok", "app", "def handler(e, c): pass\n")
    config = config_with(tmp_path, hang1={"handler": "slow:handler"}, hang2={"handler": "slow:handler"},
                         hang3={"handler": "slow:handler"}, ok={"handler": "app:handler"})
    problems = check_handlers(config, timeout_s=1.0)
    assert paths_of(problems) == ["functions.hang1", "functions.hang2", "functions.hang3"]
    assert all("did not finish within 1s" in p.message and "'slow:handler'" in p.message for p in problems)


def test_check_handlers_finds_each_command(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "bootstrap").write_text("#!/bin/sh\n")
    (code / "runnable").write_text("#!/bin/sh\n")
    (code / "runnable").chmod(0o755)
    config = config_with(tmp_path, plain={"runtime": "custom", "command": ["./bootstrap"], "code_dir": "code"},
                         ok={"runtime": "custom", "command": ["./runnable"], "code_dir": "code"},
                         onpath={"runtime": "lambda", "command": ["sh", "-c", "true"], "code_dir": "code"},
                         nowhere={"runtime": "scf", "command": ["no-such-program-here"], "code_dir": "code"})
    assert check_handlers(config) == [
        Problem("functions.plain.command", "'./bootstrap' is not executable (chmod +x it)"),
        Problem("functions.nowhere.command", "'no-such-program-here' is not found on PATH"),
    ]


def test_function_config_is_a_model() -> None:
    # Other modules build these directly in their tests: durations may be numbers of seconds there.
    f = FunctionConfig(name="x", handler="a:b", code_dir=Path("/"), timeout=2, idle_ttl=0.5)
    assert (f.code_dir, f.timeout, f.idle_ttl, f.limits) == (Path("/"), 2.0, 0.5, Limits())


EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*/supervisor.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.parent.name for p in EXAMPLES])
def test_every_example_config_is_valid(path: Path) -> None:
    # What the README tells people to run must at least pass `supervisor validate`; a function with a
    # requirements.txt does once `supervisor deps` installed it (tests/e2e/test_image_path.py does that).
    config = load_config(path, env={})
    needs_deps = {name for name, fn in config.functions.items() if (fn.code_dir / "requirements.txt").is_file()}
    assert [p for p in check_handlers(config) if p.path.split(".")[1] not in needs_deps] == []
    assert len(EXAMPLES) >= 7


# --- bounds: what validates can run (issue 11, item 8) --------------------------------
# Each row: a key path under functions.hello (or supervisor), the largest (or smallest)
# value accepted, the first refused, and the bound as the message states it.

BOUNDS = [
    ("timeout", "24h", "86400.001s", "must be at most 24h"),
    ("timeout", "1ms", "0.999ms", "must be at least 1ms"),
    ("startup_timeout", "1440m", "1441m", "must be at most 24h"),
    ("startup_timeout", "0.001s", "0.0009s", "must be at least 1ms"),
    ("idle_ttl", "86400s", "24.0001h", "must be at most 24h"),
    ("concurrency", 1000, 1001, "must be at most 1000"),
    ("max_workers", 1000, 1001, "must be at most 1000"),
    ("min_warm", 1000, 1001, "must be at most 1000"),
    ("max_queue", 100_000, 100_001, "must be at most 100000"),
    ("max_requests", 1_000_000_000, 1_000_000_001, "must be at most 1000000000"),
    ("max_body", "1GiB", (1 << 30) + 1, "must be at most 1GiB"),
    ("max_body", 1, 0, "must be greater than 0"),
    ("limits.memory", "1TiB", "1025GiB", "must be at most 1TiB"),
    ("limits.memory", "16MiB", "16383KiB", "must be at least 16MiB"),
    ("limits.cpu", 1024, 1024.001, "must be at most 1024"),
    ("limits.cpu", 0.01, 0.0099, "must be at least 0.01"),
    ("limits.pids", 4_194_304, 4_194_305, "must be at most 4194304"),
    ("limits.pids", 4, 3, "must be at least 4"),
    ("limits.nofile", 1 << 20, (1 << 20) + 1, "must be at most 1048576"),
    ("limits.nofile", 64, 63, "must be at least 64"),
    ("limits.user", "4294967294", "4294967295", "a numeric uid must be at most 4294967294"),
]


def with_key(path: str, value: Any) -> dict[str, Any]:
    if path.startswith("limits."):
        return minimal(max_workers=1000, limits={path.split(".", 1)[1]: value})
    return minimal(**{"max_workers": 1000, path: value})


@pytest.mark.parametrize(("path", "ok", "bad", "message"), BOUNDS, ids=[f"{b[0]}={b[2]}" for b in BOUNDS])
def test_every_bound_accepts_its_limit_and_refuses_the_next(tmp_path: Path, path: str, ok: Any, bad: Any,
                                                            message: str) -> None:
    parse_config(with_key(path, ok), tmp_path, {})
    [problem] = problems_of(with_key(path, bad), tmp_path)
    assert problem.path == f"{F}.{path}" and problem.message.startswith(message), problem


@pytest.mark.parametrize("key", ["grace_period"])
def test_supervisor_durations_are_bounded(tmp_path: Path, key: str) -> None:
    parse_config({**minimal(), "supervisor": {key: "24h"}}, tmp_path, {})
    [problem] = problems_of({**minimal(), "supervisor": {key: "1441m"}}, tmp_path)
    assert problem == Problem(f"supervisor.{key}", "must be at most 24h, got '1441m'")


def test_a_timeout_accepted_fits_every_field_it_goes_into(tmp_path: Path) -> None:
    """The router sends int(timeout * 1000) in a uint32 and the manager jitters max_requests
    into one: the largest accepted values must fit (1200h and 2**63-1 did not)."""
    from calink.messages import HttpRequest, Invoke
    from supervisor.control.policy import jittered_max_requests
    from supervisor.v1 import control_pb2 as cpb

    f = parse_config(minimal(timeout="24h", max_requests=1_000_000_000), tmp_path, {}).functions["hello"]
    assert Invoke.decode(Invoke(timeout_ms=int(f.timeout * 1000)).encode()).timeout_ms == 86_400_000
    assert HttpRequest.decode(HttpRequest(timeout_ms=int(f.timeout * 1000)).encode()).timeout_ms == 86_400_000
    assert cpb.WorkerAdded(max_requests=jittered_max_requests(f.max_requests, 0.999999)).max_requests > 10**9
    smallest = parse_config(minimal(timeout="1ms"), tmp_path, {}).functions["hello"]
    assert Invoke.decode(Invoke(timeout_ms=int(smallest.timeout * 1000)).encode()).timeout_ms == 1  # never 0


@pytest.mark.parametrize(
    ("function", "path", "message"),
    [
        ({"timeout": "9" * 400 + "s"}, f"{F}.timeout", "must be at most 24h"),
        ({"timeout": "9" * 5000 + "s"}, f"{F}.timeout", "more than 1000 characters"),
        ({"max_body": "9" * 5000}, f"{F}.max_body", "more than 1000 characters"),
        ({"timeout": float("inf")}, f"{F}.timeout", "a duration needs a unit"),
        ({"max_requests": 2**63 - 1}, f"{F}.max_requests", "must be at most 1000000000"),
        ({"max_requests": 10**400}, f"{F}.max_requests", "must be at most 1000000000, got an integer of 401 digits"),
        ({"limits": {"pids": 2**63 - 1}}, f"{F}.limits.pids", "must be at most 4194304"),
        ({"limits": {"cpu": 1e300}}, f"{F}.limits.cpu", "must be at most 1024, got 1e+300"),
        ({"limits": {"cpu": float("inf")}}, f"{F}.limits.cpu", "expected a finite number"),
        ({"limits": {"user": ""}}, f"{F}.limits.user", "must not be an empty string"),
        ({"limits": {"user": "no\0body"}}, f"{F}.limits.user", "expected a user name"),
        ({"limits": {"user": "nobody\n"}}, f"{F}.limits.user", "expected a user name"),
        ({"limits": {"user": "a" * 33}}, f"{F}.limits.user", "expected a user name"),
        ({"limits": {"user": "١٢"}}, f"{F}.limits.user", "expected a user name"),
        ({"limits": {"user": "99999999999"}}, f"{F}.limits.user", "a numeric uid must be at most 4294967294"),
        ({"env": {"A": "x\0y"}}, f"{F}.env.A", "contains a NUL character, which cannot be in an environment variable"),
        ({"env": {"A": "x" * (128 << 10)}}, f"{F}.env.A", "NAME=value and its NUL must be at most 128KiB"),
        ({"env": {"LONG_NAME": "x" * ((128 << 10) - 1)}}, f"{F}.env.LONG_NAME", "got 131082 bytes"),
        ({"env": {f"V{i}": "x" * 100_000 for i in range(11)}}, f"{F}.env", "must be at most 1MiB together"),
        ({"env": {"A=B": "x"}}, f'{F}.env."A=B"', "not a valid environment variable name"),
        ({"env": {"A\0": "x"}}, f'{F}.env."A\\u0000"', "not a valid environment variable name"),
        ({"env": {"A\n": "x"}}, f'{F}.env."A\\n"', "not a valid environment variable name"),
        ({"runtime": "custom", "handler": None, "command": ["./run", "a\0b"]}, f"{F}.command[1]", "NUL"),
        ({"runtime": "custom", "handler": None, "command": [""]}, f"{F}.command", "must not be an empty string"),
        ({"runtime": "lambda", "handler": "app.h\0", "command": ["x"]}, f"{F}.handler", "NUL"),
        ({"runtime": "lambda", "handler": "h" * 1025, "command": ["x"]}, f"{F}.handler", "at most 1024 characters"),
        ({"handler": "m:" + "h" * 1023}, f"{F}.handler", "at most 1024 characters"),
        ({"runtime": "custom", "handler": None, "command": ["./run", "x" * (16 << 10)]}, f"{F}.command",
         "must be at most 16KiB all together"),
        ({"runtime": "custom", "handler": None, "command": ["x"], "ready": "http:/a b"}, f"{F}.ready",
         "printable ASCII without spaces"),
        ({"runtime": "custom", "handler": None, "command": ["x"], "ready": "http:/\r\nX: y"}, f"{F}.ready",
         "printable ASCII"),
        ({"runtime": "custom", "handler": None, "command": ["x"], "ready": "http:/é"}, f"{F}.ready",
         "printable ASCII"),
        ({"code_dir": "a\0b"}, f"{F}.code_dir", "contains a NUL character"),
        ({"code_dir": "~no-such-user-here/x"}, f"{F}.code_dir", "cannot expand"),
    ],
)
def test_values_that_cannot_reach_their_use_are_refused(tmp_path: Path, function: dict[str, Any], path: str,
                                                        message: str) -> None:
    problems = problems_of(minimal(**function), tmp_path)
    assert [p.path for p in problems] == [path], problems
    assert message in problems[0].message, problems[0]


def test_the_largest_env_value_is_accepted(tmp_path: Path) -> None:
    value = "x" * ((128 << 10) - 1 - len("A="))  # "A=value" and its NUL: exactly the kernel's 128 KiB
    assert parse_config(minimal(env={"A": value}), tmp_path, {}).functions["hello"].env["A"] == value
    [problem] = problems_of(minimal(env={"AB": value}), tmp_path)
    assert problem.path == f"{F}.env.AB" and "got 131073 bytes" in problem.message


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1", "::", "::1", "fe80::1%lo", "localhost", "my-host.example.",
                                  "a" * 63])
def test_hosts_accepted(tmp_path: Path, host: str) -> None:
    assert parse_config({**minimal(), "supervisor": {"host": host}}, tmp_path, {}).supervisor.host == host


@pytest.mark.parametrize("host", ["127.0.0.1\0x", "a b", "-bad", "a" * 64, "a..b", "héllo", "http://x", "1.2.3.4:80"])
def test_hosts_refused(tmp_path: Path, host: str) -> None:
    [problem] = problems_of({**minimal(), "supervisor": {"host": host}}, tmp_path)
    assert problem.path == "supervisor.host" and "expected an IP address or host name" in problem.message


def test_a_run_dir_too_long_for_its_sockets_is_refused(tmp_path: Path) -> None:
    fits = "/r" + "d" * (107 - len("/r/control.sock"))
    assert parse_config({**minimal(), "supervisor": {"run_dir": fits}}, tmp_path, {}).supervisor.run_dir == Path(fits)
    [problem] = problems_of({**minimal(), "supervisor": {"run_dir": fits + "d"}}, tmp_path)
    assert problem.path == "supervisor.run_dir" and "108 bytes, at most 107" in problem.message
    [problem] = problems_of(minimal(), tmp_path, {"SUPERVISOR_RUN_DIR": fits + "d"})
    assert problem.path == "env.SUPERVISOR_RUN_DIR"
    [problem] = problems_of({**minimal(), "supervisor": {"run_dir": "/r\0"}}, tmp_path)
    assert problem.path == "supervisor.run_dir" and "NUL" in problem.message


@pytest.mark.parametrize(
    ("text", "message"),
    [("x = " + "[" * 33 + "]" * 33, "nested more than 32 deep"),
     ("x = " + "[" * 5000 + "]" * 5000, "nested more than 32 deep"),  # tomllib's own RecursionError
     ("x = " + "{ a = " * 2000 + "1" + " }" * 2000, "nested more than 32 deep"),
     ("x = " + "9" * 5000, "an integer has more digits than can be read"),
     ("x = [", "not valid TOML")],
)
def test_toml_that_cannot_be_read_is_one_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text, tmp_path, tmp_path / "s.toml", {})
    [problem] = caught.value.problems
    assert problem.path == str(tmp_path / "s.toml") and message in problem.message, problem


def test_a_file_is_at_most_2mib(tmp_path: Path) -> None:
    """A reloaded file's text travels between the planes in one gRPC message (4 MiB at most)."""
    body = 'handler = "hello:handler"\ncode_dir = "."\n'
    fits = "[functions.hello]\n" + body + "#" * ((2 << 20) - len("[functions.hello]\n" + body) - 1) + "\n"
    (tmp_path / "fits.toml").write_text(fits)
    assert list(load_config(tmp_path / "fits.toml", env={}).functions) == ["hello"]
    (tmp_path / "big.toml").write_text(fits + "#\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "big.toml", env={})
    assert caught.value.problems == [Problem(str(tmp_path / "big.toml"), "a config file must be at most 2MiB, got more")]
    (tmp_path / "cut.toml").write_text(fits + "é\n")  # the bound falls inside the 2-byte character
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "cut.toml", env={})
    assert caught.value.problems == [Problem(str(tmp_path / "cut.toml"), "a config file must be at most 2MiB, got more")]


def test_nesting_up_to_the_bound_is_read(tmp_path: Path) -> None:
    text = 'x = ' + "[" * 31 + "]" * 31  # 32 with the top table: read, then refused as an unknown key
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text, tmp_path, None, {})
    assert paths_of(caught.value.problems)[0] == "x"


@pytest.mark.parametrize(("n", "text"), [(1 << 30, "1GiB"), (1 << 40, "1TiB"), (3 * MiB, "3MiB"), (1000, "1000B"),
                                         (2048, "2KiB")])
def test_show_size(n: int, text: str) -> None:
    assert show_size(n) == text and parse_size(text) == n


@pytest.mark.parametrize(("seconds", "text"), [(86400, "24h"), (Fraction(1, 1000), "1ms"), (90, "90s"), (120, "2m"),
                                               (1.5, "1.5s")])
def test_show_duration(seconds: Any, text: str) -> None:
    assert show_duration(seconds) == text and parse_duration(text) == float(seconds)
