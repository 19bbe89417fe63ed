"""The command line against a real ``supervisor run`` (issue 12, item 6).

- ``status`` / ``reload`` with ``--config FILE`` find the running supervisor
  from FILE's ``run_dir`` even when FILE is invalid, and report FILE's
  problems with exit 2 (not "no supervisor running", exit 4);
- ``status --json`` lists each worker's start mode (``fork`` / ``spawn``);
- ``served`` counts every invocation whose answer came back before
  ``status`` was asked: no wait between the two;
- ``validate`` reports structural and import problems in one pass;
- ``supervisor invoke`` ends its output with a newline (``--raw``: the
  body's bytes exactly).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.harness import FUNCTIONS_DIR, Running, function, started, write_config


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("cli")
    functions = {
        "forked": function(min_warm=1, max_workers=2),
        "spawned": function(seed=False, min_warm=1, max_workers=1),
        "counted": function(min_warm=1, max_workers=1, concurrency=4),
    }
    with started(tmp, functions, default_function="forked") as running:
        yield running


def broken_copy(sup: Running, name: str, extra: str) -> Path:
    """The running supervisor's config file with ``extra`` appended (a problem), next to it."""
    path = sup.config_path.parent / name
    path.write_text(sup.config_path.read_text() + extra)
    return path


def test_status_with_an_invalid_config_finds_the_supervisor_and_reports_the_problems(sup: Running) -> None:
    bad = broken_copy(sup, "typo.toml", '\n[functions.forked2]\nhandler = "fns:handler"\ntimout = "1s"\n')
    result = sup.cli("status", "--json", "--config", str(bad))
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "functions.forked2.timout: " in err and "no supervisor running" not in err
    document = json.loads(result.stdout)  # the running supervisor, found through the file's run_dir
    assert {f["name"] for f in document["functions"]} == {"forked", "spawned", "counted"}

    table = sup.cli("status", "--config", str(bad))
    assert table.returncode == 2 and b"function forked (python)" in table.stdout


def test_status_with_an_unreadable_config_reports_it_with_exit_2(sup: Running) -> None:
    bad = broken_copy(sup, "unparseable.toml", "\n[functions\n")
    result = sup.cli("status", "--config", str(bad))
    assert result.returncode == 2, result.stderr
    assert b"not valid TOML" in result.stderr and b"no supervisor running" not in result.stderr


def test_reload_with_an_invalid_config_reports_the_problems_with_exit_2(sup: Running) -> None:
    bad = broken_copy(sup, "reload-typo.toml", '\n[functions.forked2]\nhandler = "fns:handler"\nmin_warm = -1\n')
    result = sup.cli("reload", "--config", str(bad))
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "functions.forked2.min_warm: " in err and "no supervisor running" not in err
    assert json.loads(sup.cli("reload", "--json", "--config", str(bad)).stdout)["problems"]
    # A valid file still reloads the running supervisor, found the same way.
    assert sup.cli("reload", "--config", str(sup.config_path)).returncode == 0


def test_status_json_lists_each_workers_start_mode(sup: Running) -> None:
    functions = {f["name"]: f for f in sup.status()["functions"]}
    assert [w["mode"] for w in functions["spawned"]["workers"]] == ["spawn"]
    assert functions["forked"]["workers"] and all(w["mode"] in ("fork", "spawn") for w in functions["forked"]["workers"])


def served(sup: Running, name: str) -> int:
    return sum(w["served"] for f in sup.status()["functions"] if f["name"] == name for w in f["workers"])


def test_served_counts_each_invocation_as_soon_as_it_returns(sup: Running) -> None:
    before = served(sup, "counted")
    for done in range(1, 4):
        assert sup.invoke({"echo": done}, function="counted").status_code == 200
        assert served(sup, "counted") == before + done  # asked right after the answer: no wait
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: sup.invoke({"op": "sleep", "s": 0.05}, function="counted"), range(8)))
    assert [a.status_code for a in answers] == [200] * 8
    assert served(sup, "counted") == before + 3 + 8


def test_invoke_ends_its_output_with_a_newline(sup: Running) -> None:
    result = sup.cli("invoke", "forked", "--data", '{"name": "cli"}', "--run-dir", str(sup.run_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b'{"name":"cli"}\n'
    raw = sup.cli("invoke", "forked", "--raw", "--data", '{"name": "cli"}', "--run-dir", str(sup.run_dir))
    assert raw.returncode == 0 and raw.stdout == b'{"name":"cli"}'
    # A body that already ends with one gets no second one.
    text = sup.cli("invoke", "forked", "--data", "line\n", "--run-dir", str(sup.run_dir))
    assert text.stdout == b"line\n"


def test_validate_reports_structural_and_import_problems_in_one_pass(tmp_path: Path) -> None:
    config = tmp_path / "supervisor.toml"
    write_config(config, {"run_dir": str(tmp_path / "run")}, {
        "shape": {"handler": "fns:handler", "code_dir": str(FUNCTIONS_DIR), "timeout": "soon"},
        "imports": {"handler": "no_such_module_here:handler", "code_dir": str(FUNCTIONS_DIR)},
        "fine": {"handler": "fns:handler", "code_dir": str(FUNCTIONS_DIR)},
    })
    result = subprocess.run([sys.executable, "-m", "supervisor.cli", "validate", "--config", str(config)],
                            capture_output=True, timeout=60)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    lines = err.splitlines()
    assert any(line.startswith("functions.shape.timeout: ") for line in lines), err
    assert any(line.startswith("functions.imports.handler: ") and "no_such_module_here" in line for line in lines), err
    assert not any(line.startswith("functions.fine") for line in lines), err
