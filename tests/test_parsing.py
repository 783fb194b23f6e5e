"""The definition parser pool (shared/parsing.py) in process: the same answers as parsing here,
bounded in time, and a worker that dies or is abandoned is replaced."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from core.registry import load_registry
from shared.errors import DefinitionError
from shared.messages import WorkflowDefinition
from shared.parsing import DefinitionParser
from shared.workflow import parse_definition, validate_definition

ACTIONS = load_registry().names()
EXAMPLES = Path(__file__).resolve().parent.parent / "core" / "workflows"
SLOW_YAML = (  # about a second of parsing: far past the bounds below
    b"name: zeros\ntasks:\n- id: a\n  action: builtin.noop\n  args:\n    z: ["
    + b"0, " * 400_000
    + b"0]\n"
)


def run(body: Callable[[DefinitionParser], Awaitable[Any]], **kwargs: Any) -> Any:
    async def main() -> Any:
        parser = DefinitionParser(**{"workers": 2, "timeout_s": 10.0, **kwargs})
        try:
            return await body(parser)
        finally:
            await parser.close()

    return asyncio.run(main())


def parse(parser: DefinitionParser, body: bytes, fmt: str) -> Awaitable[WorkflowDefinition]:
    return parser.parse(body, fmt, actions=ACTIONS, max_tasks=100)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("fmt", ["json", "toml", "yaml"])
def test_a_worker_parses_as_the_gateway_would(fmt: str) -> None:
    body = (EXAMPLES / f"example3.{fmt}").read_bytes()
    expected = parse_definition(body, fmt)
    assert run(lambda p: parse(p, body, fmt)) == expected


@pytest.mark.parametrize(
    ("body", "reason", "details"),
    [
        (b"name: x\ntasks: [", "malformed", {}),
        (b"name: x\ntasks:\n- {id: a, action: nope.nope}\n", "unknown_action", {"task": "a"}),
        (
            b"name: x\ntasks:\n- {id: a, action: builtin.noop, depends_on: [b]}\n"
            b"- {id: b, action: builtin.noop, depends_on: [a]}\n",
            "cycle",
            {"task": "a", "cycle": ["a", "b", "a"]},
        ),
        (
            b"name: x\ntasks:\n- {id: a, action: builtin.noop, args: {l: &a [*a]}}\n",
            "too_deep",
            {"task": "a"},
        ),
    ],
)
def test_a_workers_refusal_is_the_same_error_as_here(
    body: bytes, reason: str, details: dict[str, Any]
) -> None:
    with pytest.raises(DefinitionError) as here:
        validate_definition(parse_definition(body, "yaml"), ACTIONS, max_tasks=100)
    with pytest.raises(DefinitionError) as there:
        run(lambda p: parse(p, body, "yaml"))
    assert (there.value.message, there.value.data) == (here.value.message, here.value.data)
    assert there.value.reason == reason
    assert details.items() <= there.value.data.items()


def test_a_parse_past_the_time_bound_is_refused_and_its_worker_killed() -> None:
    async def body(parser: DefinitionParser) -> tuple[list[int], str]:
        await parse(parser, b"name: w\ntasks:\n- {id: a, action: builtin.noop}\n", "yaml")
        before = parser.worker_pids()
        with pytest.raises(DefinitionError) as caught:
            await parse(parser, SLOW_YAML, "yaml")
        await asyncio.sleep(0.2)
        assert not any(alive(pid) for pid in before)
        after = await parse(
            parser, b"name: next\ntasks:\n- {id: a, action: builtin.noop}\n", "yaml"
        )
        assert after.name == "next"
        assert parser.worker_pids() and parser.worker_pids() != before
        return before, caught.value.reason

    before, reason = run(body, timeout_s=0.3)
    assert len(before) == 1
    assert reason == "parse_timeout"


def test_a_worker_that_dies_mid_parse_costs_only_its_request() -> None:
    async def body(parser: DefinitionParser) -> str:
        await parse(parser, b"name: w\ntasks:\n- {id: a, action: builtin.noop}\n", "yaml")
        (pid,) = parser.worker_pids()
        slow = asyncio.create_task(parse(parser, SLOW_YAML, "yaml"))
        await asyncio.sleep(0.2)
        os.kill(pid, signal.SIGKILL)  # as the kernel would at the memory limit
        with pytest.raises(DefinitionError) as caught:
            await slow
        assert (
            await parse(parser, b"name: ok\ntasks:\n- {id: a, action: builtin.noop}\n", "yaml")
        ).name == "ok"
        return caught.value.reason

    assert run(body) == "too_complex"


def test_a_cancelled_parse_kills_its_worker() -> None:
    """A request that times out or goes away leaves no parser busy for nothing."""

    async def body(parser: DefinitionParser) -> None:
        await parse(parser, b"name: w\ntasks:\n- {id: a, action: builtin.noop}\n", "yaml")
        (pid,) = parser.worker_pids()
        slow = asyncio.create_task(parse(parser, SLOW_YAML, "yaml"))
        await asyncio.sleep(0.2)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        await asyncio.sleep(0.2)
        assert not alive(pid)
        assert parser.worker_pids() == []

    run(body)


def test_no_more_workers_than_allowed_parse_at_once() -> None:
    async def body(parser: DefinitionParser) -> int:
        small = b"name: w\ntasks:\n- {id: a, action: builtin.noop}\n"
        results = await asyncio.gather(*(parse(parser, small, "yaml") for _ in range(8)))
        assert len(results) == 8
        return len(parser.worker_pids())

    assert run(body, workers=2) <= 2


def test_close_stops_the_idle_workers() -> None:
    async def body(parser: DefinitionParser) -> list[int]:
        small = b'{"name": "w", "tasks": [{"id": "a", "action": "builtin.noop"}]}'
        await asyncio.gather(parse(parser, small, "yaml"), parse(parser, small, "json"))
        pids = parser.worker_pids()
        await parser.close()
        return pids

    pids = run(body)
    assert pids
    assert not any(alive(pid) for pid in pids)
