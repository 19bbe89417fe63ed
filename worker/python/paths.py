"""``sys.path`` of a Python function's processes: its own directories, then the standard library.

The contract (for a Python function's workers, its seed and the handler
check at start and reload, which imports the handler exactly as a worker
does):

1. ``code_dir``;
2. the function's ``python_packages`` directory (where ``supervisor deps``
   installs its ``requirements.txt``; default ``.python_packages`` in
   ``code_dir``), whether or not it exists yet;
3. the entries of ``PYTHONPATH`` in the function's environment (relative
   ones are relative to ``code_dir``);
4. the standard library.

Nothing else: not the supervisor's site-packages (nor the system's or the
user's), so a function never sees the supervisor's packages, and no ``.pth``
file runs. The worker's own packages (``worker``, ``calink``) are imported
by ``worker/boot.py`` from where they are installed, without their
directory on ``sys.path``: their submodules resolve through the packages'
``__path__``. A function therefore cannot have top-level modules named
``worker`` or ``calink`` of its own; any other name is the function's.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from typing import Any

DEFAULT_PACKAGES = ".python_packages"

# The standard library's entries of sys.path, as the interpreter set them up;
# worker/boot.py records them before anything changes sys.path.
STANDARD_LIBRARY: list[str] = []


def standard_library() -> list[str]:
    """The interpreter's standard library directories (and zip)."""
    if STANDARD_LIBRARY:
        return list(STANDARD_LIBRARY)
    # Not started through worker/boot.py (a test importing the worker): where os.py is, as CPython lays it out.
    stdlib = os.path.dirname(os.__file__)
    zipped = os.path.join(sys.base_prefix, "lib", f"python{sys.version_info[0]}{sys.version_info[1]}.zip")
    return [zipped, stdlib, os.path.join(stdlib, "lib-dynload")]


def packages_dir(spec: Mapping[str, Any]) -> str:
    """The function's python_packages directory (absolute)."""
    return os.path.join(str(spec["code_dir"]), str(spec.get("python_packages") or DEFAULT_PACKAGES))


def function_path(spec: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    """``sys.path`` for the function of ``spec`` (see the module docstring)."""
    code_dir = str(spec["code_dir"])
    entries = [code_dir, packages_dir(spec)]
    pythonpath = environ.get("PYTHONPATH", "")
    if pythonpath:
        entries += [os.path.join(code_dir, entry) for entry in pythonpath.split(os.pathsep)]
    return list(dict.fromkeys([os.path.normpath(entry) for entry in entries] + standard_library()))


def enter(spec: Mapping[str, Any]) -> None:
    """Makes ``sys.path`` the function's (before its first module is imported); a worker
    forked by its seed has it already."""
    wanted = function_path(spec, os.environ)
    if sys.path != wanted:
        sys.path[:] = wanted
        importlib.invalidate_caches()
