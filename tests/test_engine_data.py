"""Data between tasks, as a specification: results passed on by reference, and fan-out over a
task's result. In process, no NATS."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from engine import Effects, Engine
from shared.errors import DefinitionError
from shared.messages import TaskRecord, WorkflowDefinition
from shared.workflow import validate_definition

from .test_engine import Run, dispatched, noop


def step_and_run(run: Run, task_id: str, output: Any = None, outcome: str = "completed") -> Effects:
    return run.run(task_id, outcome, output=output)


def sent_args(effects: Effects) -> dict[str, Any]:
    return {d.message.task_id: d.message.args for d in effects.dispatches}


# -- references ------------------------------------------------------------------------------------


def test_a_reference_takes_a_dependency_result_at_dispatch_and_the_record_shows_it() -> None:
    run = Run(
        [
            noop("srv"),
            {
                "id": "k8s",
                "action": "builtin.noop",
                "depends_on": ["srv"],
                "args": {"address": "${tasks.srv.result.ip}", "all": "${tasks.srv.result}"},
            },
        ]
    )
    run.accept()
    effects = step_and_run(run, "srv", {"ip": "10.0.0.7", "disks": [1, 2]})
    assert sent_args(effects)["k8s"] == {
        "address": "10.0.0.7",
        "all": {"ip": "10.0.0.7", "disks": [1, 2]},
    }
    assert run.task("k8s").args == sent_args(effects)["k8s"]
    assert run.task("k8s").spec.args["address"] == "${tasks.srv.result.ip}"  # as written


def test_a_result_holding_reference_text_is_passed_on_literally() -> None:
    run = Run(
        [
            noop("a"),
            {
                "id": "b",
                "action": "builtin.noop",
                "depends_on": ["a"],
                "args": {"x": "${tasks.a.result.t}"},
            },
        ]
    )
    run.accept()
    effects = step_and_run(run, "a", {"t": "${tasks.a.result}"})
    assert sent_args(effects)["b"] == {"x": "${tasks.a.result}"}


def test_a_path_missing_at_run_time_fails_the_task_naming_it() -> None:
    run = Run(
        [
            noop("a"),
            {
                "id": "b",
                "action": "builtin.noop",
                "depends_on": ["a"],
                "args": {"x": "${tasks.a.result.ip}"},
            },
        ],
        on_failure="continue",
    )
    run.accept()
    effects = step_and_run(run, "a", {"address": "10.0.0.1"})
    assert not effects.dispatches
    b = run.task("b")
    assert b.status == "failed" and b.reason == "bad_reference" and "ip" in (b.error or "")


def test_an_escaped_reference_is_literal_text() -> None:
    run = Run([{"id": "a", "action": "builtin.noop", "args": {"t": "$${tasks.x.result}"}}])
    effects = run.accept()
    assert sent_args(effects)["a"] == {"t": "${tasks.x.result}"}


@pytest.mark.parametrize(
    ("tasks", "words"),
    [
        (
            [noop("a"), {"id": "b", "action": "builtin.noop", "args": {"x": "${tasks.a.result}"}}],
            "does not depend",
        ),
        (
            [
                noop("a"),
                {
                    "id": "b",
                    "action": "builtin.noop",
                    "depends_on": ["a"],
                    "args": {"x": "${tasks.a.output}"},
                },
            ],
            "not a reference",
        ),
        (
            [
                noop("a"),
                {
                    "id": "b",
                    "action": "builtin.noop",
                    "depends_on": ["a"],
                    "args": {"x": "ip=${tasks.a.result.ip}"},
                },
            ],
            "whole value",
        ),
        ([{"id": "b", "action": "builtin.noop", "args": {"x": "${item}"}}], "for_each"),
        (
            [
                noop("a"),
                {"id": "b", "action": "builtin.noop", "depends_on": ["a"], "for_each": "a"},
            ],
            "reference",
        ),
        ([{"id": "b", "action": "builtin.noop", "parallelism": 3}], "parallelism"),
    ],
)
def test_bad_references_are_refused_at_submission_naming_the_task(
    tasks: list[dict[str, Any]], words: str
) -> None:
    definition = msgspec.convert({"name": "refs", "tasks": tasks}, WorkflowDefinition)
    with pytest.raises(DefinitionError) as refused:
        validate_definition(definition, {"builtin.noop"}, max_tasks=100)
    assert refused.value.task == "b" and refused.value.reason == "bad_reference"
    assert words in refused.value.message, refused.value.message


def test_a_reference_to_a_transitive_dependency_is_accepted() -> None:
    definition = msgspec.convert(
        {
            "name": "chain",
            "tasks": [
                noop("a"),
                noop("b", "a"),
                {
                    "id": "c",
                    "action": "builtin.noop",
                    "depends_on": ["b"],
                    "args": {"x": "${tasks.a.result}"},
                },
            ],
        },
        WorkflowDefinition,
    )
    validate_definition(definition, {"builtin.noop"}, max_tasks=100)


# -- fan-out ---------------------------------------------------------------------------------------


def fan_out(
    items_from: str = "${tasks.inventory.result.hosts}", **extra: Any
) -> list[dict[str, Any]]:
    return [
        noop("inventory"),
        {
            "id": "install",
            "action": "builtin.noop",
            "depends_on": ["inventory"],
            "for_each": items_from,
            "args": {"host": "${item.name}", "whole": "${item}"},
            **extra,
        },
        {
            "id": "report",
            "action": "builtin.noop",
            "depends_on": ["install"],
            "args": {"results": "${tasks.install.result}"},
        },
    ]


def hosts(n: int) -> dict[str, Any]:
    return {"hosts": [{"name": f"h{i}"} for i in range(n)]}


def test_a_for_each_task_runs_one_child_per_item_and_its_dependents_wait_for_all() -> None:
    run = Run(fan_out())
    run.accept()
    effects = step_and_run(run, "inventory", hosts(3))
    children = ["install[0]", "install[1]", "install[2]"]
    assert sorted(dispatched(effects)) == children
    assert sent_args(effects)["install[1]"] == {"host": "h1", "whole": {"name": "h1"}}
    assert run.task("install").status == "running" and run.task("install").children == 3
    assert run.task("install[2]").parent == "install"
    assert {(s.id, t) for s, t in effects.new_tasks} == {(run.wf, c) for c in children}
    state = run.engine.get(run.wf)
    assert state is not None and state.order == ["inventory", "install", *children, "report"]
    step_and_run(run, "install[0]", {"n": 0})
    effects = step_and_run(run, "install[2]", {"n": 2})
    assert "report" not in dispatched(effects)
    effects = step_and_run(run, "install[1]", {"n": 1})
    assert run.task("install").status == "completed"
    assert sent_args(effects)["report"] == {"results": [{"n": 0}, {"n": 1}, {"n": 2}]}


def test_parallelism_bounds_how_many_children_are_out_at_once() -> None:
    run = Run(fan_out(parallelism=3))
    run.accept()
    effects = step_and_run(run, "inventory", hosts(10))
    assert len(effects.dispatches) == 3
    done = 0
    out = set(dispatched(effects))
    while out:
        task_id = sorted(out)[0]
        out.discard(task_id)
        effects = step_and_run(run, task_id)
        done += 1
        out |= set(dispatched(effects)) - {"report"}
        assert len(out) <= 3
    assert done == 10 and run.task("install").status == "completed"


def test_an_empty_list_completes_the_fan_out_with_no_children() -> None:
    run = Run(fan_out())
    run.accept()
    effects = step_and_run(run, "inventory", hosts(0))
    assert run.task("install").status == "completed" and run.task("install").output == []
    assert run.task("install").children == 0
    assert sent_args(effects)["report"] == {"results": []}


def test_a_list_over_the_bound_fails_saying_so() -> None:
    run = Run(fan_out())
    run.engine.max_fanout = 5
    run.accept()
    step_and_run(run, "inventory", hosts(6))
    install = run.task("install")
    assert install.status == "failed" and install.reason == "too_many_items"
    assert "6 items" in (install.error or "") and "5" in (install.error or "")
    assert run.task("report").status == "skipped"


def test_a_failed_child_fails_the_fan_out_and_a_retry_reruns_only_it() -> None:
    run = Run(fan_out(), on_failure="continue")
    run.accept()
    step_and_run(run, "inventory", hosts(3))
    step_and_run(run, "install[0]")
    step_and_run(run, "install[1]", outcome="failed")
    step_and_run(run, "install[2]")
    assert run.statuses()["install"] == "failed"
    assert run.task("report").status == "skipped"
    assert run.record.status == "failed"
    assert run.retry(1)
    effects = run.step()
    assert dispatched(effects) == ["install[1]"]  # the completed children stay completed
    effects = step_and_run(run, "install[1]")
    assert run.task("install").status == "completed"
    assert dispatched(effects) == ["report"]


def test_under_stop_a_failed_child_cancels_the_children_not_started() -> None:
    run = Run(fan_out(parallelism=1))
    run.accept()
    step_and_run(run, "inventory", hosts(3))
    step_and_run(run, "install[0]", outcome="failed")
    assert [run.task(f"install[{i}]").status for i in range(3)] == [
        "failed",
        "cancelled",
        "cancelled",
    ]
    assert run.task("install").status == "failed" and run.record.status == "failed"


def test_cancel_reaches_the_children() -> None:
    run = Run(fan_out())
    run.accept()
    step_and_run(run, "inventory", hosts(2))
    run.started("install[0]")
    run.engine.cancel(run.wf, "by request", run.now)
    effects = run.step()
    assert sorted(effects.kills[run.wf]) == ["install[0]", "install[1]"]
    run.finished("install[0]", "cancelled", reason="cancelled")
    run.finished("install[1]", "cancelled", reason="cancelled")
    run.step()
    assert run.task("install").status == "cancelled" and run.record.status == "cancelled"


def test_an_expanded_fan_out_comes_back_from_checkpoints_without_new_children() -> None:
    run = Run(fan_out(parallelism=2))
    run.accept()
    step_and_run(run, "inventory", hosts(4))
    step_and_run(run, "install[0]")
    state = run.engine.get(run.wf)
    assert state is not None
    record = msgspec.convert(msgspec.to_builtins(state.record), type(state.record))
    tasks = {k: msgspec.convert(msgspec.to_builtins(v), TaskRecord) for k, v in state.tasks.items()}
    fresh = Engine(timeout_for=lambda spec: 60.0)
    fresh.set_capacity({"default": 10})
    busy = fresh.adopt(record, tasks, run.now)
    assert sorted(busy) == ["install[1]", "install[2]"]  # out with executors: checked, not re-sent
    fresh.pump(run.now)
    effects = fresh.take()
    assert not effects.new_tasks and not effects.dispatches  # 2 out, parallelism 2
