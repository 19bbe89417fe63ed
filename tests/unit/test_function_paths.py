"""worker/python/paths.py: the order of a Python function's sys.path (no processes;
tests/e2e/test_function_packages.py shows it in real workers and seeds)."""

from __future__ import annotations

import os
import site

from hypothesis import given
from hypothesis import strategies as st

from worker.python import paths

CODE = "/srv/code"


def test_the_functions_directories_then_the_standard_library() -> None:
    found = paths.function_path({"code_dir": CODE}, {"PYTHONPATH": "lib:/opt/shared::vendor/../more"})
    std = paths.standard_library()
    assert found == [CODE, f"{CODE}/.python_packages", f"{CODE}/lib", "/opt/shared", f"{CODE}/more", *std]
    assert paths.function_path({"code_dir": CODE, "python_packages": "deps"}, {})[:2] == [CODE, f"{CODE}/deps"]
    assert paths.function_path({"code_dir": CODE, "python_packages": "/abs/deps"}, {})[:2] == [CODE, "/abs/deps"]
    assert paths.function_path({"code_dir": CODE, "python_packages": ""}, {})[1] == f"{CODE}/.python_packages"


def test_the_standard_library_is_the_interpreters_without_site_packages() -> None:
    std = paths.standard_library()
    assert any(os.path.isfile(os.path.join(entry, "os.py")) for entry in std)
    site_dirs = {*site.getsitepackages(), site.getusersitepackages()}
    assert not [entry for entry in std if entry in site_dirs or "site-packages" in entry]


@given(st.lists(st.sampled_from(["", "a", "/b", "a/../c", CODE, "/srv/code/"]), max_size=6))
def test_each_directory_once_in_its_first_place(entries: list[str]) -> None:
    found = paths.function_path({"code_dir": CODE}, {"PYTHONPATH": os.pathsep.join(entries)} if entries else {})
    assert len(found) == len(set(found))
    assert found[0] == CODE and found[1] == f"{CODE}/.python_packages"
    std = paths.standard_library()
    assert found[-len(std):] == std
