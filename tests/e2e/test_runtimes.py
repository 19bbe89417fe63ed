"""Every runtime kind through the CA port, on real processes: Python ASGI and
WSGI apps and a custom runtime (an HTTP server started from ``command``)
answer HTTP-trigger requests (method, path, query, headers and a binary body
passed through, responses streamed both ways) and ``/invoke``; failures,
timeouts and crashes give the contract's answers and the pool recovers;
concurrency limits hold; a worker's whole process tree dies with it.

Apps: ``functions/runtimes/web.py`` (ASGI ``app``, WSGI ``wsgi_app``) and
``functions/runtimes/server.py`` (the custom runtime). Lambda and SCF are in
``test_pull_runtimes.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.harness import FUNCTIONS_DIR, started, wait_for
from tests.e2e.test_pools import exits, metric

RUNTIMES_DIR = FUNCTIONS_DIR / "runtimes"
KINDS = ["asgi", "wsgi", "custom"]


def http_fn(kind: str, mark_dir: Path | None = None, **overrides: Any) -> dict[str, Any]:
    if kind == "custom":
        spec: dict[str, Any] = {"runtime": "custom", "command": [sys.executable, "server.py"],
                                "ready": "http:/healthz", "startup_timeout": "10s",
                                "env": {"MARK_DIR": str(mark_dir or "/tmp")}}
    else:
        spec = {"runtime": "python", "interface": kind, "handler": "web:app" if kind == "asgi" else "web:wsgi_app"}
    spec.update({"code_dir": str(RUNTIMES_DIR), "min_warm": 1, "max_workers": 2, "timeout": "10s"})
    spec.update(overrides)
    return spec


def marks(mark_dir: Path, name: str) -> list[Path]:
    return sorted(mark_dir.glob(f"{name}-*"))


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("kind", KINDS)
def test_http_trigger_passes_the_request_through(tmp_path: Path, kind: str) -> None:
    body = bytes(range(256)) * 4
    with started(tmp_path, {"web": http_fn(kind, tmp_path)}) as sup, sup.client() as client:
        response = client.request("PUT", "/some/p%C3%A4th/x", params={"a": "1", "b": "two words"}, content=body,
                                  headers={"x-custom": "v1", "content-type": "application/x-thing",
                                           "x-fc-request-id": "req-http-1"})
        assert response.status_code == 200, response.text
        assert response.headers["x-fc-request-id"] == "req-http-1"
        echo = response.json()
        assert echo["method"] == "PUT"
        assert echo["path"] == ("/some/p%C3%A4th/x" if kind == "custom" else "/some/päth/x")
        if kind != "wsgi":  # WSGI has no raw path, only PATH_INFO
            assert echo["raw_path"] == "/some/p%C3%A4th/x"
        assert echo["query"] == "a=1&b=two+words"
        assert bytes.fromhex(echo["body_hex"]) == body
        headers = {name: value for name, value in echo["headers"]}
        assert headers["x-custom"] == "v1" and headers["content-type"] == "application/x-thing"
        if kind == "custom":  # repeated response headers survive
            assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
        # Methods without a body, and HEAD-less GET with a query.
        got = client.get("/x", params={"q": "é"})
        assert got.status_code == 200 and got.json()["method"] == "GET" and got.json()["query"] == "q=%C3%A9"


@pytest.mark.parametrize("kind", KINDS)
def test_a_streamed_response_arrives_chunk_by_chunk(tmp_path: Path, kind: str) -> None:
    gate = tmp_path / "gate"
    with started(tmp_path, {"web": http_fn(kind, tmp_path)}) as sup, sup.client() as client:
        with client.stream("GET", "/stream", params={"gate": str(gate)}) as response:
            assert response.status_code == 200
            chunks = response.iter_raw()
            first = next(chunks)
            # The application is still waiting for the gate: it has not finished.
            assert first == b"first\n" and not gate.exists()
            gate.touch()
            rest = b"".join(chunks)
        assert rest == b"second\n"


@pytest.mark.parametrize("kind", KINDS)
def test_a_large_body_is_streamed_to_the_worker_and_max_body_holds(tmp_path: Path, kind: str) -> None:
    body = os.urandom(5 << 20)
    with started(tmp_path, {"web": http_fn(kind, tmp_path, max_body="8MiB")}) as sup, sup.client() as client:
        def chunked() -> Any:
            for offset in range(0, len(body), 256 << 10):
                yield body[offset:offset + (256 << 10)]

        for content in (body, chunked()):  # with a Content-Length, and chunked
            response = client.post("/upload", content=content)
            assert response.status_code == 200, response.text
            result = response.json()
            assert result["size"] == len(body) and result["sha256"] == hashlib.sha256(body).hexdigest()
            assert result["chunks"] > 4  # it arrived in pieces, not as one buffer
        too_big = client.post("/upload", content=os.urandom(9 << 20))
        assert too_big.status_code == 413 and too_big.json()["errorType"] == "PayloadTooLargeError"
        big_chunked = client.post("/upload", content=(os.urandom(1 << 20) for _ in range(9)))
        assert big_chunked.status_code == 413 and big_chunked.json()["errorType"] == "PayloadTooLargeError"
        assert client.get("/x").status_code == 200  # and the function goes on


@pytest.mark.parametrize("kind", KINDS)
def test_invoke_is_a_post_to_the_app(tmp_path: Path, kind: str) -> None:
    with started(tmp_path, {"web": http_fn(kind, tmp_path)}) as sup:
        response = sup.invoke(b"hello", headers={"x-fc-request-id": "inv-1", "x-fc-account-id": "123"})
        assert response.status_code == 200, response.text
        if kind == "custom":
            echo = response.json()
            assert echo["event"] == "hello"
            assert echo["headers"]["x-fc-request-id"] == "inv-1" and echo["headers"]["x-fc-account-id"] == "123"
            failed = sup.invoke(b"fail")
            assert failed.status_code == 404 and failed.headers["x-fc-status"] == "404"
            assert failed.json()["errorType"] == "BadEventError"
        else:
            assert response.content == b"olleh"


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_an_app_exception_is_the_contracts_error(tmp_path: Path, kind: str) -> None:
    with started(tmp_path, {"web": http_fn(kind)}) as sup, sup.client() as client:
        response = client.get("/boom")
        assert response.status_code == 404 and response.headers["x-fc-status"] == "404"
        error = response.json()
        assert error["errorType"] == "ValueError" and "boom" in error["errorMessage"]
        assert any("boom" in line for line in error["stackTrace"])
        assert client.get("/x").status_code == 200
        assert metric(sup, "supervisor_invocations_total", function="web", outcome="error") >= 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_timeout_kills_the_worker_and_its_children(tmp_path: Path, kind: str) -> None:
    with started(tmp_path, {"web": http_fn(kind, tmp_path, timeout="1s", max_workers=1)}) as sup, \
            sup.client() as client:
        pid = int(client.get("/pid").text)
        grandchildren = [int(p.read_text()) for p in marks(tmp_path, "grandchild")]
        response = client.get("/sleep", params={"s": "30"})
        assert response.status_code == 504 and response.json()["errorType"] == "FunctionTimeoutError"
        wait_for(lambda: not alive(pid), 10, "the timed-out app's process to die")
        for grandchild in grandchildren:
            wait_for(lambda g=grandchild: not alive(g), 10, "the server's own child to die with it")  # type: ignore[misc]
        wait_for(lambda: len(sup.ready_workers("web")) == 1, 20, "a replacement worker")
        assert client.get("/x").status_code == 200
        assert exits(sup, "web", "timeout") == 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_crash_mid_request_fails_only_that_request(tmp_path: Path, kind: str) -> None:
    functions = {"web": http_fn(kind, tmp_path, max_workers=1), "other": http_fn("asgi", max_workers=1)}
    with started(tmp_path, functions, default_function="web") as sup, sup.client() as client:
        response = client.get("/crash")
        assert response.status_code == 502 and response.json()["errorType"] == "WorkerCrashedError"
        assert client.get("/x", headers={"x-fc-function-name": "other"}).status_code == 200
        wait_for(lambda: client.get("/x").status_code == 200, 20, "the pool to recover")
        assert exits(sup, "web", "crashed") == 1


def test_concurrency_limits_hold_for_a_custom_runtime(tmp_path: Path) -> None:
    fn = http_fn("custom", tmp_path, concurrency=2, max_workers=1, min_warm=1)
    with started(tmp_path, {"web": fn}) as sup, sup.client() as client:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: client.get("/sleep", params={"s": "0.5"}), range(6)))
        assert [a.status_code for a in answers] == [200] * 6
        assert client.get("/stats").json()["peak"] == 2
        assert len(sup.workers("web")) == 1


def test_a_custom_worker_past_its_memory_high_water_mark_is_replaced(tmp_path: Path) -> None:
    # The worker's memory is its whole tree's: the adapter's and its server's.
    fn = http_fn("custom", tmp_path, recycle_memory_share=0.5, limits={"memory": "128MiB"})
    with started(tmp_path, {"web": fn}) as sup, sup.client() as client:
        hog = int(client.get("/hog", params={"mib": "80"}).text)
        wait_for(lambda: exits(sup, "web", "recycled") == 1, 20, "the worker recycled")
        wait_for(lambda: not alive(hog), 10, "its server gone with it")
        assert int(client.get("/pid").text) != hog
        assert metric(sup, "supervisor_worker_exits_total", function="web", reason="crashed") == 0


def test_disposable_custom_workers_serve_one_request_each(tmp_path: Path) -> None:
    fn = http_fn("custom", tmp_path, disposable=True, min_warm=1, max_workers=2)
    with started(tmp_path, {"web": fn}) as sup, sup.client() as client:
        pids = [int(client.get("/pid").text) for _ in range(5)]
        assert len(set(pids)) == 5
        wait_for(lambda: exits(sup, "web", "disposable") >= 4, 20, "the used workers gone")
        assert metric(sup, "supervisor_invocations_total", function="web", outcome="success") == 5
        assert metric(sup, "supervisor_worker_starts_total", function="web", mode="spawn") >= 5


def test_custom_runtime_environment_and_hooks(tmp_path: Path) -> None:
    fn = http_fn("custom", tmp_path, hooks=["initialize", "pre-stop"], env={"MARK_DIR": str(tmp_path), "GREETING": "hi"},
                 limits={"memory": "256MiB"})
    with started(tmp_path, {"web": fn}, extra_env={"SUPERVISOR_SECRET": "do-not-leak"}) as sup:
        [env_file] = marks(tmp_path, "env")
        env = json.loads(env_file.read_text())
        port = int(env["FC_SERVER_PORT"])
        assert env["FC_CUSTOM_LISTEN_PORT"] == env["PORT"] == str(port) and port != sup.ca_port
        assert env["FC_FUNCTION_NAME"] == "web" and env["FC_FUNCTION_MEMORY_SIZE"] == "256"
        assert env["GREETING"] == "hi" and "SUPERVISOR_SECRET" not in env and env["FC_INSTANCE_ID"]
        assert len(marks(tmp_path, "initialize")) == 1  # once per worker, before it served
        response = sup.post("/pre-stop", headers={"x-fc-request-id": "stop-1"})
        assert response.status_code == 200
        [stop] = marks(tmp_path, "pre-stop")
        assert stop.read_text() == "stop-1"


def test_a_custom_runtime_that_never_listens_is_reported(tmp_path: Path) -> None:
    fn = http_fn("custom", tmp_path, startup_timeout="1s", env={"MARK_DIR": str(tmp_path), "NEVER_LISTEN": "1"})
    with started(tmp_path, {"web": fn}, initialize=False) as sup:
        response = wait_for(lambda: (r := sup.post("/initialize")).status_code == 404 and r, 30,
                            "/initialize to report the failure")
        error = response.json()
        assert error["errorType"] == "InitializationError"
        assert "starting up... and never listening" in error["errorMessage"]
        assert "1s" in error["errorMessage"]


def test_http_requests_to_an_event_function_are_404(tmp_path: Path) -> None:
    event_fn = {"runtime": "python", "handler": "fns:handler", "code_dir": str(FUNCTIONS_DIR)}
    with started(tmp_path, {"ev": event_fn}) as sup, sup.client() as client:
        response = client.get("/anything")
        assert response.status_code == 404 and response.json()["errorType"] == "FunctionNotFoundError"
        assert "POST /invoke" in response.json()["errorMessage"]


def test_a_client_that_leaves_mid_stream_frees_the_worker(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    fn = http_fn("asgi", max_workers=1, concurrency=1)
    with started(tmp_path, {"web": fn}) as sup:
        sock = socket.create_connection(("127.0.0.1", sup.ca_port), timeout=10)
        sock.sendall(f"GET /stream?gate={gate} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        assert b"first" in sock.recv(65536) or b"first" in sock.recv(65536)
        sock.close()  # gone before the application finished
        gate.touch()
        with sup.client() as client:
            wait_for(lambda: client.get("/x", timeout=5).status_code == 200, 20, "the slot to be free again")
        assert metric(sup, "supervisor_inflight_requests", function="web") == 0


def test_node_express_example(tmp_path: Path) -> None:
    import shutil
    import subprocess

    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node and npm are not installed on this machine (the express example needs them)")
    example = Path(__file__).parents[2] / "examples" / "express"
    code = tmp_path / "express"
    shutil.copytree(example, code, ignore=shutil.ignore_patterns("node_modules"))
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=code, check=True,
                   timeout=300, capture_output=True)
    fn = {"runtime": "custom", "command": ["node", "server.js"], "code_dir": str(code), "ready": "http:/healthz",
          "min_warm": 1, "max_workers": 2, "timeout": "10s", "hooks": ["initialize"]}
    with started(tmp_path, {"express": fn}) as sup, sup.client() as client:
        response = sup.invoke({"x": 1})
        assert response.status_code == 200, response.text
        hello = client.get("/hello", params={"name": "fc"})
        assert hello.status_code == 200 and "fc" in hello.text
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda i: client.get("/hello", params={"name": str(i)}).status_code, range(32)))
        assert statuses == [200] * 32
