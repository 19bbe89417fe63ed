#!/usr/bin/env python3
"""The worker link's codecs, calink against the protobuf they replaced, and what ``import worker.main`` costs.

    .venv/bin/python bench/frames.py                # ~30 s, prints a Markdown section
    .venv/bin/python bench/frames.py --write        # also into bench/RESULTS.md (frames markers)
    .venv/bin/python bench/frames.py --before REV,...  # trees whose worker import is compared (default 254f32b)

Codecs, side by side in one process: for each message of the request path, with the sizes an FC
invocation has (FC's ~20 ``x-fc-*`` headers and a small JSON event; a 1 MiB event; an HTTP-trigger
GET with a browser's headers; a 64 KiB body chunk; a small result and an error result with its
trace; a response head), two costs per message:

- **send**: build the message from the values the sender has (header pairs, body, ids) and encode
  it, as the data plane (Invoke, HttpRequest) or the worker (Result, HttpResponseStart) does;
- **receive**: decode it and read every field the receiver reads (headers as pairs or a dict,
  body, ids) -- upb decodes lazily, so decoding alone would flatter it.

The baseline is protobuf's own runtime (upb, C) on ``bench/baseline/worker_link.proto``, a copy
of the retired ``worker.proto`` kept here so the comparison never moves and needs no git history;
its Python module is generated at run time by ``grpc_tools.protoc`` into a temporary directory
(the ``test`` extra has grpc_tools) and nothing generated is committed. Best of 5 repeats of about
0.1 s each; microseconds per message.

Import: ``import worker.main`` timed inside fresh interpreters (interpreter start-up not counted),
7 runs each, for the trees at ``--before`` (``git archive`` into a temporary directory) and for
this checkout; with how many modules it added and the top-level names outside the standard
library. One run on a shared machine: small differences are noise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
PROTO = BENCH / "baseline" / "worker_link.proto"
START_MARK, END_MARK = "<!-- frames:start -->", "<!-- frames:end -->"
IMPORT_RUNS = 7
REPEATS = 5
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from calink import messages as cl  # noqa: E402  # after the checkout is on sys.path

# ---- the samples -------------------------------------------------------------------

# What FC sends with an event invocation (values of realistic lengths; the STS token is long).
FC_HEADERS = [
    ("host", "127.0.0.1:9000"), ("user-agent", "Go-http-client/1.1"), ("content-length", "23"),
    ("content-type", "application/octet-stream"), ("x-fc-request-id", "1-6566f2a1-8f3c0d2e4b5a69788c7d1e2f"),
    ("x-fc-access-key-id", "STS.NUq8mC3bXk2pL9rT4vW7yZ1aD"), ("x-fc-access-key-secret", "Fq" * 22),
    ("x-fc-security-token", "CAIS" + "a1B2c3D4" * 110), ("x-fc-function-name", "hello"),
    ("x-fc-function-handler", "index.handler"), ("x-fc-function-memory", "512"),
    ("x-fc-function-timeout", "60"), ("x-fc-region", "cn-hangzhou"), ("x-fc-account-id", "1234567890123456"),
    ("x-fc-qualifier", "LATEST"), ("x-fc-version-id", ""), ("x-fc-service-name", "demo"),
    ("x-fc-service-logproject", "aliyun-fc-cn-hangzhou-demo"), ("x-fc-service-logstore", "function-log"),
    ("x-fc-function-initializer", "index.initializer"), ("x-fc-instance-id", "c-6566f2a1-1f2e3d4c5b6a"),
]
BROWSER_HEADERS = [
    ("host", "demo.cn-hangzhou.fcapp.run"), ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
                                            "(KHTML, like Gecko) Chrome/120.0 Safari/537.36"),
    ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"),
    ("accept-language", "en-US,en;q=0.9,zh-CN;q=0.8"), ("accept-encoding", "gzip, deflate, br"),
    ("cookie", "session=" + "9f" * 32 + "; theme=dark"), ("referer", "https://demo.cn-hangzhou.fcapp.run/"),
    ("sec-fetch-mode", "navigate"), ("sec-fetch-site", "same-origin"), ("upgrade-insecure-requests", "1"),
    ("x-forwarded-for", "203.0.113.7"), ("x-fc-request-id", "1-6566f2a1-8f3c0d2e4b5a69788c7d1e2f"),
]
RESPONSE_HEADERS = [("content-type", "text/html; charset=utf-8"), ("content-length", "5120"),
                    ("cache-control", "no-store"), ("set-cookie", "session=" + "9f" * 32 + "; HttpOnly; Path=/"),
                    ("x-request-id", "1-6566f2a1-8f3c0d2e4b5a69788c7d1e2f"), ("vary", "Accept-Encoding")]
EVENT = b'{"name":"bench","n":42}'
TRACE = "".join(f'  File "/code/app/module{i}.py", line {10 * i}, in step{i}\n    result = step{i + 1}(event)\n'
                for i in range(16)) + "ValueError: the event asked to fail\n"


class Sample:
    """One message with its values, and how each implementation sends and receives it."""

    def __init__(self, name: str, kind: str, values: dict[str, Any]) -> None:
        self.name = name
        self.kind = kind
        self.values = values


SAMPLES = [
    Sample("Invoke: FC event, 21 headers, 23 B body", "Invoke",
           {"request_id": FC_HEADERS[4][1], "kind": "invoke", "headers": FC_HEADERS, "timeout_ms": 60_000,
            "body": EVENT}),
    Sample("Invoke: FC event, 21 headers, 1 MiB body", "Invoke",
           {"request_id": FC_HEADERS[4][1], "kind": "invoke", "headers": FC_HEADERS, "timeout_ms": 60_000,
            "body": os.urandom(1 << 20)}),
    Sample("Result: ok, 30 B JSON", "Result",
           {"ok": True, "body": b'{"statusCode":200,"body":"ok"}', "content_type": "application/json"}),
    Sample("Result: error with a 16-frame trace", "Result",
           {"ok": False, "error": ("ValueError", "the event asked to fail", TRACE)}),
    Sample("HttpRequest: GET, 12 browser headers", "HttpRequest",
           {"request_id": BROWSER_HEADERS[-1][1], "method": "GET", "raw_path": b"/api/items/42",
            "query": b"page=2&sort=desc", "headers": BROWSER_HEADERS, "timeout_ms": 60_000, "body": b"",
            "more_body": False, "http_version": "1.1", "scheme": "http", "client_host": "203.0.113.7",
            "client_port": 51234}),
    Sample("HttpRequest: POST, 64 KiB first chunk", "HttpRequest",
           {"request_id": BROWSER_HEADERS[-1][1], "method": "POST", "raw_path": b"/upload", "query": b"",
            "headers": BROWSER_HEADERS, "timeout_ms": 60_000, "body": os.urandom(64 << 10), "more_body": True,
            "http_version": "1.1", "scheme": "http", "client_host": "203.0.113.7", "client_port": 51234}),
    Sample("HttpResponseStart: 200, 6 headers", "HttpResponseStart", {"status": 200, "headers": RESPONSE_HEADERS}),
]


# ---- the two implementations ---------------------------------------------------------


def protobuf_module(work: Path) -> Any:
    """The baseline's generated module (``worker_link_pb2``), built into ``work``."""
    from grpc_tools import protoc  # type: ignore[import-untyped]  # the test extra's

    args = ["protoc", f"-I{PROTO.parent}", f"--python_out={work}", PROTO.name]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + str(PROTO))
    sys.path.insert(0, str(work))
    return importlib.import_module("worker_link_pb2")


def protobuf_codec(pb: Any, sample: Sample) -> tuple[Callable[[], bytes], Callable[[bytes], Any]]:
    v = sample.values
    header = pb.Header
    if sample.kind == "Invoke":
        def send() -> bytes:
            return bytes(pb.Invoke(request_id=v["request_id"], kind=v["kind"],
                                   headers=[header(name=n, value=x) for n, x in v["headers"]],
                                   timeout_ms=v["timeout_ms"], body=v["body"]).SerializeToString())

        def receive(payload: bytes) -> Any:
            m = pb.Invoke.FromString(payload)
            return m.request_id, m.kind, {h.name: h.value for h in m.headers}, m.timeout_ms, m.body
    elif sample.kind == "Result":
        def send() -> bytes:
            if v["ok"]:
                return bytes(pb.Result(ok=True, body=v["body"], content_type=v["content_type"]).SerializeToString())
            t, msg, trace = v["error"]
            return bytes(pb.Result(ok=False, error=pb.ErrorInfo(error_type=t, error_message=msg,
                                                                  stack_trace=trace)).SerializeToString())

        def receive(payload: bytes) -> Any:
            m = pb.Result.FromString(payload)
            if m.ok:
                return m.body, m.content_type
            return m.error.error_type, m.error.error_message, m.error.stack_trace
    elif sample.kind == "HttpRequest":
        def send() -> bytes:
            return bytes(pb.HttpRequest(
                request_id=v["request_id"], method=v["method"], raw_path=v["raw_path"], query=v["query"],
                headers=[header(name=n, value=x) for n, x in v["headers"]], timeout_ms=v["timeout_ms"],
                body=v["body"], more_body=v["more_body"], http_version=v["http_version"], scheme=v["scheme"],
                client_host=v["client_host"], client_port=v["client_port"]).SerializeToString())

        def receive(payload: bytes) -> Any:
            m = pb.HttpRequest.FromString(payload)
            return (m.request_id, m.method, m.raw_path, m.query, [(h.name, h.value) for h in m.headers],
                    m.timeout_ms, m.body, m.more_body, m.http_version, m.scheme, m.client_host, m.client_port)
    else:
        def send() -> bytes:
            return bytes(pb.HttpResponseStart(status=v["status"], headers=[header(name=n, value=x)
                                                                           for n, x in v["headers"]]
                                              ).SerializeToString())

        def receive(payload: bytes) -> Any:
            m = pb.HttpResponseStart.FromString(payload)
            return m.status, [(h.name, h.value) for h in m.headers]
    return send, receive


def calink_codec(sample: Sample) -> tuple[Callable[[], bytes], Callable[[bytes], Any]]:
    v = sample.values
    if sample.kind == "Invoke":
        def send() -> bytes:
            return cl.Invoke(v["request_id"], v["kind"], v["headers"], v["timeout_ms"], v["body"]).encode()

        def receive(payload: bytes) -> Any:
            m = cl.Invoke.decode(payload)
            return m.request_id, m.kind, dict(m.headers), m.timeout_ms, m.body
    elif sample.kind == "Result":
        def send() -> bytes:
            if v["ok"]:
                return cl.Result(True, v["body"], v["content_type"]).encode()
            return cl.Result(False, error=cl.ErrorInfo(*v["error"])).encode()

        def receive(payload: bytes) -> Any:
            m = cl.Result.decode(payload)
            if m.ok:
                return m.body, m.content_type
            return m.error.error_type, m.error.error_message, m.error.stack_trace
    elif sample.kind == "HttpRequest":
        def send() -> bytes:
            return cl.HttpRequest(v["request_id"], v["method"], v["raw_path"], v["query"], v["headers"],
                                  v["timeout_ms"], v["body"], v["more_body"], v["http_version"], v["scheme"],
                                  v["client_host"], v["client_port"]).encode()

        def receive(payload: bytes) -> Any:
            m = cl.HttpRequest.decode(payload)
            return (m.request_id, m.method, m.raw_path, m.query, m.headers, m.timeout_ms, m.body, m.more_body,
                    m.http_version, m.scheme, m.client_host, m.client_port)
    else:
        def send() -> bytes:
            return cl.HttpResponseStart(v["status"], v["headers"]).encode()

        def receive(payload: bytes) -> Any:
            m = cl.HttpResponseStart.decode(payload)
            return m.status, m.headers
    return send, receive


def best_us(fn: Callable[[], Any]) -> float:
    """Microseconds per call: best of REPEATS repeats of about 0.1 s."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()  # at least 0.2 s worth
    number = max(1, number // 2)
    return min(timer.repeat(REPEATS, number)) / number * 1e6


def measure_codecs(pb: Any) -> list[dict[str, Any]]:
    rows = []
    for sample in SAMPLES:
        row: dict[str, Any] = {"message": sample.name}
        decoded: dict[str, Any] = {}
        for impl, (send, receive) in (("protobuf", protobuf_codec(pb, sample)), ("calink", calink_codec(sample))):
            payload = send()
            decoded[impl] = receive(payload)
            row[impl] = {"bytes": len(payload), "send_us": best_us(send),
                         "receive_us": best_us(lambda r=receive, p=payload: r(p))}  # type: ignore[misc]
        same = _comparable(decoded["protobuf"]) == _comparable(decoded["calink"])
        if not same:
            raise SystemExit(f"{sample.name}: the two implementations read different values")
        rows.append(row)
        print(f"  {json.dumps(row)}", file=sys.stderr, flush=True)
    return rows


def _comparable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    if isinstance(value, dict):
        return sorted(value.items())
    return value


# ---- the worker's import ---------------------------------------------------------------

IMPORT_PROBE = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
before = set(sys.modules)
started = time.perf_counter()
import worker.main
elapsed = time.perf_counter() - started
added = set(sys.modules) - before
tops = {name.partition(".")[0] for name in added}
print(json.dumps({"ms": elapsed * 1000, "modules": len(added),
                  "outside": sorted(tops - set(sys.stdlib_module_names) - {"worker", "calink"})}))
"""


def measure_import(tree: Path) -> dict[str, Any]:
    runs = []
    for _ in range(IMPORT_RUNS):
        done = subprocess.run([sys.executable, "-c", IMPORT_PROBE, str(tree)], capture_output=True, text=True,
                              timeout=60, cwd="/")
        if done.returncode != 0:
            raise SystemExit(f"import worker.main failed in {tree}: {done.stderr[-2000:]}")
        runs.append(json.loads(done.stdout))
    return {"ms_median": statistics.median(r["ms"] for r in runs), "ms_min": min(r["ms"] for r in runs),
            "modules": runs[0]["modules"], "outside": runs[0]["outside"]}


def tree_at(rev: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev], capture_output=True, text=True,
                            timeout=60, check=True).stdout.split()
    packages = [name for name in ("supervisor", "worker", "calink", "cahttp") if name in listed]
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, *packages], capture_output=True,
                             timeout=60, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True, timeout=60)
    return into


# ---- report ----------------------------------------------------------------------------


def render(r: dict[str, Any]) -> str:
    lines = ["## The worker link's codecs: calink against protobuf", "",
             f"`bench/frames.py`, {r['when']}, commit {r['commit']}; Python {r['python']}, protobuf "
             f"{r['protobuf']} ({r['protobuf_impl']}), {r['cpus']} CPUs shared with other work. Best of "
             f"{REPEATS} repeats, µs per message. *send*: build from the sender's values + encode; *receive*: "
             "decode + read every field the receiver uses.", "",
             "| message | bytes pb / calink | send pb | send calink | receive pb | receive calink | "
             "send+receive pb | send+receive calink | calink / pb |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["codecs"]:
        pb, cl_ = row["protobuf"], row["calink"]
        total_pb = pb["send_us"] + pb["receive_us"]
        total_cl = cl_["send_us"] + cl_["receive_us"]
        lines.append(f"| {row['message']} | {pb['bytes']:,} / {cl_['bytes']:,} | {pb['send_us']:.2f} | "
                     f"{cl_['send_us']:.2f} | {pb['receive_us']:.2f} | {cl_['receive_us']:.2f} | {total_pb:.2f} | "
                     f"{total_cl:.2f} | {total_cl / total_pb:.2f} |")
    lines += ["", "The data plane sends `Invoke` and `HttpRequest` and receives `Result` and `HttpResponseStart`; "
              "a worker the other way round, so a row's send+receive is what the link's codec costs an "
              "invocation at both ends. Sending is where protobuf loses most: it builds a `Header` message "
              "per header, where calink takes the pairs as they are. Receiving is close either way (upb "
              "decodes in C but builds Python objects field by field as they are read); the payloads are "
              "within a few bytes of each other (calink's lengths are fixed 4-byte integers, protobuf's "
              "varints)."]
    lines += ["", f"`import worker.main` in a fresh interpreter ({IMPORT_RUNS} runs; start-up not counted; "
              "modules: how many the import added; outside: top-level names beyond the standard library, "
              "`worker` and `calink`):", "",
              "| tree | median ms | min ms | modules | outside the standard library |", "|---|---|---|---|---|"]
    notes = ["", "With other work on the machine the medians move by tens of milliseconds from run to run; the "
             "minimum and the module count are the steadier figures."]
    for label, x in r["imports"].items():
        outside = ", ".join(f"`{n}`" for n in x["outside"]) or "none"
        lines.append(f"| {label} | {x['ms_median']:.1f} | {x['ms_min']:.1f} | {x['modules']} | {outside} |")
    return "\n".join(lines + notes) + "\n"


def write_section(section: str) -> str:
    block = f"{START_MARK}\n{section.rstrip()}\n{END_MARK}"
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if START_MARK in text and END_MARK in text and text.index(START_MARK) < text.index(END_MARK):
        before, rest = text.split(START_MARK, 1)
        RESULTS.write_text(before + block + rest.split(END_MARK, 1)[1])
        return "replaced"
    RESULTS.write_text(text.rstrip("\n") + "\n\n" + block + "\n")
    return "appended"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="put the section into bench/RESULTS.md")
    ap.add_argument("--before", default="254f32b", help="git revisions whose import is compared, comma-separated")
    args = ap.parse_args(argv)
    started = time.monotonic()
    from google.protobuf import __version__ as protobuf_version
    from google.protobuf.internal import api_implementation

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, timeout=30).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=30).stdout.strip()
    r: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                         "commit": commit + (" (work tree has uncommitted changes)" if dirty else ""),
                         "python": platform.python_version(), "protobuf": protobuf_version,
                         "protobuf_impl": api_implementation.Type(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-frames-") as work:
        print("codecs", file=sys.stderr)
        r["codecs"] = measure_codecs(protobuf_module(Path(work)))
        print("import worker.main", file=sys.stderr)
        r["imports"] = {}
        for rev in args.before.split(","):
            subject = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%s", rev], capture_output=True,
                                     text=True, timeout=30, check=True).stdout.strip()
            label = f"`{rev}` ({subject[:70]}{'...' if len(subject) > 70 else ''})"
            r["imports"][label] = measure_import(tree_at(rev, Path(work) / rev))
        r["imports"]["this checkout"] = measure_import(ROOT)
    section = render(r)
    print(section)
    if args.write:
        print(f"{write_section(section)} the frames section in {RESULTS}", file=sys.stderr)
    print(f"done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
