"""The `supervisor` command line: run | validate | deps | status | invoke | reload | scale.

The contract is docs/cli.md. The rules:

* Exit codes are part of the contract: `validate` 0 or 2; `status` 0 when
  every component is running and the pools are ready, 3 when something is
  not (or the control plane does not answer), 4 when no supervisor is
  running; `invoke` 0 on a 2xx answer, 1 otherwise, 4 when no supervisor is
  running; `reload` and `scale` 0 when applied, 2 when the supervisor
  refused (the running config stays), 3 when its control plane does not
  answer, 4 when no supervisor is running; `reload --wait` 5 when the
  config was applied but its new workers did not serve within `--timeout`
  (or failed to initialize); `deps` 0 when every install was done, 1 when
  one failed, 2 when the config is invalid or `--function` names no Python
  function (supervisor/deps.py). Usage errors exit 2 (argparse's convention).
* Commands that talk to a running supervisor find its run directory by
  `--run-dir`, else `$SUPERVISOR_RUN_DIR`, else the `run_dir` of the config
  they would load, read even when the file has other problems (else
  `/tmp/ca-supervisor`, the default, when the file cannot be read as TOML).
  When a config decides it, `status` and `reload` also judge that config:
  its problems go to stderr and they exit 2 (`status` still shows the
  supervisor the file's run_dir leads to; `reload` asks for nothing), as
  `validate` would. `invoke` learns the CA port from supervisor.json;
  nothing is assumed about a port.
* stdout carries only the result (the table, the JSON object, the handler's
  bytes); diagnostics go to stderr, so `supervisor status --json | jq` and
  `supervisor invoke f > out.bin` stay clean.
* Rendering is pure: `status_document`, `status_exit_code` and
  `render_status` take a state dict and a StatusReply (or None) and a clock
  reading, and do no I/O, so they are tested without processes; so do the
  `reload_*` and `scale_*` functions with their replies.
* Seeds are components too: the control plane reports them in
  StatusReply.components ("seed:<function>"); they join the planes from
  supervisor.json in `status` and count for its exit code like any other
  component (a seed that is not running means workers start by slow spawn).
* Heavy imports (gRPC, pydantic via the config, the entry point) happen
  inside the commands that need them: `validate` should not pay for gRPC,
  and `status` should answer fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from supervisor.runstate import RunPaths, read_state, supervisor_alive

if TYPE_CHECKING:
    from supervisor.config import Problem
    from supervisor.v1.control_pb2 import (
        ComponentStatus,
        FunctionStatus,
        ReloadReply,
        ScaleReply,
        ScaleRequest,
        StatusReply,
    )

DEFAULT_RUN_DIR = Path("/tmp/ca-supervisor")
STATUS_TIMEOUT_S = 2.0
# The control plane answers Reload once the new config is accepted, without
# waiting for new workers (unless --wait: then this comes on top of its wait);
# the margin is for a loaded host.
RELOAD_TIMEOUT_S = 60.0
RELOAD_WAIT_S = 60.0  # reload --wait's default --timeout
SCALE_TIMEOUT_S = 10.0
UINT32_MAX = 2**32 - 1  # min_warm / max_workers travel as uint32

EXIT_OK = 0
EXIT_INVOKE_FAILED = 1
EXIT_DEPS_FAILED = 1  # deps: an install failed
EXIT_INVALID = 2
EXIT_NOT_RUNNING_WELL = 3
EXIT_NO_SUPERVISOR = 4
EXIT_NOT_SERVING = 5  # reload --wait: applied, but the new workers do not serve

# The contract's keys, in the contract's order. Components and workers carry
# exactly these; function objects may carry more (init_error, mode counts...).
COMPONENT_KEYS = ("name", "pid", "state", "restarts", "uptime_s")
FUNCTION_KEYS = ("name", "runtime", "min_warm", "max_workers", "concurrency", "queue_depth", "inflight", "workers")
WORKER_KEYS = ("id", "pid", "state", "inflight", "served", "age_s", "rss_bytes", "mode")


# --- finding the supervisor ----------------------------------------------------------


class RunDirLookup(NamedTuple):
    """Where a running supervisor is looked for, and what was wrong with the config that said so."""

    run_dir: Path | None  # None: the config decides it, and it cannot be read as TOML
    config: Path | None  # the config that decided it (None: --run-dir or $SUPERVISOR_RUN_DIR did)
    problems: list[Problem]  # that config's problems (none when it is valid or did not decide)


def config_run_dir(path: Path) -> Path | None:
    """The run_dir a config file names, read even when the file has other
    problems: only the TOML and ``[supervisor] run_dir`` itself must be sound
    (the default when the key is absent); None when they are not."""
    from supervisor.config import MAX_FILE

    try:
        with path.open("rb") as file:
            data = tomllib.loads(file.read(MAX_FILE).decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not TOML
        return None
    table = data.get("supervisor", {})
    value = table.get("run_dir", str(DEFAULT_RUN_DIR)) if isinstance(table, dict) else None
    if not isinstance(value, str) or not value or "\0" in value:
        return None
    try:
        return (path.parent / Path(value).expanduser()).absolute()
    except RuntimeError:  # "~nosuchuser/..."
        return None


def find_run_dir(cli_run_dir: str | None, env: Mapping[str, str], cwd: Path,
                 config_path: str | None = None) -> RunDirLookup:
    """--run-dir, else $SUPERVISOR_RUN_DIR, else the config's run_dir (with the config's problems)."""
    # An empty variable counts as unset, as in the config's own env overrides.
    for given in (cli_run_dir, env.get("SUPERVISOR_RUN_DIR")):
        if given:
            return RunDirLookup((cwd / Path(given).expanduser()).absolute(), None, [])
    from supervisor.config import ConfigError, load_config, resolve_config_path

    path = resolve_config_path(config_path, env, cwd)
    try:
        return RunDirLookup(load_config(path, env).supervisor.run_dir.absolute(), path, [])
    except ConfigError as exc:
        return RunDirLookup(config_run_dir(path), path, exc.problems)


def resolve_run_dir(cli_run_dir: str | None, env: Mapping[str, str], cwd: Path,
                    config_path: str | None = None) -> Path:
    """--run-dir, else $SUPERVISOR_RUN_DIR, else the config's run_dir, else /tmp/ca-supervisor
    (a config that cannot be read as TOML must not stop us from looking at a
    supervisor that runs with the default)."""
    return find_run_dir(cli_run_dir, env, cwd, config_path).run_dir or DEFAULT_RUN_DIR


def _config_problems(lookup: RunDirLookup, consequence: str) -> None:
    """The problems of the config that decided the run dir, on stderr."""
    print(f"{lookup.config}: invalid config ({consequence}):", file=sys.stderr)
    for problem in lookup.problems:
        print(_problem_line(problem.path, problem.message), file=sys.stderr)


def _no_supervisor(run_dir: Path) -> None:
    print(f"no supervisor running in {run_dir}", file=sys.stderr)


# --- status: pure rendering --------------------------------------------------------


def _uptime(component: Mapping[str, Any], now_monotonic: float) -> float | None:
    started = component.get("started_monotonic")
    # Only a live process has an uptime; a component in backoff or exited
    # keeps its last start time, which would read as a growing uptime.
    if component.get("state") not in ("starting", "running") or not isinstance(started, (int, float)):
        return None
    return round(max(0.0, now_monotonic - float(started)), 3)


def _component(component: Mapping[str, Any], now_monotonic: float) -> dict[str, Any]:
    return {
        "name": str(component.get("name", "?")),
        "pid": component.get("pid"),
        "state": str(component.get("state", "unknown")),
        "restarts": int(component.get("restarts", 0) or 0),
        "uptime_s": _uptime(component, now_monotonic),
    }


def _reported_component(component: ComponentStatus) -> dict[str, Any]:
    """A component the control plane reports (a seed), in the shape of the planes'."""
    return {
        "name": component.name,
        "pid": component.pid or None,
        "state": component.state or "unknown",
        "restarts": component.restarts,
        "uptime_s": round(component.uptime_s, 3) if component.state == "running" else None,
    }


def _function(function: FunctionStatus) -> dict[str, Any]:
    return {
        "name": function.name,
        "runtime": function.runtime,
        "min_warm": function.min_warm,
        "max_workers": function.max_workers,
        "concurrency": function.concurrency,
        "queue_depth": function.queue_depth,
        "inflight": function.inflight,
        "workers": [
            {
                "id": w.id,
                "pid": w.pid,
                "state": w.state,
                "inflight": w.inflight,
                "served": w.served,
                "age_s": round(w.age_s, 3),
                "rss_bytes": w.rss_bytes,
                "mode": w.mode or None,
            }
            for w in function.workers
        ],
        # Extra keys are allowed inside function objects only.
        "init_error": function.init_error or None,
        "isolation": dict(sorted(function.isolation.items(), key=lambda kv: (ISOLATION_ORDER.get(kv[0], 9), kv[0]))),
    }


ISOLATION_ORDER = {"identity": 0, "resources": 1, "namespaces": 2, "network": 3, "seccomp": 4}


def status_document(state: Mapping[str, Any] | None, reply: StatusReply | None,
                    now_monotonic: float) -> dict[str, Any]:
    """The contract's `status --json` object from supervisor.json and GetStatus (None: no answer)."""
    components = state.get("components", []) if state is not None else []
    reported = [_reported_component(c) for c in reply.components] if reply is not None else []
    # The control plane's word on a component it reports wins over a stale
    # supervisor.json entry of the same name.
    names = {c["name"] for c in reported}
    planes = [_component(c, now_monotonic) for c in components if isinstance(c, Mapping)]
    return {
        # Not ready when the control plane did not answer: nobody vouched for it.
        "ready": bool(reply is not None and reply.ready),
        "components": [c for c in planes if c["name"] not in names] + reported,
        "functions": [_function(f) for f in reply.functions] if reply is not None else [],
    }


def status_exit_code(document: Mapping[str, Any]) -> int:
    """0 when every component is running and the supervisor is ready, else 3."""
    components = document["components"]
    # No component at all means the supervisor has not started its planes yet.
    all_running = bool(components) and all(c["state"] == "running" for c in components)
    return EXIT_OK if all_running and document["ready"] else EXIT_NOT_RUNNING_WELL


def format_duration(seconds: float | None) -> str:
    """H:MM:SS, as supervisorctl prints uptimes; '-' when unknown."""
    if seconds is None:
        return "-"
    total = int(seconds)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def format_age(seconds: float) -> str:
    """A compact age for worker rows: 4.2s, 3m07s, 2h05m, 3d04h."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    total = int(seconds)
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


def format_bytes(n: int) -> str:
    """Binary units, as the config writes sizes: 512B, 12.3KiB, 48.0MiB, 1.2GiB."""
    if n < 1024:
        return f"{n}B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f}{unit}"


def _one_line(text: str) -> str:
    """A multi-line detail (a traceback's tail, say) on the component's one line."""
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())


_NAME_WIDTH = 32  # supervisorctl's column widths, so the output reads the same
_STATE_WIDTH = 10
_WORKER_HEADER = ("ID", "PID", "STATE", "INFLIGHT", "SERVED", "AGE", "RSS", "MODE")


def render_status(state: Mapping[str, Any] | None, reply: StatusReply | None,
                  now_monotonic: float) -> str:
    """The human table: supervisor line, one line per component, then per function its workers."""
    document = status_document(state, reply, now_monotonic)
    details = {c.name: _one_line(c.detail) for c in reply.components if c.detail.strip()} if reply is not None else {}
    lines: list[str] = []
    if state is not None:
        lines.append(
            f"supervisor pid {state.get('pid', '-')}, {str(state.get('state', 'unknown')).upper()}, "
            f"ready {'yes' if document['ready'] else 'no'}, CA port {state.get('ca_port', '-')}"
        )
    for c in document["components"]:
        pid = "-" if c["pid"] is None else str(c["pid"])
        lines.append(
            f"{c['name']:<{_NAME_WIDTH - 1}} {c['state'].upper():<{_STATE_WIDTH}}"
            f"pid {pid}, uptime {format_duration(c['uptime_s'])}, restarts {c['restarts']}"
            + (f" ({details[c['name']]})" if c["name"] in details else "")
        )
    if reply is None:
        return "\n".join(lines) + "\n"
    for function, raw in zip(document["functions"], reply.functions):
        ready = sum(1 for w in function["workers"] if w["state"] in ("idle", "busy"))
        lines.append("")
        lines.append(
            f"function {function['name']} ({function['runtime']}): "
            f"workers {len(function['workers'])}/{function['max_workers']} "
            f"({ready} ready, min_warm {function['min_warm']}), "
            f"capacity {ready * function['concurrency']}, "
            f"inflight {function['inflight']}, queue {function['queue_depth']}"
        )
        if function["init_error"]:
            lines.append(f"  init error: {function['init_error']}")
        for kind, how in function["isolation"].items():
            lines.append(f"  isolation {kind}: {how}")
        if not function["workers"]:
            lines.append("  (no workers)")
            continue
        rows = [_WORKER_HEADER] + [
            (w["id"], str(w["pid"]), w["state"], str(w["inflight"]), str(w["served"]),
             format_age(w["age_s"]), format_bytes(w["rss_bytes"]), ws.mode or "-")
            for w, ws in zip(function["workers"], raw.workers)
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_WORKER_HEADER))]
        for row in rows:
            # Numbers right-aligned so digits line up; text left-aligned.
            cells = [cell.rjust(width) if i in (1, 3, 4, 5, 6) else cell.ljust(width)
                     for i, (cell, width) in enumerate(zip(row, widths))]
            lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


# --- status: I/O -------------------------------------------------------------------


def fetch_status(paths: RunPaths, timeout_s: float = STATUS_TIMEOUT_S) -> StatusReply:
    """GetStatus over the control socket; raises grpc.RpcError when it does not answer."""
    import grpc

    from supervisor.v1 import control_pb2, control_pb2_grpc

    # A unix socket never goes through a proxy, whatever http_proxy says.
    with grpc.insecure_channel(paths.ctl_target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = control_pb2_grpc.ControlPlaneStub(channel)
        reply: StatusReply = stub.GetStatus(control_pb2.StatusRequest(), timeout=timeout_s)
        return reply


def cmd_status(args: argparse.Namespace) -> int:
    lookup = find_run_dir(args.run_dir, os.environ, Path.cwd(), args.config)
    if lookup.problems:
        _config_problems(lookup, "status shows the supervisor its run_dir leads to" if lookup.run_dir
                         else "its run_dir cannot be read")
    if lookup.run_dir is None:
        return EXIT_INVALID
    code = _status(args, lookup.run_dir)
    return EXIT_INVALID if lookup.problems else code


def _status(args: argparse.Namespace, run_dir: Path) -> int:
    paths = RunPaths(run_dir)
    state = read_state(paths) if supervisor_alive(paths) else None
    if state is None:
        _no_supervisor(run_dir)
        if args.json:
            print(json.dumps(status_document(None, None, time.monotonic())))
        return EXIT_NO_SUPERVISOR
    reply: StatusReply | None
    try:
        reply = fetch_status(paths)
    except Exception as exc:  # grpc.RpcError, or a socket path gRPC refuses
        reply = None
        detail = exc.details() if hasattr(exc, "details") else str(exc)  # RpcError's readable part
        print(f"control plane did not answer on {paths.control_sock}: {detail}", file=sys.stderr)
    now = time.monotonic()
    document = status_document(state, reply, now)
    if args.json:
        print(json.dumps(document))
    else:
        sys.stdout.write(render_status(state, reply, now))
    code = status_exit_code(document)
    return code


# --- reload and scale: pure rendering --------------------------------------------------


def _problem_line(path: str, message: str) -> str:
    return f"{path}: {message}" if path else message


def reload_document(reply: ReloadReply) -> dict[str, Any]:
    """`reload --json`: the ReloadReply as one JSON object."""
    return {
        "ok": reply.ok,
        "problems": [{"path": p.path, "message": p.message} for p in reply.problems],
        "added": list(reply.added),
        "removed": list(reply.removed),
        "changed": list(reply.changed),
        "unchanged": list(reply.unchanged),
        "generation": reply.generation,
    } | ({"serving": reply.serving, "not_serving": reply.not_serving} if reply.waited else {})


def render_reload(reply: ReloadReply) -> str:
    """One line for an accepted reload: what happened to which function."""
    parts = [f"{verb} {', '.join(names)}" for verb, names in (
        ("added", reply.added), ("changed", reply.changed),
        ("removed", reply.removed), ("unchanged", reply.unchanged)) if names]
    return f"reloaded (generation {reply.generation})" + (": " + "; ".join(parts) if parts else "") + "\n"


def reload_refused_document(problems: Sequence[Problem]) -> dict[str, Any]:
    """`reload --json` when the config is refused here, before any supervisor is asked (generation null)."""
    return {"ok": False, "problems": [{"path": p.path, "message": p.message} for p in problems],
            "added": [], "removed": [], "changed": [], "unchanged": [], "generation": None}


def render_reload_refused(reply: ReloadReply) -> str:
    """stderr for a refused reload: that nothing changed, then every problem with its key path."""
    lines = [f"reload refused, the running config stays (generation {reply.generation}):"]
    lines += [_problem_line(p.path, p.message) for p in reply.problems]
    if not reply.problems:
        lines.append("(the supervisor gave no reason)")
    return "\n".join(lines) + "\n"


def scale_request(function: str, min_warm: int | None, max_workers: int | None) -> ScaleRequest:
    """A ScaleRequest carrying only what was given: an unset field leaves that setting alone."""
    from supervisor.v1 import control_pb2

    request = control_pb2.ScaleRequest(function=function)
    if min_warm is not None:
        request.min_warm = min_warm
    if max_workers is not None:
        request.max_workers = max_workers
    return request


def scale_document(function: str, reply: ScaleReply) -> dict[str, Any]:
    """`scale --json`: the ScaleReply as one JSON object, with the function it was about."""
    return {"function": function, "ok": reply.ok, "error": reply.error,
            "min_warm": reply.min_warm, "max_workers": reply.max_workers}


def render_scale(function: str, reply: ScaleReply) -> str:
    return f"{function}: min_warm={reply.min_warm} max_workers={reply.max_workers}\n"


# --- reload and scale: I/O -----------------------------------------------------------


def _live_paths(args: argparse.Namespace) -> RunPaths | None:
    """The running supervisor's run dir, found as `status` finds it; None (and said so) when none runs."""
    run_dir = resolve_run_dir(args.run_dir, os.environ, Path.cwd(), args.config)
    paths = RunPaths(run_dir)
    if not supervisor_alive(paths) or read_state(paths) is None:
        _no_supervisor(run_dir)
        return None
    return paths


def _rpc_failed(paths: RunPaths, rpc: str, exc: Exception, outcome: str = "") -> int:
    import grpc

    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        code, detail = exc.code(), exc.details()
        reason = f"{code.name}: {detail}" if code is not None else str(detail)
    else:  # a socket path gRPC refuses, say
        reason = str(exc)
    print(f"control plane did not answer {rpc} on {paths.control_sock}: {reason}{outcome}", file=sys.stderr)
    return EXIT_NOT_RUNNING_WELL


def request_reload(paths: RunPaths, timeout_s: float = RELOAD_TIMEOUT_S, wait_s: float = 0.0) -> ReloadReply:
    """Reload over the control socket (``wait_s`` > 0: and wait until the new config
    serves, at most that long); raises grpc.RpcError when it does not answer."""
    import grpc

    from supervisor.v1 import control_pb2, control_pb2_grpc

    with grpc.insecure_channel(paths.ctl_target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = control_pb2_grpc.ControlPlaneStub(channel)
        reply: ReloadReply = stub.Reload(control_pb2.ReloadRequest(wait_s=wait_s), timeout=timeout_s + wait_s)
        return reply


def request_scale(paths: RunPaths, request: ScaleRequest, timeout_s: float = SCALE_TIMEOUT_S) -> ScaleReply:
    """Scale over the control socket; raises grpc.RpcError when it does not answer."""
    import grpc

    from supervisor.v1 import control_pb2_grpc

    with grpc.insecure_channel(paths.ctl_target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = control_pb2_grpc.ControlPlaneStub(channel)
        reply: ScaleReply = stub.Scale(request, timeout=timeout_s)
        return reply


def _wait_seconds(text: str) -> float:
    """`reload --timeout`: positive seconds, at most a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400 seconds: {text!r}")
    return value


def cmd_reload(args: argparse.Namespace) -> int:
    lookup = find_run_dir(args.run_dir, os.environ, Path.cwd(), args.config)
    if lookup.problems:
        # The supervisor would refuse it the same way; nothing is asked of it.
        _config_problems(lookup, "reload not requested; the running config stays")
        if args.json:
            print(json.dumps(reload_refused_document(lookup.problems)))
        return EXIT_INVALID
    paths = _live_paths(args)
    if paths is None:
        return EXIT_NO_SUPERVISOR
    try:
        reply = request_reload(paths, wait_s=args.timeout if args.wait else 0.0)
    except Exception as exc:  # grpc.RpcError, or a socket path gRPC refuses
        # A deadline may pass after the control plane accepted the new config.
        return _rpc_failed(paths, "Reload", exc, "; whether the reload took effect is unknown: see `supervisor status`")
    if args.json:
        print(json.dumps(reload_document(reply)))
    if not reply.ok:
        sys.stderr.write(render_reload_refused(reply))
        return EXIT_INVALID
    if not args.json:
        sys.stdout.write(render_reload(reply))
    if reply.waited and not reply.serving:
        print(f"reload applied, but the new config does not serve: {reply.not_serving}", file=sys.stderr)
        return EXIT_NOT_SERVING
    return EXIT_OK


def cmd_scale(args: argparse.Namespace) -> int:
    paths = _live_paths(args)
    if paths is None:
        return EXIT_NO_SUPERVISOR
    try:
        reply = request_scale(paths, scale_request(args.function, args.min_warm, args.max_workers))
    except Exception as exc:  # grpc.RpcError, or a socket path gRPC refuses
        return _rpc_failed(paths, "Scale", exc)
    if args.json:
        print(json.dumps(scale_document(args.function, reply)))
    if not reply.ok:
        print(f"scale {args.function} refused: {reply.error or 'the supervisor gave no reason'}", file=sys.stderr)
        return EXIT_INVALID
    if not args.json:
        sys.stdout.write(render_scale(args.function, reply))
    return EXIT_OK


# --- invoke ------------------------------------------------------------------------


def read_payload(data: str | None) -> bytes:
    """--data: a literal string, @FILE for a file's bytes, - for stdin's bytes; none is empty."""
    if data is None:
        return b""
    if data == "-":
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        return Path(data[1:]).expanduser().read_bytes()
    return data.encode()


def invoke_url(state: Mapping[str, Any]) -> str:
    """Where the running supervisor's CA port answers from this host."""
    host = str(state.get("host") or "")
    # A wildcard listener is reached over loopback; a specific address as is.
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal in a URL
    return f"http://{host}:{int(state['ca_port'])}/invoke"


def cmd_invoke(args: argparse.Namespace) -> int:
    try:
        payload = read_payload(args.data)
    except OSError as exc:
        print(f"cannot read --data {args.data}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INVALID
    run_dir = resolve_run_dir(args.run_dir, os.environ, Path.cwd(), args.config)
    paths = RunPaths(run_dir)
    state = read_state(paths) if supervisor_alive(paths) else None
    if state is None or not isinstance(state.get("ca_port"), int):
        _no_supervisor(run_dir)
        return EXIT_NO_SUPERVISOR
    url = invoke_url(state)
    request = urllib.request.Request(url, data=payload, method="POST", headers={
        "x-fc-function-name": args.function,
        "content-type": "application/octet-stream",
    })
    # No proxy handler: an http_proxy in the environment must not capture a
    # request for this host's own port.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=args.timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
        request_id = exc.headers.get("x-fc-request-id", "-")
        sys.stderr.buffer.write(body if body.endswith(b"\n") or not body else body + b"\n")
        sys.stderr.buffer.flush()
        print(f"HTTP {exc.code}, x-fc-request-id: {request_id}", file=sys.stderr)
        return EXIT_INVOKE_FAILED
    except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        print(f"invoke {args.function} at {url} failed: {reason}", file=sys.stderr)
        return EXIT_INVOKE_FAILED
    # A shell prompt must not start on the result's last line; --raw keeps the bytes exact.
    sys.stdout.buffer.write(body if args.raw or body.endswith(b"\n") else body + b"\n")
    sys.stdout.buffer.flush()
    return EXIT_OK


# --- validate and run ----------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from supervisor.config import Config, ConfigError, Problem, SupervisorSettings, load_config, resolve_config_path
    from supervisor.control.sandbox import check_config

    path = resolve_config_path(args.config, os.environ, Path.cwd())
    try:
        config = load_config(path)
        problems = check_config(config)
    except ConfigError as exc:
        problems = exc.problems
        if exc.functions:
            # One pass: the functions whose own tables are sound are imported too.
            partial = Config(supervisor=exc.settings or SupervisorSettings(), functions=exc.functions, path=path)
            problems = problems + check_config(partial)
    except UnicodeDecodeError as exc:
        # tomllib decodes before it parses and lets this one through.
        problems = [Problem(str(path), f"not valid TOML: the file is not UTF-8 ({exc.reason} at byte {exc.start})")]
    if problems:
        for problem in problems:
            print(f"{problem.path}: {problem.message}" if problem.path else problem.message, file=sys.stderr)
        return EXIT_INVALID
    names = list(config.functions)
    noun = "function" if len(names) == 1 else "functions"
    print(f"{path}: OK ({len(names)} {noun}: {', '.join(names)})")
    return EXIT_OK


def cmd_deps(args: argparse.Namespace) -> int:
    from supervisor import deps
    from supervisor.config import ConfigError, load_config, resolve_config_path

    path = resolve_config_path(args.config, os.environ, Path.cwd())
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid config, nothing installed:", file=sys.stderr)
        for problem in exc.problems:
            print(_problem_line(problem.path, problem.message), file=sys.stderr)
        return EXIT_INVALID
    chosen = config.functions.get(args.function) if args.function is not None else None
    if args.function is not None and (chosen is None or chosen.runtime != "python"):
        python = [f.name for f in config.functions.values() if f.runtime == "python"]
        print(f"{args.function} is not a Python function of {path} (its Python functions: "
              f"{', '.join(python) or 'none'})", file=sys.stderr)
        return EXIT_INVALID
    plan = deps.plan(config.functions.values(), lambda requirements: requirements.is_file())
    if plan.problems:
        for problem in plan.problems:
            print(_problem_line(problem.path, problem.message), file=sys.stderr)
        return EXIT_INVALID
    for name in plan.without:
        if chosen is None or name == chosen.name:
            print(f"{name}: no {deps.REQUIREMENTS} in {config.functions[name].code_dir}, nothing to install")
    failed = 0
    # --function: its install, which the functions sharing its python_packages share.
    for job in (job for job in plan.installs if chosen is None or chosen.name in job.functions):
        print(f"{', '.join(job.functions)}: installing {job.requirements} into {job.directory}", file=sys.stderr)
        try:
            installed = deps.install(job, sys.stderr, args.timeout)
        except deps.InstallFailed as exc:
            print(f"{', '.join(job.functions)}: not installed: {exc}; {job.directory} stays as it was",
                  file=sys.stderr)
            failed += 1
            continue
        sys.stdout.write(deps.describe(job, installed) + "\n")
        sys.stdout.flush()
    return EXIT_DEPS_FAILED if failed else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from supervisor.config import resolve_config_path
    from supervisor.entry.main import run  # the whole process tree; only `run` needs it

    return run(resolve_config_path(args.config, os.environ, Path.cwd()))


# --- argument parsing --------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
    return value


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `minimum` up to what a uint32 holds."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text!r}")
        if value > UINT32_MAX:
            raise argparse.ArgumentTypeError(f"must be at most {UINT32_MAX}, got {text!r}")
        return value
    parse.__name__ = "count"  # what argparse names in "invalid count value"
    return parse


def _scale_usage_error(args: argparse.Namespace) -> str | None:
    """What argparse cannot say about `scale` alone: at least one setting, and a consistent pair."""
    if args.min_warm is None and args.max_workers is None:
        return "give --min-warm, --max-workers, or both"
    if args.min_warm is not None and args.max_workers is not None and args.min_warm > args.max_workers:
        return f"--min-warm {args.min_warm} exceeds --max-workers {args.max_workers}"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supervisor",
        description="Process supervisor for serverless custom containers: warm isolated worker pools behind one CA port.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config_help = "config file (default: $SUPERVISOR_CONFIG, else ./supervisor.toml, else the bundled example)"
    run_dir_help = "the running supervisor's run_dir (default: $SUPERVISOR_RUN_DIR, else the config's run_dir)"
    # --config on status/invoke only chooses whose run_dir to look in.
    find_config_help = "config whose run_dir to look in, when neither --run-dir nor $SUPERVISOR_RUN_DIR is given"

    run = commands.add_parser("run", help="run the supervisor in the foreground until SIGTERM/SIGINT")
    run.add_argument("--config", metavar="PATH", help=config_help)
    run.set_defaults(handler=cmd_run)

    validate = commands.add_parser("validate", help="check a config; exit 0, or print every problem and exit 2")
    validate.add_argument("--config", metavar="PATH", help=config_help)
    validate.set_defaults(handler=cmd_validate)

    deps = commands.add_parser(
        "deps", help="install each Python function's requirements.txt into its python_packages directory "
                     "(exit 0, 1 an install failed, 2 invalid config)")
    deps.add_argument("--config", metavar="PATH", help=config_help)
    deps.add_argument("--function", metavar="NAME", help="only this Python function (and those sharing its install)")
    deps.add_argument("--timeout", type=_wait_seconds, default=1800.0, metavar="SECONDS",
                      help="give up on one install (pip killed) after this long (default 1800)")
    deps.set_defaults(handler=cmd_deps)

    status = commands.add_parser("status", help="one look at a running supervisor (exit 0 all running, 3 not, 4 none)")
    status.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    status.add_argument("--run-dir", metavar="DIR", help=run_dir_help)
    status.add_argument("--config", metavar="PATH", help=find_config_help)
    status.set_defaults(handler=cmd_status)

    invoke = commands.add_parser("invoke", help="send one invocation to a running supervisor and print the result")
    invoke.add_argument("function", metavar="FUNCTION")
    invoke.add_argument("--data", metavar="STR|@FILE|-", help="the event: a string, @FILE for a file's bytes, - for stdin")
    invoke.add_argument("--run-dir", metavar="DIR", help=run_dir_help)
    invoke.add_argument("--config", metavar="PATH", help=find_config_help)
    invoke.add_argument("--timeout", type=_positive_float, default=300.0, metavar="SECONDS",
                        help="give up waiting for the answer after this long (default 300)")
    invoke.add_argument("--raw", action="store_true",
                        help="print the result's bytes exactly (by default a newline ends the output)")
    invoke.set_defaults(handler=cmd_invoke)

    reload = commands.add_parser(
        "reload", help="make a running supervisor re-read its config (exit 0 applied, 2 refused, 4 none, "
                       "5 --wait: applied but not serving in time)")
    reload.add_argument("--json", action="store_true", help="print the reply as one JSON object")
    reload.add_argument("--wait", action="store_true",
                        help="return once every added or changed function serves the new config: its old workers "
                             "gone, min_warm new ones ready (exit 5 when not within --timeout, or when they fail "
                             "to initialize)")
    reload.add_argument("--timeout", type=_wait_seconds, default=RELOAD_WAIT_S, metavar="SECONDS",
                        help=f"how long --wait waits (default {RELOAD_WAIT_S:g})")
    reload.add_argument("--run-dir", metavar="DIR", help=run_dir_help)
    reload.add_argument("--config", metavar="PATH", help=find_config_help)
    reload.set_defaults(handler=cmd_reload)

    scale = commands.add_parser(
        "scale", help="override one function's min_warm / max_workers at run time (exit 0, 2 refused, 4 none)")
    scale.add_argument("function", metavar="FUNCTION")
    scale.add_argument("--min-warm", type=_count(0), metavar="N", help="workers kept warm (0 or more)")
    scale.add_argument("--max-workers", type=_count(1), metavar="M", help="most workers at once (1 or more)")
    scale.add_argument("--json", action="store_true", help="print the reply as one JSON object")
    scale.add_argument("--run-dir", metavar="DIR", help=run_dir_help)
    scale.add_argument("--config", metavar="PATH", help=find_config_help)
    scale.set_defaults(handler=cmd_scale, usage_error=_scale_usage_error, command_parser=scale)
    return parser


def dispatch(argv: Sequence[str] | None = None) -> int:
    """Parse and run one command; returns its exit code (argparse errors raise SystemExit(2))."""
    args = build_parser().parse_args(argv)
    usage_error = getattr(args, "usage_error", None)
    problem = usage_error(args) if usage_error is not None else None
    if problem:
        args.command_parser.error(problem)  # usage, the message, SystemExit(2)
    code: int = args.handler(args)
    return code


def main(argv: list[str] | None = None) -> NoReturn:
    """The `supervisor` console script."""
    sys.exit(dispatch(argv))


if __name__ == "__main__":
    main()
