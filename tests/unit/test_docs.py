"""docs/ stays honest where a machine can tell: the contract it documents is the code's.

Every list below is derived from the code, never copied by hand:

* every key of the config models (``supervisor.config``) has a row in its
  table of docs/configuration.md, and the default that row writes, read as
  TOML and validated by the model, is the model's own default; a row names
  no key the models lack;
* every series a registry gets from ``supervisor.metrics`` (the planes'
  metrics and the collectors read at scrape time) has a row in
  docs/metrics.md with its exposed name, type and labels, and every outcome,
  exit reason and worker state is named there; a row names no other series;
* every status and ``errorType`` the data plane answers with (each
  ``InvocationError(status, "Type", ...)`` built in ``supervisor/data``, and
  the HTTP server's own refusals, ``ERROR_TYPES``), and every error type a
  worker or the control plane reports, is in docs/http-contract.md;
* every ``supervisor`` subcommand has its section in docs/cli.md naming
  each of its flags, and every exit code of ``supervisor.cli`` is in its
  table; a section names no command the parser lacks;
* every event of docs/logging.md's "Events to watch" is a text the code logs;
* no file of the repository points outside it (the design notes it was
  written from are not part of a clone), and every relative link in its
  Markdown files resolves, anchors included; every page of docs/ is linked
  from docs/README.md.

Some contract lands in the same issue as these docs; ``PENDING`` names what
docs/ describes ahead of its code (a key or command that the code does not
have yet may be documented; once the code has it, every check above holds
for it), and ``PENDING_PAGES`` a page linked before it is written (a link
to it may dangle only while it does not exist). Remove a name from them
when its code or page has landed.
"""

from __future__ import annotations

import ast
import re
import subprocess
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel

from supervisor import cli, config, metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

# Documented ahead of their code (issue 12): config keys and CLI commands, and pages of
# docs/ linked before they are written.
PENDING: set[str] = set()
PENDING_PAGES: set[Path] = set()


# --- reading Markdown -------------------------------------------------------------------


def read(name: str) -> str:
    return (DOCS / name).read_text()


def without_code(text: str) -> str:
    """The text with fenced code blocks blanked (line numbers kept)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def headings(text: str) -> Iterator[tuple[int, str, int]]:
    """(level, title, line index) of every heading outside code blocks."""
    for index, line in enumerate(without_code(text).splitlines()):
        match = re.match(r"(#{1,6}) +(.+?) *#*$", line)
        if match:
            yield len(match.group(1)), match.group(2), index


def section(text: str, title: str) -> str:
    """The lines under the heading ``title`` up to the next heading of its level or above."""
    lines = text.splitlines()
    found = [(level, index) for level, name, index in headings(text) if name == title]
    assert found, f"no heading {title!r}"
    level, start = found[0]
    end = next((index for lvl, _, index in headings(text) if index > start and lvl <= level), len(lines))
    return "\n".join(lines[start + 1:end])


def rows(text: str) -> dict[str, list[str]]:
    """Table rows whose first cell is one backticked name: name -> the row's cells."""
    found: dict[str, list[str]] = {}
    for line in without_code(text).splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        match = re.fullmatch(r"`([^`]+)`", cells[0]) if cells else None
        if match:
            found[match.group(1)] = cells
    return found


def slug(title: str) -> str:
    """GitHub's anchor for a heading."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).lower()
    return "".join(ch for ch in title if ch.isalnum() or ch in " -_").replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: Counter[str] = Counter()
    out = set()
    for _, title, _ in headings(text):
        base = slug(title)
        out.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return out


# --- the configuration ----------------------------------------------------------------------

TABLES = [(config.SupervisorSettings, "`[supervisor]`"), (config.FunctionConfig, "`[functions.NAME]`"),
          (config.Limits, "`[functions.NAME.limits]`")]


def validated(model: type[BaseModel], tmp_path: Path, **keys: Any) -> BaseModel:
    """``model`` from a table holding ``keys`` (plus what it requires), as read from a file."""
    table: dict[str, Any] = dict(keys)
    if model is config.FunctionConfig:
        table = {"name": "f", "code_dir": str(tmp_path), **table}
    return model.model_validate(table, context={"base_dir": tmp_path, "from_file": True})


@pytest.mark.parametrize(("model", "title"), TABLES, ids=[title for _, title in TABLES])
def test_every_config_key_has_a_row_with_the_models_default(model: type[BaseModel], title: str,
                                                             tmp_path: Path) -> None:
    table = rows(section(read("configuration.md"), title))
    keys = [key for key in model.model_fields if key != "name"]  # a function's name is its table's
    assert not [key for key in keys if key not in table], f"keys of {model.__name__} missing under {title}"
    assert not [key for key in table if key not in keys and key not in PENDING], f"rows for unknown keys under {title}"
    default_of = validated(model, tmp_path) if model is not config.FunctionConfig else None
    for key in keys:
        field = model.model_fields[key]
        cell = table[key][2]
        literal = re.fullmatch(r"`(.+)`", cell)
        if field.is_required():
            assert cell == "required", (key, cell)
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            continue  # a table of its own (limits), documented by its own section
        if default is None:
            assert literal is None, f"{key}: the code has no default, the docs say {cell}"
            continue
        assert literal is not None, f"{key}: the default {default!r} is not written as TOML in the docs ({cell!r})"
        written = tomllib.loads(f"value = {literal.group(1)}")["value"]
        from_docs = getattr(validated(model, tmp_path, **{key: written}), key)
        expected = getattr(default_of or validated(model, tmp_path), key)
        assert from_docs == expected, f"{key}: the docs' default {cell} is {from_docs!r}, the code's {expected!r}"


def test_the_environment_the_config_reads_is_documented() -> None:
    text = read("configuration.md")
    variables = [*config._PORT_ENV, config.METRICS_PORT_ENV, "SUPERVISOR_RUN_DIR", "SUPERVISOR_CONFIG"]
    assert not [name for name in variables if f"`{name}`" not in text]


# --- metrics ----------------------------------------------------------------------------------


def registered_series() -> dict[str, tuple[str, set[str]]]:
    """Every exposed series name -> (type, label names), from registries the code fills."""
    registry = CollectorRegistry()
    owned = [metrics.DataPlaneMetrics(registry), metrics.ControlPlaneMetrics(registry)]
    for owner in owned:  # a labelled series shows its labels once it has a child
        for value in vars(owner).values():
            if isinstance(value, MetricWrapperBase):
                value.labels(*["x"] * len(value._labelnames))
    counts = Counter({"x": 1})
    server = SimpleNamespace(name="ca", stats=SimpleNamespace(refused=counts, shed=counts, timed_out=counts),
                             state=SimpleNamespace(connections=[]))
    registry.register(metrics.ClientCollector([server]))
    registry.register(metrics.LiveCollector(lambda: True, lambda: [("f", {}, 0, 0, 0)], lambda: {"data-plane": 0}))
    series = {}
    for family in registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = {label for sample in family.samples for label in sample.labels if label != "le"}
        series[name] = (family.type, labels)
    return series


def test_every_series_has_a_row_with_its_type_and_labels() -> None:
    series = registered_series()
    table = {name: cells for name, cells in rows(read("metrics.md")).items() if name.startswith("supervisor_")}
    assert series, "no series registered"
    assert not sorted(set(series) - set(table)), "series missing from docs/metrics.md"
    assert not sorted(set(table) - set(series)), "docs/metrics.md lists series the code does not register"
    for name, (kind, labels) in series.items():
        row = table[name]
        assert row[1] == kind, f"{name} is a {kind}, the docs say {row[1]}"
        documented = set(re.findall(r"`([a-z_]+)`", row[2]))
        assert documented == labels, f"{name}'s labels are {sorted(labels)}, the docs say {sorted(documented)}"


def test_every_label_value_the_code_fixes_is_documented() -> None:
    text = read("metrics.md")
    values = {*metrics.OUTCOMES, *metrics.EXIT_REASONS, *metrics.WORKER_STATES}
    assert not sorted(value for value in values if f"`{value}`" not in text)


# --- the HTTP contract ------------------------------------------------------------------------


def python_files(*parts: str) -> list[Path]:
    return sorted(path for part in parts if (ROOT / part).exists() for path in (ROOT / part).rglob("*.py"))


def status_and_type(*nodes: ast.expr | None) -> list[tuple[int, str]]:
    """[(status, errorType)] when ``nodes`` are an integer and a string literal, else []."""
    values = [node.value for node in nodes if isinstance(node, ast.Constant)]
    if len(values) == 2 and isinstance(values[0], int) and isinstance(values[1], str):
        return [(values[0], values[1])]
    return []


def data_plane_answers() -> tuple[set[tuple[int, str]], set[str]]:
    """(status, errorType) pairs the data plane and its HTTP server answer with, and every
    error type named in their code (``...Error`` constants)."""
    pairs: set[tuple[int, str]] = set()
    names: set[str] = set()
    for path in python_files("supervisor/data", "cahttp"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "InvocationError":
                pairs.update(status_and_type(*node.args[:2]))
            elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                  and any(getattr(target, "id", None) == "ERROR_TYPES" for target in node.targets)):
                for status, error_type in zip(node.value.keys, node.value.values):
                    pairs.update(status_and_type(status, error_type))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(
                    r"[A-Z][A-Za-z]*Error", node.value):
                names.add(node.value)
    return pairs, names


def reported_error_types() -> set[str]:
    """Error types workers report (``...Error`` constants in worker/) and the control
    plane gives a failure to initialize (``error_type=`` constants)."""
    names = set()
    for path in python_files("worker"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(
                    r"[A-Z][A-Za-z]*Error", node.value):
                names.add(node.value)
    for path in python_files("supervisor/control"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.keyword) and node.arg == "error_type" and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str)):
                names.add(node.value.value)
    return names


def test_every_status_and_error_type_the_data_plane_answers_is_documented() -> None:
    text = without_code(read("http-contract.md"))
    pairs, names = data_plane_answers()
    assert len(pairs) >= 15, f"found only {sorted(pairs)}: has the code moved?"
    missing = sorted((status, name) for status, name in pairs if not any(
        re.search(rf"\b{status}\b", line) and f"`{name}`" in line for line in text.splitlines()))
    assert not missing, "status and errorType pairs not documented together in docs/http-contract.md"
    assert not sorted(name for name in names if f"`{name}`" not in text)


def test_every_error_type_a_function_can_get_is_documented() -> None:
    text = read("http-contract.md")
    assert not sorted(name for name in reported_error_types() if f"`{name}`" not in text)


# --- the command line -------------------------------------------------------------------------


def subcommands() -> dict[str, Any]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)  # type: ignore[arg-type]


def test_every_command_has_its_section_naming_each_flag() -> None:
    text = read("cli.md")
    commands = subcommands()
    sections = {title.strip("`").removeprefix("supervisor ") for level, title, _ in headings(text)
                if level == 2 and title.startswith("`supervisor ")}
    assert not sorted(set(commands) - sections), "commands without a section in docs/cli.md"
    assert not sorted(sections - set(commands) - PENDING), "sections for commands the CLI does not have"
    for name, parser in commands.items():
        body = section(text, f"`supervisor {name}`")
        flags = [option for action in parser._actions for option in action.option_strings if option not in
                 ("-h", "--help")]
        flags += [action.metavar for action in parser._actions if not action.option_strings and action.metavar]
        assert not [flag for flag in flags if flag not in body], f"supervisor {name}: flags not in its section"


def test_every_exit_code_is_in_the_table() -> None:
    table = rows(section(read("cli.md"), "Exit codes"))
    codes = {value for name, value in vars(cli).items() if name.startswith("EXIT_") and isinstance(value, int)}
    assert codes, "no EXIT_ constants in supervisor.cli"
    assert sorted(str(code) for code in codes) == sorted(table), "docs/cli.md's exit codes are not the CLI's"


# --- logs -------------------------------------------------------------------------------------


def test_the_events_to_watch_are_texts_the_code_logs() -> None:
    logged = {node.value for path in python_files("supervisor", "cahttp", "worker")
              for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    events = list(rows(section(read("logging.md"), "Events to watch")))
    assert len(events) >= 10
    assert not [event for event in events if event not in logged], "events the code never logs"


# --- links and references ---------------------------------------------------------------------


def repository_files() -> list[Path]:
    """Every file of the checkout that git would see (tracked, or new and not ignored);
    without git (a source tree, not a clone), every file outside hidden and build directories."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                                cwd=ROOT, capture_output=True, check=True, timeout=60).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        skip = {"node_modules", "__pycache__", "build", "dist"}
        return sorted(path for path in ROOT.rglob("*") if path.is_file() and not any(
            part.startswith(".") or part in skip for part in path.relative_to(ROOT).parts))
    return sorted({ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file()})


OUTSIDE = ("../" + "shared", "DESIGN" + ".md", "STYLE" + ".md", "/work/" + "shared")


def test_no_file_points_outside_the_repository() -> None:
    found = []
    for path in repository_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary
        found += [f"{path.relative_to(ROOT)}: {needle}" for needle in OUTSIDE if needle in text]
    assert not found


LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_link_resolves() -> None:
    broken = []
    for path in repository_files():
        if path.suffix != ".md":
            continue
        text = re.sub(r"`[^`\n]*`", "", without_code(path.read_text()))
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}: {target}"
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                if resolved not in PENDING_PAGES:
                    broken.append(where)
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
                broken.append(where + " (no such heading)")
    assert not broken


def test_every_page_of_docs_is_in_the_index() -> None:
    index = read("README.md")
    assert not [page.name for page in sorted(DOCS.glob("*.md")) if page.name != "README.md"
                and f"({page.name})" not in index]
