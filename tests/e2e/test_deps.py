"""``supervisor deps`` end to end (issue 12, item 2): a function's requirements, its own directory, nobody.

With real packages from the registry (``six``, which the supervisor does
not have, and ``idna`` 3.6, which it has in another version): ``validate``
refuses a function whose requirements.txt is not installed, naming the key,
the file and the command; ``supervisor deps`` installs them once for the two
functions that share the code dir, compiled and readable by everyone; the
code dir is then made read-only (``chmod -R a-w``), and the workers, which
run as ``nobody``, import the function's own copies and answer; after
requirements.txt is edited, ``reload``, ``validate`` and ``run`` say it
changed. Without the registry (``pip download`` of the two pins fails) that
test is skipped, saying why; pip reaches the registry as the machine's pip
configuration says (its config files and ``PIP_*`` variables), exactly as
``supervisor deps`` does.

Offline: a failed pip names the functions, shows pip's error and leaves
the old install as it was; a directory ``deps`` did not make is left
alone; code the workers cannot read is refused by ``validate`` and ``run``
saying who the workers run as.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as metadata
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import free_port, started, write_config

REQUIREMENTS = "six==1.16.0\nidna==3.6\n"

HANDLER = '''
import os

import idna
import six


def handler(event, context):
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "written"), "w"):
            pass
        wrote = "yes"
    except OSError as exc:
        wrote = type(exc).__name__
    return {"idna": idna.__version__, "idna_file": idna.__file__, "six": six.__version__, "six_file": six.__file__,
            "uid": os.getuid(), "wrote": wrote, "encoded": idna.encode("bücher.example").decode()}
'''

PLAIN = '''
def handler(event, context):
    return {"ok": True}
'''

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="workers run as nobody only when the supervisor is root")


def cli(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FC_SERVER_PORT", "FC_CUSTOM_LISTEN_PORT", "CA_PORT", "SUPERVISOR_RUN_DIR",
                        "SUPERVISOR_METRICS_PORT", "SUPERVISOR_CONFIG")}
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skips unless pip can fetch the pinned packages (the registry is reachable)."""
    dest = tmp_path_factory.mktemp("download")
    try:
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                                  "--no-input", "--dest", str(dest), *REQUIREMENTS.split()],
                                 capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.skip("the package registry did not answer `pip download` within 300 s")
    if fetched.returncode != 0:
        why = (fetched.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"the package registry is not reachable (`pip download {' '.join(REQUIREMENTS.split())}` "
                    f"failed: {why})")


def code_dir(tmp_path: Path, handler: str = HANDLER, requirements: str | None = REQUIREMENTS) -> Path:
    fn = tmp_path / "fn"
    fn.mkdir()
    (fn / "app.py").write_text(handler)
    if requirements is not None:
        (fn / "requirements.txt").write_text(requirements)
    for path in (fn, *fn.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return fn


def config(tmp_path: Path, functions: dict[str, dict[str, Any]]) -> Path:
    path = tmp_path / "supervisor.toml"
    write_config(path, {"ca_port": free_port(), "metrics_port": free_port(), "host": "127.0.0.1",
                        "run_dir": str(tmp_path / "run")}, functions)
    return path


def python_function(fn: Path, **more: Any) -> dict[str, Any]:
    return {"runtime": "python", "handler": "app:handler", "code_dir": str(fn), "min_warm": 1, "max_workers": 2,
            "timeout": "30s", **more}


@contextlib.contextmanager
def read_only(tree: Path) -> Iterator[None]:
    """``chmod -R a-w tree`` for the test's length (then u+w again, for the clean-up)."""
    paths = [tree, *tree.rglob("*")]
    try:
        for path in paths:
            if not path.is_symlink():
                path.chmod(stat.S_IMODE(path.lstat().st_mode) & ~0o222)
        yield
    finally:
        for path in paths:
            if not path.is_symlink() and path.exists():
                path.chmod(stat.S_IMODE(path.lstat().st_mode) | 0o200)


def modes(tree: Path) -> dict[str, int]:
    return {str(path.relative_to(tree)): stat.S_IMODE(path.lstat().st_mode)
            for path in tree.rglob("*") if not path.is_symlink()}


# ---- with the registry ------------------------------------------------------------------------


@as_root
def test_requirements_from_the_registry_serve_a_read_only_function_as_nobody(registry: None, tmp_path: Path) -> None:
    fn = code_dir(tmp_path)
    packages = fn / ".python_packages"
    functions = {"a": python_function(fn), "b": python_function(fn)}
    path = config(tmp_path, functions)
    command = f"supervisor deps --config {path}"

    # Not installed: validate says so for each function, with the command; their handlers are not imported.
    before = cli("validate", "--config", str(path))
    assert before.returncode == 2, before
    for name in ("a", "b"):
        assert (f"functions.{name}.python_packages: {fn / 'requirements.txt'} is not installed in {packages}: "
                f"run `{command}`") in before.stderr.splitlines(), before.stderr
    assert "cannot import" not in before.stderr

    done = cli("deps", "--config", str(path))
    assert done.returncode == 0, done
    assert done.stdout == (f"a, b: installed requirements.txt into {packages}: idna 3.6, six 1.16.0 (shared by "
                           f"functions a, b: the same python_packages directory)\n"), done
    assert "Successfully installed" in done.stderr  # pip's own output, on stderr
    # Compiled, readable by everyone, nothing writable but by its owner; nothing left beside it.
    found = modes(packages)
    assert {"__pycache__/six.cpython-311.pyc", "idna/__pycache__/core.cpython-311.pyc"} <= set(found)
    assert all(mode & 0o555 == 0o555 if (packages / name).is_dir() else mode & 0o444 == 0o444
               for name, mode in found.items()), found
    assert not any(mode & 0o022 for mode in found.values()), found
    assert json.loads((packages / ".supervisor-deps.json").read_text())["installed"] == {"idna": "3.6",
                                                                                         "six": "1.16.0"}
    assert sorted(p.name for p in fn.iterdir()) == [".python_packages", "app.py", "requirements.txt"]
    try:
        supervisors = metadata.version("idna")
    except metadata.PackageNotFoundError:
        supervisors = None
    assert supervisors != "3.6"  # the function's own version, not one the supervisor could lend it

    with read_only(fn):
        valid = cli("validate", "--config", str(path))
        assert valid.returncode == 0 and valid.stdout == f"{path}: OK (2 functions: a, b)\n", valid
        with started(tmp_path, functions) as sup:
            for name in ("a", "b"):
                response = sup.invoke({}, function=name)
                assert response.status_code == 200, response.text
                answer = response.json()
                assert answer["idna"] == "3.6" and answer["six"] == "1.16.0", answer
                assert answer["idna_file"] == str(packages / "idna" / "__init__.py"), answer
                assert answer["six_file"] == str(packages / "six.py"), answer
                assert answer["encoded"] == "xn--bcher-kva.example"
                assert answer["uid"] == 65534 and answer["wrote"] != "yes", answer  # nobody, read-only code

            # requirements.txt edited: a reload that takes the changed code is refused, the old one serves.
            (fn / "requirements.txt").write_text(REQUIREMENTS + "# and one more line\n")
            reload = sup.cli("reload", "--run-dir", str(sup.run_dir), timeout=120)
            assert reload.returncode == 2, reload
            assert (f"{fn / 'requirements.txt'} changed since it was installed in {packages}: run "
                    f"`{command}`").encode() in reload.stderr, reload.stderr
            assert sup.invoke({}, function="a").json()["idna"] == "3.6"

        after = cli("validate", "--config", str(path))
        assert after.returncode == 2, after
        assert (f"functions.a.python_packages: {fn / 'requirements.txt'} changed since it was installed in "
                f"{packages}: run `{command}`") in after.stderr.splitlines(), after.stderr
        refused = cli("run", "--config", str(path), timeout=120)
        assert refused.returncode == 2, refused
        assert "nothing started" in refused.stderr and "changed since it was installed" in refused.stderr


# ---- offline ----------------------------------------------------------------------------------


def test_a_failed_install_names_the_function_shows_pips_error_and_keeps_the_old_one(tmp_path: Path) -> None:
    fn = code_dir(tmp_path, PLAIN, requirements="# nothing yet\n")
    packages = fn / ".python_packages"
    path = config(tmp_path, {"f": python_function(fn)})
    first = cli("deps", "--config", str(path))
    assert first.returncode == 0, first
    assert first.stdout == f"f: installed requirements.txt into {packages}: nothing\n"
    stamp = (packages / ".supervisor-deps.json").read_bytes()

    # A wheel that is not there: pip fails without asking the registry.
    (fn / "requirements.txt").write_text("./wheels/missing-1.0-py3-none-any.whl\n")
    failed = cli("deps", "--config", str(path))
    assert failed.returncode == 1, failed
    assert failed.stdout == ""
    assert "No such file or directory" in failed.stderr and "missing-1.0-py3-none-any.whl" in failed.stderr
    assert (f"f: not installed: pip failed (exit code 1; its output is above); {packages} stays as it was"
            in failed.stderr.splitlines()), failed.stderr
    assert (packages / ".supervisor-deps.json").read_bytes() == stamp
    assert sorted(p.name for p in fn.iterdir()) == [".python_packages", "app.py", "requirements.txt"]
    valid = cli("validate", "--config", str(path))
    assert valid.returncode == 2 and "requirements.txt changed since it was installed" in valid.stderr, valid


def test_a_directory_deps_did_not_make_is_left_alone(tmp_path: Path) -> None:
    fn = code_dir(tmp_path, PLAIN, requirements="# nothing\n")
    (fn / "lib").mkdir()
    (fn / "lib" / "mine.py").write_text("x = 1\n")
    path = config(tmp_path, {"f": python_function(fn, python_packages="lib")})
    done = cli("deps", "--config", str(path))
    assert done.returncode == 1, done
    assert f"f: not installed: {fn / 'lib'} exists and was not made by `supervisor deps`" in done.stderr, done
    assert [p.name for p in (fn / "lib").iterdir()] == ["mine.py"]


def test_what_deps_is_asked_for_must_exist(tmp_path: Path) -> None:
    fn = code_dir(tmp_path, PLAIN, requirements=None)
    path = config(tmp_path, {"f": python_function(fn), "web": {"runtime": "custom", "command": ["./run"],
                                                                "code_dir": str(fn)}})
    nothing = cli("deps", "--config", str(path))
    assert nothing.returncode == 0 and nothing.stdout == f"f: no requirements.txt in {fn}, nothing to install\n"
    for name in ("web", "nope"):
        wrong = cli("deps", "--config", str(path), "--function", name)
        assert wrong.returncode == 2, wrong
        assert wrong.stderr == f"{name} is not a Python function of {path} (its Python functions: f)\n"
    path.write_text(path.read_text() + "\n[functions.g]\ncode_dir = 1\n")
    invalid = cli("deps", "--config", str(path))
    assert invalid.returncode == 2 and "nothing installed" in invalid.stderr and "functions.g" in invalid.stderr


@as_root
@pytest.mark.parametrize("closed", ["app.py", "."])
def test_code_the_workers_cannot_read_is_refused_saying_who_they_run_as(tmp_path: Path, closed: str) -> None:
    fn = code_dir(tmp_path, PLAIN, requirements=None)
    (fn / closed).chmod(0o600 if closed != "." else 0o700)
    path = config(tmp_path, {"f": python_function(fn)})
    unreadable = fn / closed if closed != "." else fn
    message = (f"functions.f.code_dir: workers run as uid 65534 (nobody): make {unreadable} readable by them "
               f"(chmod -R a+rX {fn})")
    valid = cli("validate", "--config", str(path))
    assert valid.returncode == 2, valid
    assert valid.stderr.splitlines() == [message]
    refused = cli("run", "--config", str(path), timeout=120)
    assert refused.returncode == 2 and f"  {message}" in refused.stderr.splitlines(), refused
