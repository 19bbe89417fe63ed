"""How a Python function's processes start: the standard library and the worker's own code, nothing else.

The control plane starts a Python function's worker, its seed and the
handler check as ``python -S -P <installed>/worker/boot.py MODULE``
(``supervisor.control.launcher.python_argv``), MODULE one of
``worker.main``, ``worker.seed``, ``worker.check``:

- ``-S``: the ``site`` module does not run, so no site-packages directory
  (the supervisor's, the system's, the user's) is on ``sys.path``, no
  ``.pth`` file runs and no ``sitecustomize``: ``sys.path`` is the
  environment's ``PYTHONPATH`` and the standard library;
- ``-P``: nothing is put in front of it (not this script's directory).

This script records the standard library's entries, then imports the
packages ``worker`` and ``calink`` from the directory they are installed in
without putting that directory on ``sys.path`` (in an installed wheel it is
site-packages, with every dependency of the supervisor): their submodules
resolve through the packages' ``__path__``. It restores the builtins the
``site`` module would have added (``exit``, ``quit``, ``help``,
``copyright``, ``credits``, ``license``), and runs MODULE's ``main()``.
``worker.python.paths.enter`` later makes ``sys.path`` the function's
(its own directories first) before its first module is imported.

Custom, lambda and scf runtimes are not started this way: no user Python
runs in their interpreter, which imports the supervisor's packages
(aiohttp, uvloop...) as an ordinary ``python -m worker.main``.
"""

import os
import sys

_pythonpath = os.environ.get("PYTHONPATH", "")
# The interpreter put PYTHONPATH's entries first (one per item, empty ones too), then the standard library.
_standard_library = sys.path[len(_pythonpath.split(os.pathsep)) if _pythonpath else 0:]

import importlib  # noqa: E402  # after the line above: nothing may touch sys.path before it
import importlib.machinery  # noqa: E402
import importlib.util  # noqa: E402
import site  # noqa: E402  # with -S, importing it runs nothing; its helpers restore the builtins

PACKAGES = ("worker", "calink")
MODULES = ("worker.main", "worker.seed", "worker.check")


def _import_package(name: str, directory: str) -> None:
    spec = importlib.machinery.PathFinder.find_spec(name, [directory])
    if spec is None or spec.loader is None:
        raise ImportError(f"the package {name!r} is not installed in {directory}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def main() -> None:
    if sys.argv[1:2] == [] or sys.argv[1] not in MODULES:
        sys.exit(f"usage: python -S -P {__file__} {{{','.join(MODULES)}}}")
    module_name = sys.argv[1]
    del sys.argv[1]  # the module sees the arguments meant for it, and its own path first, as with -m
    installed = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in PACKAGES:
        _import_package(name, installed)
    from worker.python import paths

    paths.STANDARD_LIBRARY[:] = _standard_library
    site.setquit()
    site.setcopyright()
    site.sethelper()
    spec = importlib.util.find_spec(module_name)
    sys.argv[0] = spec.origin if spec is not None and spec.origin else module_name  # as -m sets it
    importlib.import_module(module_name).main()


if __name__ == "__main__":
    main()
