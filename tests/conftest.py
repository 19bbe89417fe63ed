"""Where tests keep their files, so that sandboxed workers can share them.

Run as root, the supervisor runs workers as ``nobody`` (or a uid of their
own) with a private ``/tmp``: a file a test leaves in pytest's default
``/tmp/pytest-of-root/...`` (0700 directories) is invisible to them, and a
marker a worker writes there never reaches the test. So the per-run
temporary root is made outside ``/tmp`` (in ``/var/tmp``), and each test's
``tmp_path`` is opened to every user: tests exchange files with workers
there (hook markers, gates, code dirs written on the fly); a directory a
test makes inside it for workers to write into needs ``chmod(0o1777)``
too. Not root: the workers are the test's own user and pytest's defaults
are left alone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_PARENT = "/var/tmp"


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0 or config.option.basetemp or not os.path.isdir(SHARED_PARENT):
        return
    base = tempfile.mkdtemp(prefix="ca-supervisor-tests-", dir=SHARED_PARENT)
    config.option.basetemp = base
    if not os.environ.get("CA_KEEP_TEST_TMP"):  # set it to look at a failed run's logs
        config.add_cleanup(lambda: shutil.rmtree(base, ignore_errors=True))


def open_to_workers(path: Path, base: Path) -> None:
    """``path`` writable by every user (sticky, like /tmp), its parents up to ``base`` traversable."""
    path.chmod(0o1777)
    for directory in path.parents:
        if directory == base or not directory.is_relative_to(base):
            break
        directory.chmod(0o755)


@pytest.fixture(scope="session", autouse=True)
def _temporary_dirs_open_to_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every ``tmp_path`` and ``tmp_path_factory.mktemp`` dir (pytest makes them 0700)."""
    if os.geteuid() == 0 and tmp_path_factory.getbasetemp().is_relative_to(SHARED_PARENT):
        base = tmp_path_factory.getbasetemp()
        base.chmod(0o755)  # pytest (re)makes it 0700
        original = tmp_path_factory.mktemp

        def mktemp(basename: str, numbered: bool = True) -> Path:
            path = original(basename, numbered)
            open_to_workers(path, base)
            return path

        tmp_path_factory.mktemp = mktemp  # type: ignore[method-assign]
    yield
