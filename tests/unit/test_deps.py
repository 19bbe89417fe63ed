"""The pure parts of ``supervisor deps`` (supervisor/deps.py) and of the checks around it.

The stamp and its verdict, the plan (one install per python_packages
directory), the ``python_packages`` key's rules, the swap and the modes
(on files in ``tmp_path``, no process), and the readability check of a
function's code with what its message says
(supervisor/control/sandbox.py). pip itself runs in
tests/e2e/test_deps.py.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor import deps
from supervisor.config import Config, ConfigError, FunctionConfig, parse_config
from supervisor.control.sandbox import Identity, Sandbox, code_problems, unreadable_code

NOBODY = Identity(65534, 65534, "nobody")
TAG = "cpython-3.11-x86_64"


def parsed(tmp_path: Path, functions: dict[str, dict[str, Any]]) -> Config:
    for body in functions.values():
        (tmp_path / body.get("code_dir", "fn")).mkdir(parents=True, exist_ok=True)
    tables = {name: {"code_dir": "fn", **({"handler": "app:handler"} if body.get("runtime", "python") == "python"
                                           else {"command": ["./run"]}), **body}
              for name, body in functions.items()}
    return parse_config({"functions": tables}, tmp_path, {}, tmp_path / "supervisor.toml")


# ---- the stamp ---------------------------------------------------------------------------


@given(st.binary(max_size=200), st.binary(max_size=200), st.sampled_from([TAG, "cpython-3.12-x86_64"]))
def test_a_stamp_stands_for_exactly_its_requirements_and_interpreter(installed: bytes, now: bytes, python: str) -> None:
    stamp = deps.stamp_bytes(installed, TAG, [("six", "1.16.0")])
    expected = ("changed" if installed != now else "installed" if python == TAG else "other-python")
    assert deps.verdict(now, stamp, python) == expected


@given(st.binary(max_size=300))
def test_anything_else_in_the_stamp_file_means_not_installed(junk: bytes) -> None:
    assert deps.read_stamp(junk) is None or json.loads(junk)["requirements_sha256"]  # never raises
    if deps.read_stamp(junk) is None:
        assert deps.verdict(b"six\n", junk, TAG) == "not-installed"


def test_no_stamp_is_not_installed_and_no_requirements_is_nothing_to_install() -> None:
    assert deps.verdict(b"six\n", None, TAG) == "not-installed"
    assert deps.verdict(None, None, TAG) == "none"
    assert deps.verdict(None, deps.stamp_bytes(b"six\n", TAG), TAG) == "none"
    assert deps.verdict(b"six\n", b'{"requirements_sha256": 1, "interpreter": "x"}', TAG) == "not-installed"


def test_the_stamp_says_what_was_installed_for_people() -> None:
    found = json.loads(deps.stamp_bytes(b"idna==3.6\n", TAG, [("idna", "3.6"), ("six", "1.16.0")]))
    assert found["installed"] == {"idna": "3.6", "six": "1.16.0"} and found["interpreter"] == TAG


def test_the_interpreter_tag_is_implementation_version_machine() -> None:
    name, version, machine = deps.interpreter_tag().split("-", 2)
    assert name == "cpython" and version == "3.11" and machine


# ---- the python_packages key ---------------------------------------------------------------


def test_python_packages_defaults_to_a_directory_in_code_dir(tmp_path: Path) -> None:
    config = parsed(tmp_path, {"f": {}, "g": {"python_packages": "lib/./site//"}})
    assert config.functions["f"].python_packages == ".python_packages"
    assert deps.packages_dir(config.functions["f"]) == tmp_path / "fn" / ".python_packages"
    assert config.functions["g"].python_packages == "lib/site"


@pytest.mark.parametrize(("value", "says"), [
    ("/opt/deps", "relative to code_dir"),
    ("~/deps", "relative to code_dir"),
    (".", "not code_dir itself"),
    ("", "not code_dir itself"),
    ("..", "outside"),
    ("a/../../b", "outside"),
    ("a\0b", "NUL"),
    ("x" * 1025, "at most 1024 bytes"),
    (3, "expected a string"),
])
def test_python_packages_stays_inside_code_dir(tmp_path: Path, value: Any, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parsed(tmp_path, {"f": {"python_packages": value}})
    [problem] = caught.value.problems
    assert problem.path == "functions.f.python_packages" and says in problem.message, problem


def test_python_packages_is_for_python_functions_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parsed(tmp_path, {"web": {"runtime": "custom", "python_packages": "deps"}})
    [problem] = caught.value.problems
    assert problem.path == "functions.web.python_packages" and "only python functions" in problem.message


# ---- the plan ------------------------------------------------------------------------------


def functions(tmp_path: Path, tables: dict[str, dict[str, Any]]) -> list[FunctionConfig]:
    return list(parsed(tmp_path, tables).functions.values())


def test_functions_sharing_a_directory_share_one_install(tmp_path: Path) -> None:
    found = deps.plan(functions(tmp_path, {"a": {}, "web": {"runtime": "custom"}, "b": {}, "c": {"code_dir": "other"},
                                           "d": {"code_dir": "bare"}, "e": {"python_packages": "own"}}),
                      lambda path: path.parent.name != "bare")
    assert [(job.functions, job.directory) for job in found.installs] == [
        (("a", "b"), tmp_path / "fn" / ".python_packages"),
        (("c",), tmp_path / "other" / ".python_packages"),
        (("e",), tmp_path / "fn" / "own"),
    ]
    assert [job.requirements for job in found.installs] == [tmp_path / "fn" / deps.REQUIREMENTS,
                                                            tmp_path / "other" / deps.REQUIREMENTS,
                                                            tmp_path / "fn" / deps.REQUIREMENTS]
    assert found.without == ["d"] and found.problems == []


def test_two_requirements_files_for_one_directory_are_refused(tmp_path: Path) -> None:
    # /fn with python_packages "sub/.python_packages" and /fn/sub with the default: the same directory.
    found = deps.plan(functions(tmp_path, {"a": {"python_packages": "sub/.python_packages"},
                                           "b": {"code_dir": "fn/sub"}}), lambda path: True)
    [problem] = found.problems
    assert problem.path == "functions.b.python_packages"
    assert "also the python_packages of function a" in problem.message
    assert [job.functions for job in found.installs] == [("a",)]


@given(st.lists(st.sampled_from(["fn", "other", "third"]), min_size=1, max_size=8))
def test_every_python_function_with_requirements_is_in_exactly_one_install(code_dirs: list[str]) -> None:
    fake = [FunctionConfig.model_construct(name=f"f{i}", runtime="python", code_dir=Path("/srv") / code_dir,
                                           python_packages=".python_packages")
            for i, code_dir in enumerate(code_dirs)]
    found = deps.plan(fake, lambda path: True)
    assert sorted(name for job in found.installs for name in job.functions) == sorted(f.name for f in fake)
    assert len(found.installs) == len(set(code_dirs)) and not found.problems


# ---- what validate says ------------------------------------------------------------------


def test_requirements_problems_name_the_key_the_file_and_the_command(tmp_path: Path) -> None:
    config = parsed(tmp_path, {"a": {}, "b": {}, "plain": {"code_dir": "plain"}})
    (tmp_path / "fn" / "requirements.txt").write_bytes(b"six==1.16.0\n")
    command = f"supervisor deps --config {tmp_path / 'supervisor.toml'}"
    problems = deps.requirements_problems(config, TAG)
    assert [p.path for p in problems] == ["functions.a.python_packages", "functions.b.python_packages"]
    assert problems[0].message == (f"{tmp_path / 'fn' / 'requirements.txt'} is not installed in "
                                   f"{tmp_path / 'fn' / '.python_packages'}: run `{command}`")

    (tmp_path / "fn" / ".python_packages").mkdir()
    (tmp_path / "fn" / ".python_packages" / deps.STAMP).write_bytes(deps.stamp_bytes(b"six==1.16.0\n", TAG))
    assert deps.requirements_problems(config, TAG) == []

    assert "was installed for cpython-3.11-x86_64, but workers run cpython-3.12" in (
        deps.requirements_problems(config, "cpython-3.12-x86_64")[0].message)

    (tmp_path / "fn" / "requirements.txt").write_bytes(b"six==1.17.0\n")
    [changed, _] = deps.requirements_problems(config, TAG)
    assert "requirements.txt changed since it was installed in" in changed.message and command in changed.message


# ---- installing without pip: refusals, the swap, the modes ---------------------------------


def job_for(tmp_path: Path) -> deps.Install:
    code_dir = tmp_path / "fn"
    code_dir.mkdir(exist_ok=True)
    (code_dir / "requirements.txt").write_text("six\n")
    return deps.Install(code_dir / ".python_packages", code_dir / "requirements.txt", code_dir, ("f",))


def test_a_directory_deps_did_not_make_is_never_replaced(tmp_path: Path) -> None:
    job = job_for(tmp_path)
    job.directory.mkdir()
    (job.directory / "mine.py").write_text("x = 1\n")
    with pytest.raises(deps.InstallFailed, match="was not made by `supervisor deps`"):
        deps.install(job, open(os.devnull, "w"), python="/nonexistent/python")
    assert (job.directory / "mine.py").read_text() == "x = 1\n"
    assert sorted(p.name for p in job.code_dir.iterdir()) == [".python_packages", "requirements.txt"]


def test_a_file_where_the_directory_goes_is_refused(tmp_path: Path) -> None:
    job = job_for(tmp_path)
    job.directory.write_text("")
    with pytest.raises(deps.InstallFailed, match="is not a directory"):
        deps.install(job, open(os.devnull, "w"), python="/nonexistent/python")


def test_the_swap_replaces_the_old_directory_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    old, new = tmp_path / ".python_packages", tmp_path / ".python_packages.new-x"
    old.mkdir()
    (old / "old.py").write_text("")
    new.mkdir()
    (new / "new.py").write_text("")
    deps._swap(new, old)
    assert [p.name for p in tmp_path.iterdir()] == [".python_packages"]
    assert [p.name for p in old.iterdir()] == ["new.py"]
    again = tmp_path / "first"
    again.mkdir()
    deps._swap(again, tmp_path / "made")
    assert (tmp_path / "made").is_dir() and not again.exists()


def test_everything_is_made_readable_and_nothing_writable(tmp_path: Path) -> None:
    root = tmp_path / "pkgs"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text("")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_text("")
    (root / "pkg" / "link").symlink_to("/nonexistent")
    (root / "bin" / "tool").chmod(0o700)
    (root / "pkg" / "mod.py").chmod(0o600)
    for directory in (root / "pkg" / "sub", root / "pkg", root / "bin", root):
        directory.chmod(0o700)
    deps.make_readable(root)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.lstat().st_mode)
             for p in [root, *root.rglob("*")] if not p.is_symlink()}
    assert modes == {"pkgs": 0o755, "pkgs/pkg": 0o755, "pkgs/bin": 0o755, "pkgs/pkg/sub": 0o755,
                     "pkgs/pkg/mod.py": 0o644, "pkgs/bin/tool": 0o755}


# ---- code the workers cannot read (supervisor/control/sandbox.py) -----------------------------


def owned_by(uid: int, gid: int) -> Any:
    """os.stat, as if every file were owned by ``uid``:``gid``."""
    def stat_fn(path: str) -> os.stat_result:
        real = os.stat(path)
        return os.stat_result((real.st_mode, real.st_ino, real.st_dev, real.st_nlink, uid, gid, *real[6:10]))
    return stat_fn


def test_unreadable_code_follows_owner_group_and_other_bits(tmp_path: Path) -> None:
    code = tmp_path / "code"
    (code / "closed").mkdir(parents=True)
    (code / "closed" / "inside.py").write_text("")
    for name, mode in (("open.py", 0o644), ("secret.py", 0o600), ("group.py", 0o640), ("owner_only.py", 0o044)):
        (code / name).write_text("")
        (code / name).chmod(mode)
    (code / "closed").chmod(0o700)
    (code / "dangling").symlink_to("/nonexistent")
    stranger = owned_by(0, 0)
    assert unreadable_code(str(code), NOBODY, stat_fn=stranger) == [
        str(code / "group.py"), str(code / "secret.py"), str(code / "closed")]
    # The owner's bits alone apply to the owner, the group's to the group.
    assert unreadable_code(str(code), NOBODY, stat_fn=owned_by(65534, 0)) == [str(code / "owner_only.py")]
    assert unreadable_code(str(code), NOBODY, stat_fn=owned_by(0, 65534)) == [
        str(code / "secret.py"), str(code / "closed")]
    assert unreadable_code(str(code), Identity(0, 0, "root"), stat_fn=stranger) == []
    # The run directory, when it is in the code dir, is the supervisor's.
    assert str(code / "closed") not in unreadable_code(str(code), NOBODY, skip=[str(code / "closed")],
                                                       stat_fn=stranger)
    code.chmod(0o711)
    assert unreadable_code(str(code), NOBODY, stat_fn=stranger) == [str(code)]


def test_code_problems_say_who_the_workers_run_as(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the files must be someone else's than nobody's: root makes them")
    config = parsed(tmp_path, {"f": {}, "g": {"code_dir": "open"}, "as_root": {"code_dir": "closed"}})
    (tmp_path / "fn" / "app.py").write_text("")
    (tmp_path / "fn" / "app.py").chmod(0o600)
    (tmp_path / "fn" / "lib.py").write_text("")
    (tmp_path / "fn" / "lib.py").chmod(0o600)
    (tmp_path / "closed").chmod(0o700)

    def sandbox(name: str, who: Identity | None) -> Sandbox:
        return Sandbox(name, who, None, 0, {}, {})

    sandboxes = {"f": sandbox("f", NOBODY), "g": sandbox("g", NOBODY), "as_root": sandbox("as_root", None)}
    [problem] = code_problems(config, sandboxes)
    assert problem.path == "functions.f.code_dir"
    assert problem.message == (f"workers run as uid 65534 (nobody): make {tmp_path / 'fn' / 'app.py'} (and 1 more) "
                               f"readable by them (chmod -R a+rX {tmp_path / 'fn'})")
