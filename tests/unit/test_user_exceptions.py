"""worker.python.host: whatever a handler raises is its invocation's result,
except the cancellation of the running task itself (the worker's own).

Hosts run in-process on handlers defined here; the end-to-end proof (worker
pid unchanged, neighbours served, ``max_requests`` counted) is
tests/e2e/test_user_exceptions.py.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from worker.python.host import PythonHost, cancelled_from_outside, error_result

RAISED = [BaseException, SystemExit, KeyboardInterrupt, GeneratorExit, asyncio.CancelledError, ValueError]
MODULE = "unit_raising_handlers"
TO_RAISE: list[type[BaseException]] = [ValueError]  # what the handlers raise


class BadStr(Exception):
    def __str__(self) -> str:
        raise SystemExit("even str() fails")


@pytest.fixture
def module() -> Iterator[ModuleType]:
    mod = ModuleType(MODULE)
    started = asyncio.Event()

    def sync(event: bytes, context: Any) -> Any:
        raise TO_RAISE[0]("on purpose")

    async def async_(event: bytes, context: Any) -> Any:
        await asyncio.sleep(0)
        raise TO_RAISE[0]("on purpose")

    async def forever(event: bytes, context: Any) -> Any:
        started.set()
        await asyncio.Event().wait()

    mod.sync, mod.async_, mod.forever, mod.started = sync, async_, forever, started  # type: ignore[attr-defined]
    sys.modules[MODULE] = mod
    yield mod
    del sys.modules[MODULE]


def host(handler: str, concurrency: int = 1) -> PythonHost:
    python_host = PythonHost({"function": "f", "handler": f"{MODULE}:{handler}", "timeout_s": 5,
                              "concurrency": concurrency})
    python_host.load()
    return python_host


@pytest.mark.parametrize("raised", RAISED, ids=lambda cls: cls.__name__)
def test_an_inline_handler_raising_anything_is_its_result(module: ModuleType, raised: type[BaseException]) -> None:
    TO_RAISE[0] = raised
    sync = host("sync")
    assert sync.runs_inline("invoke")
    result = sync.run_inline("invoke", "r1", {}, 5.0, b"")
    assert not result.ok and result.error.error_type == raised.__name__
    assert result.error.error_message == "on purpose" and "on purpose" in result.error.stack_trace


@pytest.mark.parametrize("raised", RAISED, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize(("handler", "concurrency"), [("sync", 2), ("async_", 1)], ids=["thread", "task"])
def test_a_handler_run_off_the_loop_raising_anything_is_its_result(
        module: ModuleType, raised: type[BaseException], handler: str, concurrency: int) -> None:
    TO_RAISE[0] = raised
    python_host = host(handler, concurrency)

    async def main() -> Any:
        try:
            return await asyncio.wait_for(python_host.run("invoke", "r1", {}, 5.0, b""), 5.0)
        finally:
            await python_host.close()

    result = asyncio.run(main())
    assert not result.ok and result.error.error_type == raised.__name__


def test_the_cancellation_of_the_task_is_not_the_handlers_result(module: ModuleType) -> None:
    python_host = host("forever")

    async def main() -> None:
        task = asyncio.ensure_future(python_host.run("invoke", "r1", {}, 5.0, b""))
        await asyncio.wait_for(module.started.wait(), 5.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5.0)
        assert task.cancelled()

    asyncio.run(main())


def test_cancelled_from_outside_tells_a_raised_cancellation_from_a_cancel() -> None:
    async def main() -> tuple[bool, bool]:
        raised = cancelled_from_outside(asyncio.CancelledError())
        current = asyncio.current_task()
        assert current is not None
        current.cancel()
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError as exc:
            outside = cancelled_from_outside(exc)
            current.uncancel()
        return raised, outside

    assert asyncio.run(main()) == (False, True)
    assert not cancelled_from_outside(SystemExit())
    assert not cancelled_from_outside(asyncio.CancelledError())  # no loop: raised in a thread


def test_error_result_never_raises_even_when_str_does() -> None:
    try:
        raise BadStr()
    except BadStr as exc:
        result = error_result(exc)
    assert result.error.error_type == "BadStr"
    assert "str() failed" in result.error.error_message and "BadStr" in result.error.stack_trace


@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt, asyncio.CancelledError], ids=lambda c: c.__name__)
def test_an_asgi_lifespan_raising_anything_is_a_failed_startup_not_the_loops_end(
        raised: type[BaseException]) -> None:
    from worker.python.lifespan import Lifespan

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # it speaks lifespan: it took lifespan.startup
        raise raised("on purpose")

    async def main() -> str:
        # Awaited in this task, as the worker does (wait_for's own task would end the loop on KeyboardInterrupt).
        with pytest.raises(raised):
            async with asyncio.timeout(5.0):
                await Lifespan(app, {}).startup()
        return "the loop lives on"

    assert asyncio.run(main()) == "the loop lives on"
