"""Lifecycle order and methods on the CA port, on a real supervisor.

``/invoke`` runs the handler for POST only; other methods get 405
``MethodNotAllowedError`` with ``Allow: POST`` and never reach a worker.
The lifecycle hooks take GET or POST. ``/initialize`` after ``/pre-stop``
answers 503 ``ShuttingDownError`` at once instead of waiting.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Running, function, started


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    # One worker that counts what it runs.
    with started(tmp_path_factory.mktemp("methods"), {"hello": function(max_workers=1)}) as running:
        yield running


def count(sup: Running) -> int:
    response = sup.invoke({"op": "count"})
    assert response.status_code == 200
    return int(response.json()["count"])


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_only_post_invokes(sup: Running, method: str) -> None:
    before = count(sup)
    with sup.client() as client:
        response = client.request(method, "/invoke", content=b'{"op": "count"}',
                                  headers={"x-fc-request-id": "m-1"})
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.headers["x-fc-status"] == "404"
    assert response.headers["x-fc-request-id"] == "m-1"
    if method != "HEAD":
        assert response.json()["errorType"] == "MethodNotAllowedError"
        assert method in response.json()["errorMessage"]
    assert count(sup) == before + 1  # the worker ran nothing in between


@pytest.mark.parametrize("path", ["/initialize", "/pre-freeze"])
@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_hooks_take_get_and_post_only(sup: Running, path: str, method: str) -> None:
    with sup.client() as client:
        response = client.request(method, path)
        assert response.status_code == 405
        assert response.headers["allow"] == "GET, POST"
        assert response.json()["errorType"] == "MethodNotAllowedError"
        assert client.get(path).status_code == 200
        assert client.post(path).status_code == 200


def test_initialize_after_pre_stop_is_refused_at_once(tmp_path: Path) -> None:
    with started(tmp_path, {"hello": function()}) as sup:
        with sup.client() as client:
            assert client.get("/pre-stop").status_code == 200
            began = time.monotonic()
            response = client.post("/initialize", headers={"x-fc-request-id": "late-init"}, timeout=10)
        assert time.monotonic() - began < 5, "it waited for workers that will never come"
        assert response.status_code == 503
        assert response.json()["errorType"] == "ShuttingDownError"
        assert response.headers["x-fc-status"] == "404"
        assert response.headers["x-fc-request-id"] == "late-init"
        assert response.headers["retry-after"]
