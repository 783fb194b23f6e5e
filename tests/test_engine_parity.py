"""Direct and orchestrated mode agree: a table of workflows run both ways, every task's final
status and attempts compared.

Direct mode runs the engine in this process (``engine.local``); orchestrated mode is the real
stack (gateway, scheduler, executor on a real NATS server). Both run the same engine and the
same action runner, so they must end every workflow the same way: failure policies with
siblings still running, retries, timeouts, skips and cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from core.registry import load_registry
from core.runner import Runner, resolve_binary
from engine.local import LocalRun
from shared.config import load_config
from shared.messages import WorkflowDefinition

from .support import Stack, running_stack, submit, wait_until

pytestmark = pytest.mark.e2e

FAST = {"initial_seconds": 0.05, "multiplier": 1, "max_seconds": 0.05}


def sleep(task_id: str, seconds: float, *deps: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": task_id,
        "action": "builtin.sleep",
        "args": {"seconds": seconds},
        "depends_on": list(deps),
        **extra,
    }


def fail(task_id: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"id": task_id, "action": "builtin.fail", "depends_on": list(deps), **extra}


def noop(task_id: str, *deps: str) -> dict[str, Any]:
    return {"id": task_id, "action": "builtin.noop", "depends_on": list(deps)}


# name -> (definition, the task states to wait for before cancelling, or None)
Moment = dict[str, str] | None
TABLE: dict[str, tuple[dict[str, Any], Moment]] = {
    "stop-with-a-running-sibling": (
        {"on_failure": "stop", "tasks": [sleep("a", 0.6), fail("b"), noop("c", "a")]},
        None,
    ),
    "continue-with-a-running-sibling": (
        {"on_failure": "continue", "tasks": [sleep("a", 0.6), fail("b"), noop("c", "a")]},
        None,
    ),
    "retries-then-skip": (
        {
            "on_failure": "continue",
            "tasks": [fail("flaky", retries=2, backoff=FAST), noop("after", "flaky"), noop("free")],
        },
        None,
    ),
    "timeout-retried": (
        {"tasks": [sleep("slow", 30, timeout_seconds=0.3, retries=1, backoff=FAST)]},
        None,
    ),
    "skips-down-a-chain": (
        {
            "on_failure": "continue",
            "tasks": [fail("a"), noop("b", "a"), noop("c", "b"), noop("d"), noop("e", "d", "c")],
        },
        None,
    ),
    "stop-cancels-retries-and-pending": (
        {
            "on_failure": "stop",
            "tasks": [
                sleep("first", 0.3),
                fail("boom", "first"),
                fail("backing-off", retries=3, backoff={"initial_seconds": 30}),
                noop("after", "boom"),
            ],
        },
        None,
    ),
    "diamond": (
        {"tasks": [noop("a"), sleep("b", 0.1, "a"), noop("c", "a"), noop("d", "b", "c")]},
        None,
    ),
    "cancelled-mid-run": (
        {"tasks": [sleep("quick", 0.1), sleep("long", 30), noop("after", "long")]},
        {"quick": "completed", "long": "running"},
    ),
}


@pytest.fixture(scope="module")
def parity_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("parity"), executors=1) as stack:
        yield stack


def outcome(tasks: dict[str, tuple[str, int]]) -> dict[str, tuple[str, int]]:
    return dict(sorted(tasks.items()))


def run_orchestrated(stack: Stack, body: dict[str, Any], cancel_at: Moment) -> Any:
    wf_id = submit(stack.http, body["tasks"], **{k: v for k, v in body.items() if k != "tasks"})
    if cancel_at is not None:

        def reached() -> bool:
            view = stack.http.get(f"/workflows/{wf_id}")[1]
            now = {t["id"]: t["status"] for t in view["tasks"]}
            return all(now[t] == status for t, status in cancel_at.items())

        wait_until(reached, what=f"{cancel_at}")
        assert stack.http.post(f"/workflows/{wf_id}/cancel")[0] == 202
    view = stack.http.wait_workflow(wf_id, timeout=60)
    return view["status"], outcome({t["id"]: (t["status"], t["attempt"]) for t in view["tasks"]})


def run_direct(stack: Stack, body: dict[str, Any], cancel_at: Moment) -> Any:
    config = load_config(environ={k: v for k, v in stack.env.items() if k != "NATS_URL"})
    registry = load_registry()
    runner = Runner(nu_binary=resolve_binary("nu"), data_dir=stack.tmp / "direct")
    definition = msgspec.convert({"name": "parity", **body}, WorkflowDefinition)

    async def main() -> Any:
        now: dict[str, str] = {}

        def report(task_id: str, kind: str, data: dict[str, Any]) -> None:
            if kind == "task":
                now[task_id] = data["status"]

        run = LocalRun(definition, registry, runner, config, report)
        job = asyncio.create_task(run.run())
        if cancel_at is not None:
            while not all(now.get(t) == status for t, status in cancel_at.items()):
                await asyncio.sleep(0.02)
            run.cancel()
        state = await asyncio.wait_for(job, 60)
        tasks = {t: (state.tasks[t].status, state.tasks[t].attempt) for t in state.tasks}
        return state.record.status, outcome(tasks)

    return asyncio.run(main())


@pytest.mark.parametrize("name", list(TABLE))
def test_direct_and_orchestrated_runs_end_alike(parity_stack: Stack, name: str) -> None:
    body, cancel_at = TABLE[name]
    direct = run_direct(parity_stack, body, cancel_at)
    orchestrated = run_orchestrated(parity_stack, body, cancel_at)
    assert direct == orchestrated, f"{name}: direct {direct} != orchestrated {orchestrated}"


def test_the_table_covers_every_end_state(parity_stack: Stack) -> None:
    """The table is only worth something if it reaches every end state and retries."""
    seen: set[str] = set()
    retried = False
    for body, cancel_at in TABLE.values():
        _, tasks = run_direct(parity_stack, body, cancel_at)
        seen |= {status for status, _ in tasks.values()}
        retried |= any(attempt > 1 for _, attempt in tasks.values())
    assert seen == {"completed", "failed", "cancelled", "skipped"} and retried


def test_config_from_the_stack_runs_direct_here(tmp_path: Path) -> None:
    """Direct mode needs no NATS: it runs with the packaged configuration alone."""
    config = load_config(environ={"PROVISIONING_ORCHESTRATOR_DATA_DIR": str(tmp_path)})
    definition = msgspec.convert({"name": "solo", "tasks": [noop("a")]}, WorkflowDefinition)
    runner = Runner(nu_binary=resolve_binary("nu"), data_dir=tmp_path)
    state = asyncio.run(
        LocalRun(definition, load_registry(), runner, config, lambda *a: None).run()
    )
    assert state.record.status == "completed" and state.tasks["a"].status == "completed"
