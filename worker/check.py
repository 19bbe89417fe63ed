"""The handler check: imports a Python function's handler and hooks exactly as its workers do.

``supervisor.config.check_handlers`` runs it at ``validate``, ``run`` and
``reload``, in a throwaway process started like a worker
(``python -S -P worker/boot.py worker.check MARKER JOB``), so a handler
that imports in the check imports in the workers, and the reverse.

``JOB`` is a JSON object: ``specs`` (``[[key, "module:attr"], ...]``),
``code_dir``, ``python_packages``, ``event_loop`` and ``plan`` (the
function's isolation, or ``{}``).

Rules:
- Importing is running user code: the process is isolated as the
  function's workers are (``plan``) before anything of the function is
  imported, with ``sys.path`` a worker's (``worker.python.paths``).
- What the function's modules print while imported goes to stderr; the
  verdict goes to the real stdout as one line, ``MARKER`` + a JSON object
  ``{key: problem}`` (empty when everything resolves).
- ``event_loop = "uvloop"``: ``uvloop`` must import from the function's own
  directories and have ``new_event_loop``; otherwise the problem is reported
  under the key ``event_loop``.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any


def check(job: dict[str, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    if job.get("event_loop") == "uvloop":
        try:
            uvloop = importlib.import_module("uvloop")
        except BaseException as exc:
            found["event_loop"] = (f"event_loop = \"uvloop\" needs uvloop in the function's own directories "
                                   f"(add it to requirements.txt and run `supervisor deps`); importing it failed: "
                                   f"{type(exc).__name__}: {exc}")
        else:
            if not callable(getattr(uvloop, "new_event_loop", None)):
                found["event_loop"] = (f"event_loop = \"uvloop\": the uvloop the function ships "
                                       f"({getattr(uvloop, '__file__', '?')}) has no new_event_loop")
    for key, spec in job["specs"]:
        module_name, _, attrs = spec.partition(":")
        try:
            target = importlib.import_module(module_name)
            for i, attr in enumerate(attrs.split(".")):
                if not hasattr(target, attr):
                    owner = module_name if i == 0 else ".".join(attrs.split(".")[:i])
                    raise LookupError(f"{'module' if i == 0 else 'object'} {owner!r} has no attribute {attr!r}")
                target = getattr(target, attr)
            if not callable(target):
                found[key] = f"{spec!r} is not callable (it is {type(target).__name__!r})"
        except LookupError as exc:
            found[key] = f"cannot import {spec!r}: {exc}"
        except BaseException as exc:  # whatever the module raises (SystemExit too) is its problem
            found[key] = f"cannot import {spec!r}: {type(exc).__name__}: {exc}"
    return found


def main() -> None:
    marker, job = sys.argv[1], json.loads(sys.argv[2])
    if job.get("plan"):  # importing is running user code: isolated as the function's workers are
        from worker import isolation

        isolation.apply(job["plan"])
    from worker.python import paths

    paths.enter(job)
    out, sys.stdout = sys.stdout, sys.stderr
    found = check(job)
    out.write("\n" + marker + json.dumps(found) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
