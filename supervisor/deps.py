"""``supervisor deps``: each Python function's ``requirements.txt``, installed into a directory of its own.

The contract is docs/cli.md ("supervisor deps") and docs/configuration.md
(``python_packages``). The rules:

* What: every Python function whose ``code_dir`` holds ``requirements.txt``
  (or the one ``--function`` names). Its requirements are installed by
  ``python -m pip install --target DIR --requirement requirements.txt``, run
  by the interpreter the workers run (``sys.executable``: the supervisor's
  own, so that compiled packages and bytecode fit them), in ``code_dir`` (a
  relative path in the file means what it means there), with the machine's
  pip configuration as it is (its files and ``PIP_*`` variables: the index,
  certificates, proxies, timeouts). pip's output goes to stderr as it
  comes, so its error is there when it fails; stdout gets one result line
  per install.
* Where: ``DIR`` is the function's ``python_packages`` directory (default
  ``.python_packages`` in ``code_dir``), which ``worker/python/paths.py``
  puts right after ``code_dir`` on the function's ``sys.path``. Functions
  whose directory is the same (the same ``code_dir``, the same key) share
  one install, and the output says so; two different ``requirements.txt``
  for one directory are refused.
* Never half-installed: pip installs into a new directory beside ``DIR``;
  there the bytecode is compiled (``compileall``, naming the files by their
  final paths), everything made readable by every user, so by the workers'
  (directories ``a+rx``, files ``a+r``, executables ``a+x``; no write bit is
  added), and the stamp written; only then is it swapped in by two renames
  (the old one aside, the new one in) and the old one removed. A failed
  install removes the new directory and leaves the old one as it was. A
  ``DIR`` that exists, is not empty and has no stamp was not made here: it
  is refused, never replaced.
* The stamp, ``DIR/.supervisor-deps.json``: the SHA-256 of
  ``requirements.txt``'s bytes and the interpreter it was installed for
  (implementation, version, machine: ``cpython-3.11-x86_64``).
  ``requirements_problems`` compares it with the file and with the
  interpreter of the process that checks (the workers' one), for
  ``validate``, ``run`` and ``reload``: not installed, changed since it was
  installed, installed for another Python; each problem names the key, the
  file and the command to run. Only ``requirements.txt``'s own bytes count:
  a file it names with ``-r`` or ``-c`` is not followed.
* Every install has a deadline (``--timeout``, default 30 minutes): past
  it, pip's whole process group is killed and that install has failed.
* Exit codes (``supervisor.cli``): 0 when every install was done (or there
  was nothing to install), 1 when one failed (the others are still done),
  2 when the config is invalid or ``--function`` names no Python function.
"""

from __future__ import annotations

import compileall
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from supervisor.config import Config, FunctionConfig, Problem

REQUIREMENTS = "requirements.txt"
STAMP = ".supervisor-deps.json"
DEFAULT_TIMEOUT_S = 1800.0
MAX_STAMP = 64 * 1024  # bytes of a stamp worth reading (ours are a few hundred)

Verdict = Literal["none", "installed", "not-installed", "changed", "other-python"]


def interpreter_tag() -> str:
    """What installed packages and their bytecode fit: ``cpython-3.11-x86_64``."""
    version = sys.version_info
    return f"{sys.implementation.name}-{version[0]}.{version[1]}-{platform.machine() or 'unknown'}"


def requirements_digest(requirements: bytes) -> str:
    return hashlib.sha256(requirements).hexdigest()


def stamp_bytes(requirements: bytes, interpreter: str, installed: Iterable[tuple[str, str]] = ()) -> bytes:
    """The stamp of an install of ``requirements`` for ``interpreter`` (``installed``:
    (name, version) of each distribution, for people reading it)."""
    return (json.dumps({"requirements_sha256": requirements_digest(requirements), "interpreter": interpreter,
                        "python": platform.python_version(), "installed": dict(installed)}, indent=1) + "\n").encode()


def read_stamp(data: bytes) -> tuple[str, str] | None:
    """(requirements_sha256, interpreter) of a stamp; None when it is not one."""
    try:
        found = json.loads(data)
    except ValueError:
        return None
    if not isinstance(found, dict):
        return None
    digest, interpreter = found.get("requirements_sha256"), found.get("interpreter")
    if not isinstance(digest, str) or not isinstance(interpreter, str):
        return None
    return digest, interpreter


def verdict(requirements: bytes | None, stamp: bytes | None, interpreter: str) -> Verdict:
    """Whether an install stands for ``requirements`` (None: there is no requirements.txt)
    given its stamp (None: none) and the interpreter of the workers."""
    if requirements is None:
        return "none"
    found = read_stamp(stamp) if stamp is not None else None
    if found is None:
        return "not-installed"
    if found[0] != requirements_digest(requirements):
        return "changed"
    if found[1] != interpreter:
        return "other-python"
    return "installed"


def stamp_interpreter(stamp: bytes | None) -> str:
    found = read_stamp(stamp) if stamp is not None else None
    return found[1] if found is not None else "?"


# --- planning -------------------------------------------------------------------------


def packages_dir(function: FunctionConfig) -> Path:
    """The function's python_packages directory (absolute: code_dir is)."""
    return function.code_dir / function.python_packages


@dataclass(frozen=True, slots=True)
class Install:
    """One pip install: ``requirements`` into ``directory``, for ``functions``."""

    directory: Path
    requirements: Path
    code_dir: Path
    functions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    installs: list[Install]
    without: list[str]  # python functions with no requirements.txt
    problems: list[Problem]  # directories two requirements.txt would share


def plan(functions: Iterable[FunctionConfig], has_requirements: Callable[[Path], bool]) -> Plan:
    """The installs for ``functions`` (non-python ones are not concerned), one per
    python_packages directory, in the order the functions come."""
    groups: dict[Path, Install] = {}
    without: list[str] = []
    problems: list[Problem] = []
    for function in functions:
        if function.runtime != "python":
            continue
        requirements = function.code_dir / REQUIREMENTS
        if not has_requirements(requirements):
            without.append(function.name)
            continue
        directory = packages_dir(function)
        known = groups.get(directory)
        if known is None:
            groups[directory] = Install(directory, requirements, function.code_dir, (function.name,))
        elif known.requirements == requirements:
            groups[directory] = Install(directory, requirements, known.code_dir, (*known.functions, function.name))
        else:
            problems.append(Problem(f"functions.{function.name}.python_packages",
                                    f"{directory} is also the python_packages of function {known.functions[0]}, "
                                    f"for another requirements.txt ({known.requirements}): give each its own"))
    return Plan(list(groups.values()), without, problems)


def deps_command(config: Config) -> str:
    """The command that installs ``config``'s requirements, as a user would type it."""
    return "supervisor deps" + (f" --config {shlex.quote(str(config.path))}" if config.path is not None else "")


def _read(path: Path, limit: int | None = None) -> bytes | None:
    """A file's bytes; None when it does not exist (other errors are raised)."""
    try:
        with path.open("rb") as file:
            return file.read() if limit is None else file.read(limit)
    except (FileNotFoundError, NotADirectoryError):
        return None


def requirements_problems(config: Config, interpreter: str | None = None) -> list[Problem]:
    """A problem for each Python function whose requirements.txt is not installed as it is
    for ``interpreter`` (default: this process's, the one workers run)."""
    interpreter = interpreter or interpreter_tag()
    command = deps_command(config)
    found = plan(config.functions.values(), lambda path: path.is_file())
    problems = list(found.problems)
    for install in found.installs:
        key = f"functions.{install.functions[0]}.python_packages"
        try:
            requirements = _read(install.requirements)
            stamp = _read(install.directory / STAMP, MAX_STAMP)
        except OSError as exc:
            problems.append(Problem(key, f"cannot read {exc.filename}: {exc.strerror or exc}"))
            continue
        shown = verdict(requirements, stamp, interpreter)
        message = {
            "not-installed": f"{install.requirements} is not installed in {install.directory}: run `{command}`",
            "changed": f"{install.requirements} changed since it was installed in {install.directory}: run "
                       f"`{command}`",
            "other-python": f"{install.directory} was installed for {stamp_interpreter(stamp)}, but workers run "
                            f"{interpreter} ({sys.executable}): run `{command}`",
        }.get(shown)
        if message is not None:
            problems += [Problem(f"functions.{name}.python_packages", message) for name in install.functions]
    return problems


# --- installing -----------------------------------------------------------------------


class InstallFailed(Exception):
    """Why an install did not happen (the message is for the user)."""


def make_readable(root: Path) -> None:
    """Every directory under ``root`` (and itself) a+rx, every file a+r, executables a+x;
    symbolic links are left alone. Nothing is made writable."""
    def opened(path: str, directory: bool) -> None:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            return
        wanted = mode | 0o444 | (0o111 if directory or mode & 0o111 else 0)
        if wanted != mode:
            os.chmod(path, stat.S_IMODE(wanted))

    opened(str(root), True)
    for top, dirs, files in os.walk(root):
        for name in dirs:
            opened(os.path.join(top, name), True)
        for name in files:
            opened(os.path.join(top, name), False)


def installed_distributions(directory: Path) -> list[tuple[str, str]]:
    """(name, version) of each distribution in ``directory``, sorted by name."""
    found = {(dist.metadata["Name"] or "?", dist.version or "?")
             for dist in importlib.metadata.distributions(path=[str(directory)])}
    return sorted(found, key=lambda item: item[0].lower())


def pip_argv(python: str, target: Path, requirements: Path) -> list[str]:
    return [python, "-m", "pip", "install", "--target", str(target), "--requirement", str(requirements),
            "--no-compile", "--no-input", "--disable-pip-version-check"]


def _owned(directory: Path) -> None:
    """Raises InstallFailed unless ``directory`` is missing, empty, or was made by deps."""
    try:
        mode = os.lstat(directory).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        raise InstallFailed(f"{directory} exists and is not a directory: deps installs into a directory of its own "
                            f"there; remove it, or set python_packages to another path")
    if (directory / STAMP).is_file() or not any(directory.iterdir()):
        return
    raise InstallFailed(f"{directory} exists and was not made by `supervisor deps` (no {STAMP} in it): deps replaces "
                        f"that directory whole, so it leaves it alone; remove it (list its packages in "
                        f"requirements.txt instead), or set python_packages to another path")


def _make_parents(directory: Path) -> None:
    """The directories above ``directory`` inside code_dir, made readable by everyone."""
    missing = [parent for parent in directory.parents if not parent.exists()]
    for parent in reversed(missing):
        parent.mkdir()
        make_readable(parent)


def _run_pip(argv: list[str], cwd: Path, output: IO[str], timeout_s: float) -> int:
    """pip's exit code; its output (stdout and stderr) goes to ``output`` as it comes."""
    output.flush()
    process = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                               start_new_session=True)  # its group: a deadline kills whatever it started
    try:
        return process.wait(timeout=timeout_s)
    except BaseException as exc:  # the deadline, or ^C
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise InstallFailed(f"pip did not finish within {timeout_s:g}s (--timeout); it was killed") from None
        raise


def install(job: Install, output: IO[str], timeout_s: float = DEFAULT_TIMEOUT_S,
            python: str = sys.executable) -> list[tuple[str, str]]:
    """Installs ``job``; returns what is now installed. Raises InstallFailed (the old
    directory is then as it was) with what went wrong; pip's own output went to ``output``."""
    try:
        requirements = job.requirements.read_bytes()
    except OSError as exc:
        raise InstallFailed(f"cannot read {job.requirements}: {exc.strerror or exc}") from None
    _owned(job.directory)
    try:
        _make_parents(job.directory)
        new = Path(tempfile.mkdtemp(prefix=f".{job.directory.name}.new-", dir=job.directory.parent))
    except OSError as exc:
        raise InstallFailed(f"cannot write beside {job.directory}: {exc.strerror or exc} (deps runs where the code "
                            f"is built, before it is made read-only)") from None
    try:
        code = _run_pip(pip_argv(python, new, job.requirements), job.code_dir, output, timeout_s)
        if code != 0:
            raise InstallFailed(f"pip failed (exit code {code}; its output is above)")
        with contextlib.redirect_stdout(output):  # the files that do not compile, if any
            compiled = compileall.compile_dir(new, ddir=str(job.directory), quiet=1)
        if not compiled:
            print("  (some files did not compile, as listed above: importing them would fail too)", file=output)
        installed = installed_distributions(new)
        (new / STAMP).write_bytes(stamp_bytes(requirements, interpreter_tag(), installed))
        make_readable(new)
        _swap(new, job.directory)
    except OSError as exc:
        raise InstallFailed(f"{exc.filename or job.directory}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(new, ignore_errors=True)  # gone already when it was swapped in
    return installed


def _swap(new: Path, directory: Path) -> None:
    """``new`` becomes ``directory``; the old one, if any, is removed."""
    if not os.path.lexists(directory):
        os.rename(new, directory)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
    os.rename(directory, old / directory.name)
    try:
        os.rename(new, directory)
    except OSError:
        os.rename(old / directory.name, directory)
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)


def describe(job: Install, installed: list[tuple[str, str]]) -> str:
    """The result line of a done install."""
    names = ", ".join(job.functions)
    packages = ", ".join(f"{name} {version}" for name, version in installed) or "nothing"
    shared = (f" (shared by functions {names}: the same python_packages directory)" if len(job.functions) > 1
              else "")
    return f"{names}: installed {job.requirements.name} into {job.directory}: {packages}{shared}"
