"""Pools that breathe, on real processes: bursts grow a pool up to
``max_workers`` and ``idle_ttl`` shrinks it back; workers are forked from a
per-function seed (or spawned with ``seed = false``); ``max_requests`` and
``disposable`` recycle workers; ``supervisor reload`` / SIGHUP and
``supervisor scale`` change a running supervisor; a freeze retires nothing;
a dead seed is restarted without touching the workers.

Handlers: ``functions/pools/pooled.py``. A test that edits handler code
works on a copy in ``tmp_path``; the repository is never modified.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import FUNCTIONS_DIR, Running, free_port, function, started, wait_for, write_config

POOLS_DIR = FUNCTIONS_DIR / "pools"
BAD_EXIT_REASONS = ("timeout", "init_failed", "crashed", "oom")


def pool_fn(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"code_dir": str(POOLS_DIR), "timeout": "5s"}
    spec.update(overrides)
    return function("pooled:handler", **spec)


def metric(sup: Running, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for family in text_string_to_metric_families(sup.metrics()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def exits(sup: Running, fn: str, reason: str) -> float:
    return metric(sup, "supervisor_worker_exits_total", function=fn, reason=reason)


def bad_exits(sup: Running, fn: str) -> dict[str, float]:
    return {reason: n for reason in BAD_EXIT_REASONS if (n := exits(sup, fn, reason))}


def exit_reasons(sup: Running, fn: str) -> dict[str, float]:
    """Every exit of ``fn``'s workers so far, by reason."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(sup.metrics()):
        for sample in family.samples:
            if sample.name == "supervisor_worker_exits_total" and sample.labels.get("function") == fn:
                out[sample.labels["reason"]] = out.get(sample.labels["reason"], 0.0) + sample.value
    return out


def wait_for_exits(sup: Running, fn: str, reason: str, at_least: int, timeout: float = 15) -> None:
    try:
        wait_for(lambda: exits(sup, fn, reason) >= at_least, timeout, f"{at_least} exits with reason {reason}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; exits by reason: {exit_reasons(sup, fn)}; log: {sup.log_path}") from None


def ctl(sup: Running, *args: str) -> subprocess.CompletedProcess[bytes]:
    return sup.cli(*args, "--run-dir", str(sup.run_dir))


def seed_of(sup: Running, fn: str) -> dict[str, Any] | None:
    for component in sup.status()["components"]:
        if component["name"] == f"seed:{fn}":
            return component  # type: ignore[no-any-return]
    return None


def running_seed(sup: Running, fn: str) -> dict[str, Any] | None:
    seed = seed_of(sup, fn)
    return seed if seed is not None and seed["state"] == "running" and seed["pid"] else None


def function_names(sup: Running) -> list[str]:
    return [fn["name"] for fn in sup.status()["functions"]]


def pids(workers: list[dict[str, Any]]) -> set[int]:
    return {int(w["pid"]) for w in workers if w["pid"]}


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def tree(sup: Running) -> list[psutil.Process]:
    root = psutil.Process(sup.proc.pid)
    return [root, *root.children(recursive=True)]


def edit_config(sup: Running, edit: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:
    """Rewrites the running supervisor's config file: the same settings, edited by ``edit``."""
    data = tomllib.loads(sup.config_path.read_text())
    edit(data["supervisor"], data["functions"])
    write_config(sup.config_path, data["supervisor"], data["functions"])


class Load:
    """Threads invoking ``event`` on ``fn`` until stopped; every answer kept, per thread, in order."""

    def __init__(self, sup: Running, event: Any, fn: str | None = None, threads: int = 2) -> None:
        self.sup, self.event, self.fn = sup, event, fn
        self.per_thread: list[list[tuple[int, Any]]] = [[] for _ in range(threads)]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(out,), daemon=True) for out in self.per_thread]

    def _run(self, out: list[tuple[int, Any]]) -> None:
        headers = {"x-fc-function-name": self.fn} if self.fn else {}
        with self.sup.client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    response = client.post("/invoke", content=json.dumps(self.event), headers=headers)
                except Exception as exc:  # a connection error is a result too
                    out.append((0, repr(exc)))
                    continue
                try:
                    body = response.json()
                except ValueError:
                    body = response.text
                out.append((response.status_code, body))

    @property
    def results(self) -> list[tuple[int, Any]]:
        return [r for out in self.per_thread for r in list(out)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


# ---- growing and shrinking ---------------------------------------------------------


def test_a_burst_grows_the_pool_up_to_max_workers_then_idle_ttl_shrinks_it(tmp_path: Path) -> None:
    with started(tmp_path, {"burst": pool_fn(min_warm=1, max_workers=8, concurrency=4, idle_ttl="1s")}) as sup:
        wait_for(lambda: len(sup.ready_workers("burst")) == 1, 10, "one warm worker")
        seen: set[int] = pids(sup.workers("burst"))
        peak_live = 0
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak_live
            while not stop.is_set():
                try:
                    workers = sup.workers("burst")
                except Exception:  # a status that failed to parse: look again
                    continue
                seen.update(pids(workers))
                peak_live = max(peak_live, sum(1 for w in workers if w["state"] != "draining"))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            with ThreadPoolExecutor(32) as pool:
                results = list(pool.map(lambda _: sup.invoke({"op": "sleep", "s": 1}, timeout=30), range(32)))
        finally:
            stop.set()
            watcher.join(30)
        assert [r.status_code for r in results] == [200] * 32, [r.text for r in results if r.status_code != 200]
        served = {r.json()["pid"] for r in results}
        assert 1 < len(served) <= 8, served
        assert peak_live <= 8, peak_live
        seen |= served
        # Back to min_warm once the burst's workers have been idle for idle_ttl.
        final = wait_for(lambda: len(w := sup.workers("burst")) == 1 and w[0]["state"] == "idle" and w, 20,
                         "the pool back to exactly one worker")
        retired = seen - pids(final)
        assert retired
        wait_for_exits(sup, "burst", "idle", len(retired))
        assert not bad_exits(sup, "burst"), (exit_reasons(sup, "burst"), str(sup.log_path))


# ---- the seed ---------------------------------------------------------------------


def worker_imports(log: Path) -> list[dict[str, Any]]:
    """Imports of the handler module, without the config check's throwaway ones (worker/check.py)."""
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [line for line in lines if not line["argv"][0].endswith("check.py")]


def test_workers_are_forked_from_a_seed_that_imported_the_module_once(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(POOLS_DIR / "pooled.py", code / "pooled.py")
    imports = tmp_path / "imports"
    fn = pool_fn(code_dir=str(code), min_warm=1, max_workers=4,
                 env={"IMPORT_LOG": str(imports), "PRINT_AT_IMPORT": "module body ran"})
    with started(tmp_path, {"hello": fn}) as sup:
        seed = wait_for(lambda: running_seed(sup, "hello"), 10, "the seed running")
        scaled = ctl(sup, "scale", "hello", "--min-warm", "3")
        assert scaled.returncode == 0, scaled.stderr
        workers = wait_for(lambda: len(w := sup.ready_workers("hello")) >= 3 and w, 10, "three ready workers")

        control = sup.component_pid("control-plane")
        assert {psutil.Process(pid).ppid() for pid in pids(workers)} == {control}
        # Their argv is the seed's; what ps shows says what they are.
        assert {psutil.Process(pid).name() for pid in pids(workers)} == {"worker:hello"}
        assert psutil.Process(seed["pid"]).name() == "seed:hello"
        assert sup.invoke({"op": "pid"}).json()["ppid"] == control
        # One import, in the seed; the workers inherited the module.
        loaded = worker_imports(imports)
        assert [line["pid"] for line in loaded] == [seed["pid"]], loaded
        assert seed_of(sup, "hello")["pid"] == seed["pid"]  # type: ignore[index]
        # What the module printed at import is the seed's output, logged as the seed's.
        printed = [line for line in sup.logs() if line.get("event") == "module body ran"]
        assert [(p["component"], p["function"], p.get("worker")) for p in printed] == [("seed:hello", "hello", None)]

        # Two forked workers do not share the seed's random state.
        with ThreadPoolExecutor(2) as pool:
            both = [f.result() for f in [pool.submit(sup.invoke, {"op": "random", "s": 0.5}) for _ in range(2)]]
        assert [r.status_code for r in both] == [200, 200]
        first, second = (r.json() for r in both)
        assert first["pid"] != second["pid"], "two concurrent invocations on one worker of concurrency 1"
        assert first["r"] != second["r"]

        assert metric(sup, "supervisor_worker_starts_total", function="hello", mode="fork") >= 3
        assert metric(sup, "supervisor_worker_starts_total", function="hello", mode="spawn") == 0
        assert metric(sup, "supervisor_seed_ready", function="hello") == 1
        ready_lines = [line for line in sup.logs() if line.get("event") == "worker ready"]
        assert len(ready_lines) >= 3
        assert all(line["mode"] == "fork" and isinstance(line["start_ms"], (int, float)) for line in ready_lines)

        # A code change: workers forked after a reload run the new code, with no failed invocation.
        assert sup.invoke({"op": "version"}).json()["version"] == "v1"
        old = pids(sup.workers("hello"))
        with Load(sup, {"op": "version"}, threads=2) as load:
            wait_for(lambda: len(load.results) >= 10, 10, "load running")
            source = code / "pooled.py"
            source.write_text(source.read_text().replace('VERSION = "v1"', 'VERSION = "v2"'))
            later = time.time() + 10  # a later mtime for sure (same size: the fingerprint sees the mtime)
            os.utime(source, (later, later))
            reloaded = ctl(sup, "reload")
            assert reloaded.returncode == 0, reloaded.stderr
            assert "changed hello" in reloaded.stdout.decode(), reloaded.stdout
            wait_for(lambda: any(isinstance(b, dict) and b.get("version") == "v2" for _, b in load.results), 15,
                     "invocations answered by the new code")
            wait_for(lambda: not (pids(sup.workers("hello")) & old), 15, "the old workers gone")
            count = len(load.results)
            wait_for(lambda: len(load.results) >= count + 10, 10, "more invocations after the switch")
        failed = [r for r in load.results if r[0] != 200]
        assert not failed, failed[:5]
        for _ in range(5):
            answer = sup.invoke({"op": "version"}).json()
            assert answer["version"] == "v2" and answer["pid"] not in old
        wait_for_exits(sup, "hello", "recycled", len(old))
        assert not bad_exits(sup, "hello"), (exit_reasons(sup, "hello"), str(sup.log_path))
        new_seed = wait_for(lambda: running_seed(sup, "hello"), 10, "the new seed running")
        assert new_seed["pid"] != seed["pid"]


def test_without_a_seed_workers_are_spawned(tmp_path: Path) -> None:
    with started(tmp_path, {"hello": pool_fn(seed=False, min_warm=2, max_workers=2)}) as sup:
        wait_for(lambda: len(sup.ready_workers("hello")) == 2, 10, "two ready workers")
        assert sup.invoke({"op": "pid"}).status_code == 200
        assert not [c for c in sup.status()["components"] if c["name"].startswith("seed:")]
        assert metric(sup, "supervisor_worker_starts_total", function="hello", mode="spawn") >= 2
        assert metric(sup, "supervisor_worker_starts_total", function="hello", mode="fork") == 0
        ready_lines = [line for line in sup.logs() if line.get("event") == "worker ready"]
        assert len(ready_lines) >= 2 and all(line["mode"] == "spawn" for line in ready_lines)


def test_a_killed_seed_is_restarted_and_its_workers_serve_on(tmp_path: Path) -> None:
    with started(tmp_path, {"hello": pool_fn(min_warm=2, max_workers=4)}) as sup:
        seed = wait_for(lambda: running_seed(sup, "hello"), 10, "the seed running")
        workers = wait_for(lambda: len(w := sup.ready_workers("hello")) == 2 and w, 10, "two ready workers")
        before = pids(workers)
        os.kill(seed["pid"], signal.SIGKILL)
        # New workers start while it is down (or restarting): by spawn, or by fork from its successor.
        scaled = ctl(sup, "scale", "hello", "--min-warm", "4")
        assert scaled.returncode == 0, scaled.stderr
        wait_for(lambda: len(sup.ready_workers("hello")) == 4, 15, "four ready workers")
        restarted = wait_for(lambda: (s := running_seed(sup, "hello")) and s["pid"] != seed["pid"] and s, 15,
                             "the seed restarted")
        assert restarted["restarts"] >= 1
        wait_for(lambda: metric(sup, "supervisor_component_restarts_total", component="seed:hello") >= 1, 10,
                 "the seed's restart counted")
        wait_for(lambda: metric(sup, "supervisor_seed_ready", function="hello") == 1, 10, "seed_ready back to 1")
        # The workers it had forked were not affected.
        assert all(alive(pid) for pid in before)
        assert before <= pids(sup.ready_workers("hello"))
        answers = [sup.invoke({"op": "pid"}) for _ in range(8)]
        assert [r.status_code for r in answers] == [200] * 8
        assert not bad_exits(sup, "hello"), (exit_reasons(sup, "hello"), str(sup.log_path))


def test_a_module_that_starts_threads_at_import_is_spawned_not_forked(tmp_path: Path) -> None:
    fn = function("threaded:handler", code_dir=str(FUNCTIONS_DIR / "threaded"), min_warm=1, max_workers=2)
    with started(tmp_path, {"t": fn}) as sup:
        seed = wait_for(lambda: (s := seed_of(sup, "t")) and s["state"] == "failed" and s, 10, "the seed refusing")
        assert seed["pid"] is None
        status = ctl(sup, "status")
        assert status.returncode == 3, status.stdout  # a component is not running, and status says why
        assert b"started threads" in status.stdout and b"seed = false" in status.stdout, status.stdout
        answer = sup.invoke({}, "t")
        # The module was imported in the worker itself: its thread runs there.
        assert answer.status_code == 200 and "import-time-thread" in answer.json()["threads"], answer.text
        assert [w["mode"] for w in ctl_status_workers(sup, "t")] == ["spawn"]
        assert metric(sup, "supervisor_seed_ready", function="t") == 0
        assert metric(sup, "supervisor_worker_starts_total", function="t", mode="spawn") >= 1
        assert metric(sup, "supervisor_worker_starts_total", function="t", mode="fork") == 0
        # Not retried in a loop: it would start the same thread again.
        again = seed_of(sup, "t")
        assert again is not None and (again["state"], again["restarts"]) == ("failed", 0), again


def ctl_status_workers(sup: Running, fn: str) -> list[dict[str, Any]]:
    """The workers of ``fn`` as the control plane reports them, with their start mode."""
    from supervisor.cli import fetch_status
    from supervisor.runstate import RunPaths

    reply = fetch_status(RunPaths(sup.run_dir))
    for function_status in reply.functions:
        if function_status.name == fn:
            return [{"pid": w.pid, "mode": w.mode} for w in function_status.workers]
    raise KeyError(fn)


def test_a_restarted_data_plane_runs_the_reloaded_config(tmp_path: Path) -> None:
    with started(tmp_path, {"a": pool_fn(min_warm=1, max_workers=2)}) as sup:
        def edit(settings: dict[str, Any], fns: dict[str, Any]) -> None:
            fns["c"] = pool_fn(min_warm=1, max_workers=1, env={"VERSION": "three"})

        edit_config(sup, edit)
        assert ctl(sup, "reload").returncode == 0
        wait_for(lambda: sup.invoke({"op": "env", "name": "VERSION"}, "c").status_code == 200, 10, "c serving")
        # The file is broken afterwards: a restarted plane must run what was accepted, not the file.
        sup.config_path.write_text(sup.config_path.read_text() + "\nbroken = [\n")
        old = sup.component_pid("data-plane")
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: any(c["name"] == "data-plane" and c["pid"] not in (None, old) and c["state"] == "running"
                             for c in sup.status()["components"]), 15, "the data plane restarted")
        answer = wait_for(lambda: (r := sup.invoke({"op": "env", "name": "VERSION"}, "c")).status_code == 200 and r,
                          15, "c served by the restarted data plane")
        assert answer.json()["value"] == "three"
        assert sup.invoke({"op": "pid"}, "a").status_code == 200


# ---- recycling ----------------------------------------------------------------------


def test_max_requests_recycles_workers(tmp_path: Path) -> None:
    with started(tmp_path, {"hello": pool_fn(min_warm=1, max_workers=2, max_requests=10)}) as sup:
        served = []
        with sup.client() as client:
            for i in range(100):
                response = client.post("/invoke", content=b'{"op": "pid"}')
                assert response.status_code == 200, (i, response.text, str(sup.log_path))
                served.append(response.json()["pid"])
        assert len(set(served)) > 1
        # 100 invocations, at most 11 per worker before it is due (10 + up to 10 % jitter).
        wait_for_exits(sup, "hello", "recycled", 5)
        assert not bad_exits(sup, "hello"), (exit_reasons(sup, "hello"), str(sup.log_path))


def test_a_worker_past_its_memory_high_water_mark_is_replaced(tmp_path: Path) -> None:
    fn = pool_fn(min_warm=1, max_workers=2, recycle_memory_share=0.5, limits={"memory": "128MiB"})
    with started(tmp_path, {"hello": fn}) as sup:
        first = sup.invoke({"op": "hog", "mib": 80})  # 80 MiB > 0.5 x 128 MiB
        assert first.status_code == 200, first.text
        hog = first.json()["pid"]
        wait_for_exits(sup, "hello", "recycled", 1)
        assert not alive(hog)
        # Its replacement was ready before it stopped taking work: nothing failed, and it serves.
        answer = sup.invoke({"op": "pid"})
        assert answer.status_code == 200 and answer.json()["pid"] != hog, answer.text
        assert not bad_exits(sup, "hello"), (exit_reasons(sup, "hello"), str(sup.log_path))


def test_disposable_workers_serve_one_invocation_each(tmp_path: Path) -> None:
    with started(tmp_path, {"hello": pool_fn(min_warm=1, max_workers=2, disposable=True)}) as sup:
        served = []
        with sup.client() as client:
            for i in range(20):
                response = client.post("/invoke", content=b'{"op": "pid"}')
                assert response.status_code == 200, (i, response.text, str(sup.log_path))
                served.append(response.json()["pid"])
        assert len(set(served)) == 20, served
        wait_for_exits(sup, "hello", "disposable", 19)
        assert not bad_exits(sup, "hello"), (exit_reasons(sup, "hello"), str(sup.log_path))


# ---- reload and scale -----------------------------------------------------------------


def test_reload_under_load_changes_adds_and_removes_functions(tmp_path: Path) -> None:
    mark = tmp_path / "b-in-handler"
    functions = {"a": pool_fn(min_warm=1, max_workers=2, env={"VERSION": "one"}),
                 "b": pool_fn(min_warm=1, max_workers=2)}
    with started(tmp_path, functions) as sup:
        with Load(sup, {"op": "env", "name": "VERSION"}, "a", threads=2) as load_a, \
                Load(sup, {"op": "pid"}, "b", threads=1) as load_b, ThreadPoolExecutor(1) as pool:
            wait_for(lambda: len(load_a.results) >= 10 and len(load_b.results) >= 5, 10, "load on a and b")
            slow_b = pool.submit(sup.invoke, {"op": "sleep", "s": 2, "mark": str(mark)}, "b")
            wait_for(mark.exists, 10, "a slow invocation of b in its handler")

            def edit(settings: dict[str, Any], fns: dict[str, Any]) -> None:
                fns["a"]["env"] = {"VERSION": "two"}
                fns["c"] = pool_fn(min_warm=1, max_workers=1, env={"VERSION": "three"})
                del fns["b"]

            edit_config(sup, edit)
            reloaded = ctl(sup, "reload", "--json")
            assert reloaded.returncode == 0, reloaded.stderr
            reply = json.loads(reloaded.stdout)
            assert (reply["ok"], reply["changed"], reply["added"], reply["removed"]) == (True, ["a"], ["c"], ["b"])

            wait_for(lambda: any(b.get("value") == "two" for s, b in load_a.results if s == 200), 15,
                     "a answering with its new env")
            c = sup.invoke({"op": "env", "name": "VERSION"}, "c")
            assert c.status_code == 200 and c.json()["value"] == "three", c.text
            gone = sup.invoke({"op": "pid"}, "b")
            assert gone.status_code == 404, gone.text
            assert gone.json()["errorType"] == "FunctionNotFoundError"
            in_flight = slow_b.result(timeout=30)
            assert in_flight.status_code == 200, in_flight.text
            wait_for(lambda: "b" not in function_names(sup), 15, "b gone from status")
            count = len(load_a.results)
            wait_for(lambda: len(load_a.results) >= count + 10, 10, "a still serving")
        failed_a = [r for r in load_a.results if r[0] != 200]
        assert not failed_a, failed_a[:5]
        # b: answered until it was removed, then FunctionNotFoundError, nothing else.
        statuses_b = [s for s, _ in load_b.per_thread[0]]
        first_404 = statuses_b.index(404) if 404 in statuses_b else len(statuses_b)
        unexpected = [(i, s, b) for i, (s, b) in enumerate(load_b.per_thread[0])
                      if s != (200 if i < first_404 else 404)]
        assert not unexpected, (unexpected[:5], f"first 404 at {first_404} of {len(statuses_b)}", str(sup.log_path))
        assert all(b["errorType"] == "FunctionNotFoundError" for s, b in load_b.per_thread[0] if s == 404)
        assert sorted(function_names(sup)) == ["a", "c"]
        assert sup.invoke({"op": "env", "name": "VERSION"}, "a").json()["value"] == "two"
        assert not bad_exits(sup, "a"), (exit_reasons(sup, "a"), str(sup.log_path))


def test_a_bad_reload_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    with started(tmp_path, {"hello": pool_fn(min_warm=1, max_workers=2)}) as sup:
        before = pids(wait_for(lambda: sup.ready_workers("hello"), 10, "a ready worker"))

        def typo(settings: dict[str, Any], fns: dict[str, Any]) -> None:
            fns["hello"]["min_wram"] = 2

        edit_config(sup, typo)
        refused = ctl(sup, "reload")
        assert refused.returncode == 2, (refused.stdout, refused.stderr)
        assert "functions.hello.min_wram" in refused.stderr.decode(), refused.stderr
        response = sup.invoke({"op": "pid"})
        assert response.status_code == 200 and response.json()["pid"] in before

        def new_port(settings: dict[str, Any], fns: dict[str, Any]) -> None:
            del fns["hello"]["min_wram"]
            settings["ca_port"] = free_port()

        edit_config(sup, new_port)
        refused = ctl(sup, "reload")
        assert refused.returncode == 2, (refused.stdout, refused.stderr)
        assert "supervisor.ca_port" in refused.stderr.decode(), refused.stderr
        response = sup.invoke({"op": "pid"})  # on the port it started with
        assert response.status_code == 200 and response.json()["pid"] in before
        assert pids(sup.ready_workers("hello")) == before

        # SIGHUP reloads too: a good file is applied...
        def good(settings: dict[str, Any], fns: dict[str, Any]) -> None:
            settings["ca_port"] = sup.ca_port
            fns["hello"]["min_warm"] = 2

        edit_config(sup, good)
        sup.proc.send_signal(signal.SIGHUP)
        # (min_warm is part of the function: a changed function gets new workers)
        after = wait_for(lambda: len(p := pids(sup.ready_workers("hello"))) == 2 and not p & before and p, 15,
                         "two new ready workers after the SIGHUP reload")

        # ...and a bad one is refused, with its key path in the log (a signal has no other way to answer).
        edit_config(sup, typo)
        sup.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: [line for line in sup.logs() if line.get("level") in ("warning", "error")
                          and "functions.hello.min_wram" in json.dumps(line)], 10,
                 "the SIGHUP reload refused in the log, with the key path")
        assert sup.proc.poll() is None
        response = sup.invoke({"op": "pid"})
        assert response.status_code == 200 and response.json()["pid"] in after
        assert pids(sup.ready_workers("hello")) == after


def test_scale_overrides_min_warm_and_max_workers(tmp_path: Path) -> None:
    with started(tmp_path, {"hello": pool_fn(min_warm=1, max_workers=4)}) as sup:
        scaled = ctl(sup, "scale", "hello", "--min-warm", "3")
        assert scaled.returncode == 0, scaled.stderr
        wait_for(lambda: len(sup.ready_workers("hello")) == 3, 10, "three ready workers")
        fn = next(f for f in sup.status()["functions"] if f["name"] == "hello")
        assert (fn["min_warm"], fn["max_workers"]) == (3, 4)

        refused = ctl(sup, "scale", "hello", "--max-workers", "1")
        assert refused.returncode == 2, (refused.stdout, refused.stderr)
        assert "min_warm" in refused.stderr.decode() and "3" in refused.stderr.decode(), refused.stderr
        assert len(sup.ready_workers("hello")) == 3

        unknown = ctl(sup, "scale", "nope", "--min-warm", "1")
        assert unknown.returncode == 2, (unknown.stdout, unknown.stderr)

        scaled = ctl(sup, "scale", "hello", "--min-warm", "1", "--max-workers", "1")
        assert scaled.returncode == 0, scaled.stderr
        wait_for(lambda: len(sup.workers("hello")) == 1, 15, "the pool shrunk to one worker")
        fn = next(f for f in sup.status()["functions"] if f["name"] == "hello")
        assert (fn["min_warm"], fn["max_workers"]) == (1, 1)
        assert sup.invoke({"op": "pid"}).status_code == 200
        assert not bad_exits(sup, "hello"), (exit_reasons(sup, "hello"), str(sup.log_path))


# ---- freezes -----------------------------------------------------------------------


def test_a_freeze_longer_than_idle_ttl_retires_nothing(tmp_path: Path) -> None:
    # idle_ttl is 3 s. The workers idle 2 s, then the tree is frozen for 6 s. The
    # awake clock charges a freeze up to 2 s (supervisor.clock max_gap), so an idle
    # time that simply kept counting would pass idle_ttl at the thaw; the thaw
    # must restart it instead (FC thaws a container to send it a request).
    with started(tmp_path, {"hello": pool_fn(min_warm=1, max_workers=4, idle_ttl="3s")}) as sup:
        with ThreadPoolExecutor(4) as pool:
            burst = list(pool.map(lambda _: sup.invoke({"op": "sleep", "s": 1}), range(4)))
        assert [r.status_code for r in burst] == [200] * 4
        warm = pids(sup.ready_workers("hello"))
        assert len(warm) >= 3, warm
        time.sleep(2.0)  # idle time before the freeze: the passage of time is the point
        with sup.client() as client:
            assert client.get("/pre-freeze").status_code == 200
        frozen = tree(sup)
        for process in frozen:
            process.suspend()
        try:
            deadline = time.monotonic() + 6.0
            while time.monotonic() < deadline:  # the freeze itself: the passage of time is the point
                time.sleep(deadline - time.monotonic())
        finally:
            for process in frozen:
                process.resume()
        # The control plane's first look after the thaw is where it would retire them.
        wait_for(lambda: any(line.get("event") == "thawed; idle times restart" for line in sup.logs()), 10,
                 "the control plane noticing the thaw")
        assert warm <= pids(sup.ready_workers("hello")), "workers retired because wall time passed while frozen"
        answer = sup.invoke({"op": "pid"})
        assert answer.status_code == 200 and answer.json()["pid"] in warm
        assert not bad_exits(sup, "hello"), (exit_reasons(sup, "hello"), str(sup.log_path))
        # And the pool does shrink once they have really been idle for idle_ttl.
        wait_for(lambda: len(sup.workers("hello")) == 1, 20, "the pool back to one worker")
        wait_for_exits(sup, "hello", "idle", len(warm) - 1)
        assert not bad_exits(sup, "hello"), (exit_reasons(sup, "hello"), str(sup.log_path))
