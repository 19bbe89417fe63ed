"""A Python function's packages win, always (issue 12, item 1).

On real processes: a function ships, in its code dir, a shadow copy of every
third-party package the supervisor depends on (the list is derived from the
installed distributions: ca-supervisor's requirements and theirs, so it
cannot go stale), each marking itself with ``__shadow__ = True``. Then:

- the function imports its own copies, every one of them;
- the worker and its seed had imported none of them (nor anything outside
  the standard library and the worker's own code) before the function's
  module: the module reports ``sys.modules`` as it is imported;
- ``sys.path`` is the function's directories (code_dir, its python_packages
  dir, its PYTHONPATH), then the standard library: no site-packages;
- the forked start is kept: the seed runs and workers are forked;
- ``event_loop = "uvloop"`` runs the uvloop the function ships (a shim that
  says so, and the real compiled uvloop copied into the code dir), and
  without one the function fails to initialize, saying why;
- ``PYDANTIC_DISABLE_PLUGINS`` is not in a worker's environment unless the
  function sets it.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
import shutil
import site
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Running, function, start, started, wait_for
from tests.e2e.test_pools import metric, running_seed

HANDLER = '''
import sys

PRELOADED = sorted(sys.modules)  # first: what the worker (or its seed) imported before this module
SYS_PATH = list(sys.path)

import asyncio
import importlib
import json
import os


def handler(event, context):
    names = json.loads(event)["names"]
    found = {}
    for name in names:
        module = importlib.import_module(name)
        found[name] = {"shadow": getattr(module, "__shadow__", False), "file": getattr(module, "__file__", None)}
    return {"found": found, "preloaded": PRELOADED, "sys_path": SYS_PATH, "pid": os.getpid(),
            "pydantic_plugins": os.environ.get("PYDANTIC_DISABLE_PLUGINS")}


async def loop_handler(event, context):
    loop = asyncio.get_running_loop()
    uvloop = sys.modules.get("uvloop")
    return {"loop": f"{type(loop).__module__}.{type(loop).__qualname__}",
            "uvloop_file": getattr(uvloop, "__file__", None), "shadow": getattr(uvloop, "__shadow__", False),
            "preloaded": PRELOADED}
'''

# A uvloop that provides what a worker needs to run on it (new_event_loop), and says it is the function's.
UVLOOP_SHIM = '''
import asyncio

__shadow__ = True


class Loop(asyncio.SelectorEventLoop):
    pass


def new_event_loop():
    return Loop()
'''


def _requirement_names(dist: str) -> list[str]:
    names = []
    for requirement in metadata.requires(dist) or []:
        if ";" in requirement and "extra" in requirement.split(";", 1)[1]:
            continue  # an optional extra (tests), not a dependency
        match = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert match, requirement
        names.append(match.group(0))
    return names


def _import_names(dist: metadata.Distribution) -> set[str]:
    """The importable names a distribution installs: its top-level packages and modules,
    one level deeper for a namespace package (google -> google.protobuf)."""
    files = [f for f in dist.files or () if f.parts[0] != ".." and not f.parts[0].endswith((".dist-info", ".data"))]
    tops: set[str] = set()
    for f in files:
        if len(f.parts) == 1:
            if f.suffix in (".py", ".so") or ".cpython-" in f.name:
                tops.add(f.name.split(".")[0])
        elif f.parts[0] != "__pycache__":
            tops.add(f.parts[0])
    names = set()
    for top in tops:
        if not top.isidentifier() or top in sys.stdlib_module_names:
            continue
        namespace = (len(f.parts) > 1 and f.parts[0] == top for f in files)
        if any(namespace) and not any(f.parts[:2] == (top, "__init__.py") for f in files):
            names.update(f"{top}.{f.parts[1]}" for f in files
                         if len(f.parts) > 2 and f.parts[0] == top and f.parts[1].isidentifier())
        else:
            names.add(top)
    return names


def supervisor_dependencies() -> list[str]:
    """Every import name of every distribution ca-supervisor needs (its requirements and theirs)."""
    seen: set[str] = set()
    names: set[str] = set()
    todo = _requirement_names("ca-supervisor")
    while todo:
        requirement = todo.pop()
        key = re.sub(r"[-_.]+", "-", requirement).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(requirement)
        except metadata.PackageNotFoundError:
            continue  # a requirement for other Pythons (a marker), not installed here
        names |= _import_names(dist)
        todo += _requirement_names(requirement)
    return sorted(names)


def shadow_code(tmp_path: Path) -> tuple[Path, list[str]]:
    code = tmp_path / "code"
    code.mkdir()
    (code / "shadowed.py").write_text(HANDLER)
    names = supervisor_dependencies()
    for name in names:
        package = code.joinpath(*name.split("."))
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(f"__shadow__ = True\nNAME = {name!r}\n")
    return code, names


def test_the_dependency_list_is_the_supervisors() -> None:
    names = supervisor_dependencies()
    # The ones the issue names, found from the installed metadata.
    for expected in ("uvloop", "grpc", "google.protobuf", "structlog", "prometheus_client", "anyio", "orjson",
                     "pydantic", "psutil", "httptools", "uvicorn", "aiohttp", "multidict", "yarl"):
        assert expected in names, names


def _allowed(module: str, own: str) -> bool:
    top = module.partition(".")[0]
    return top in sys.stdlib_module_names or top in ("worker", "calink", "__main__", own)


def _check_shadowed(sup: Running, code: Path, names: list[str]) -> dict[str, Any]:
    answer = sup.invoke({"names": names})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    not_own = {name: found["file"] for name, found in body["found"].items() if not found["shadow"]}
    assert not not_own, f"the function got the supervisor's copies of: {not_own}"
    preloaded = body["preloaded"]
    shadowed_tops = {name.partition(".")[0] for name in names}
    assert not [m for m in preloaded if m.partition(".")[0] in shadowed_tops and m != "google"], preloaded
    assert "google" not in preloaded
    assert [m for m in preloaded if not _allowed(m, "shadowed")] == []
    sys_path = body["sys_path"]
    assert sys_path[:2] == [str(code), str(code / ".python_packages")], sys_path
    site_dirs = {*site.getsitepackages(), site.getusersitepackages()}
    assert not [p for p in sys_path if p in site_dirs or "site-packages" in p or "dist-packages" in p], sys_path
    assert body["pydantic_plugins"] is None
    return body


def test_the_function_gets_its_own_copies_with_the_forked_start_kept(tmp_path: Path) -> None:
    code, names = shadow_code(tmp_path)
    with started(tmp_path, {"fn": function("shadowed:handler", code_dir=str(code), min_warm=2)}) as sup:
        wait_for(lambda: running_seed(sup, "fn"), 15, "the seed running")
        _check_shadowed(sup, code, names)
        assert metric(sup, "supervisor_worker_starts_total", function="fn", mode="fork") >= 1
        assert metric(sup, "supervisor_worker_starts_total", function="fn", mode="spawn") == 0
        assert running_seed(sup, "fn")


def test_a_spawned_worker_gets_them_too(tmp_path: Path) -> None:
    code, names = shadow_code(tmp_path)
    with started(tmp_path, {"fn": function("shadowed:handler", code_dir=str(code), seed=False)}) as sup:
        _check_shadowed(sup, code, names)
        assert metric(sup, "supervisor_worker_starts_total", function="fn", mode="spawn") >= 1


def test_a_function_that_ships_uvloop_without_run_is_served(tmp_path: Path) -> None:
    """The reported failure: ``AttributeError: module 'uvloop' has no attribute 'run'``
    in worker/main.py killed every worker at start."""
    code = tmp_path / "code"
    (code / "uvloop").mkdir(parents=True)
    (code / "uvloop" / "__init__.py").write_text("__shadow__ = True\n")
    (code / "shadowed.py").write_text(HANDLER)
    with started(tmp_path, {"fn": function("shadowed:handler", code_dir=str(code))}) as sup:
        body = _check_shadowed(sup, code, ["uvloop"])
        assert body["found"]["uvloop"]["file"] == str(code / "uvloop" / "__init__.py")


def test_pydantic_plugins_are_the_functions_own_setting(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "shadowed.py").write_text(HANDLER)
    functions = {
        "plain": function("shadowed:handler", code_dir=str(tmp_path / "code")),
        "set": function("shadowed:handler", code_dir=str(tmp_path / "code"),
                        env={"PYDANTIC_DISABLE_PLUGINS": "logfire"}),
    }
    with started(tmp_path, functions) as sup:
        for name, expected in (("plain", None), ("set", "logfire")):
            answer = sup.invoke({"names": []}, function=name)
            assert answer.status_code == 200, answer.text
            assert answer.json()["pydantic_plugins"] == expected, name


@pytest.mark.parametrize("seed", [True, False])
def test_event_loop_uvloop_runs_the_uvloop_the_function_ships(tmp_path: Path, seed: bool) -> None:
    code = tmp_path / "code"
    (code / "uvloop").mkdir(parents=True)
    (code / "uvloop" / "__init__.py").write_text(UVLOOP_SHIM)
    (code / "shadowed.py").write_text(HANDLER)
    fns = {"shim": function("shadowed:loop_handler", code_dir=str(code), event_loop="uvloop", seed=seed),
           "default": function("shadowed:loop_handler", code_dir=str(code), seed=seed)}
    with started(tmp_path, fns) as sup:
        shim = sup.invoke(function="shim")
        assert shim.status_code == 200, shim.text
        assert shim.json()["loop"] == "uvloop.Loop" and shim.json()["shadow"] is True
        assert shim.json()["uvloop_file"] == str(code / "uvloop" / "__init__.py")
        default = sup.invoke(function="default")
        assert default.status_code == 200, default.text
        # asyncio's own loop, and uvloop not even imported before the function's module
        assert default.json()["loop"].startswith("asyncio.") and default.json()["uvloop_file"] is None
        assert "uvloop" not in default.json()["preloaded"]
        if seed:
            assert metric(sup, "supervisor_worker_starts_total", function="shim", mode="fork") >= 1


def test_event_loop_uvloop_with_the_real_uvloop_shipped(tmp_path: Path) -> None:
    import uvloop  # the test's own: copied into the function's python_packages, as `supervisor deps` would

    code = tmp_path / "code"
    code.mkdir()
    (code / "shadowed.py").write_text(HANDLER)
    packages = code / ".python_packages"
    shutil.copytree(Path(uvloop.__file__).parent, packages / "uvloop")
    with started(tmp_path, {"fn": function("shadowed:loop_handler", code_dir=str(code), event_loop="uvloop")}) as sup:
        answer = sup.invoke()
        assert answer.status_code == 200, answer.text
        assert answer.json()["loop"] == "uvloop.Loop"
        assert answer.json()["uvloop_file"] == str(packages / "uvloop" / "__init__.py")


def test_event_loop_uvloop_without_uvloop_shipped_is_refused(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "shadowed.py").write_text(HANDLER)
    sup = start(tmp_path, {"fn": function("shadowed:loop_handler", code_dir=str(code), event_loop="uvloop")},
                initialize=False)
    try:
        code_ = wait_for(lambda: sup.proc.poll(), 60, "the supervisor refusing the config")
        assert code_ == 2
        problems = [line for line in sup.logs() if "functions.fn.event_loop" in json.dumps(line)]
        assert problems and "uvloop" in json.dumps(problems), sup.log_path.read_text()[-2000:]
    finally:
        sup.kill_all()


def test_sys_path_is_code_dir_packages_dir_pythonpath_then_the_standard_library(tmp_path: Path) -> None:
    code = tmp_path / "code"
    for where in ("vendor", "extra", ""):  # the same module name in three places: the first one wins
        (code / where / "which").mkdir(parents=True)
        (code / where / "which" / "__init__.py").write_text(f"PLACE = {where or 'code_dir'!r}\n")
    (code / "vendor" / "only_vendored").mkdir()
    (code / "vendor" / "only_vendored" / "__init__.py").write_text("__shadow__ = True\n")
    (code / "extra" / "only_extra.py").write_text("__shadow__ = True\n")
    (code / "shadowed.py").write_text(HANDLER + '''

def which(event, context):
    import which
    return which.PLACE
''')
    fn = function("shadowed:handler", code_dir=str(code), python_packages="vendor", env={"PYTHONPATH": "extra"})
    with started(tmp_path, {"fn": fn, "which": {**fn, "handler": "shadowed:which"}}) as sup:
        answer = sup.invoke({"names": ["only_vendored", "only_extra"]}, function="fn")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["sys_path"][:3] == [str(code), str(code / "vendor"), str(code / "extra")], body["sys_path"]
        assert all(found["shadow"] for found in body["found"].values()), body["found"]
        assert sup.invoke(function="which").text == "code_dir"
