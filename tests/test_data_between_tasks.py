"""Results passed between tasks and fan-out over a result, on a real stack (and, for the
scheduler kill in the middle of an expansion, under make chaos)."""

from __future__ import annotations

import signal
from datetime import datetime
from typing import Any

import pytest

from .support import Stack, read_event_stream, submit, task_of, wait_until

pytestmark = pytest.mark.e2e


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def tasks_of(stack: Stack, wf_id: str) -> dict[str, dict[str, Any]]:
    return {t["id"]: t for t in stack.http.get(f"/workflows/{wf_id}")[1]["tasks"]}


def test_a_result_is_passed_on_resolved_at_dispatch_and_shown_in_the_record(stack: Stack) -> None:
    wf_id = submit(
        stack.http,
        [
            {
                "id": "srv1",
                "action": "server.create",
                "args": {"infra": "data", "server": {"hostname": "data-1"}},
            },
            {
                "id": "k8s",
                "action": "builtin.echo",
                "depends_on": ["srv1"],
                "args": {
                    "address": "${tasks.srv1.result.ip}",
                    "server": "${tasks.srv1.result}",
                    "literal": "$${tasks.srv1.result.ip}",
                },
            },
            {  # the echo's result holds reference text: passed on literally, never expanded
                "id": "after",
                "action": "builtin.echo",
                "depends_on": ["k8s"],
                "args": {"seen": "${tasks.k8s.result.literal}"},
            },
        ],
        name="data",
    )
    view = stack.http.wait_workflow(wf_id)
    assert view["status"] == "completed", view
    tasks = {t["id"]: t for t in view["tasks"]}
    ip = tasks["srv1"]["output"]["ip"]
    k8s = task_of(stack.http, wf_id, "k8s")
    assert k8s["args"]["address"] == ip and k8s["output"]["address"] == ip
    assert k8s["args"]["server"]["hostname"] == "data-1"
    assert k8s["args"]["literal"] == "${tasks.srv1.result.ip}"
    assert tasks["after"]["output"] == {"seen": "${tasks.srv1.result.ip}"}


def test_a_missing_path_at_run_time_fails_the_task_naming_it(stack: Stack) -> None:
    wf_id = submit(
        stack.http,
        [
            {"id": "a", "action": "builtin.echo", "args": {"address": "10.0.0.1"}},
            {
                "id": "b",
                "action": "builtin.echo",
                "depends_on": ["a"],
                "args": {"x": "${tasks.a.result.ip}"},
            },
        ],
    )
    view = stack.http.wait_workflow(wf_id)
    b = {t["id"]: t for t in view["tasks"]}["b"]
    assert view["status"] == "failed" and b["status"] == "failed", b
    assert b["reason"] == "bad_reference" and "ip" in b["error"] and b["attempt"] == 0, b


@pytest.mark.parametrize(
    ("args", "extra", "words"),
    [
        ({"x": "${tasks.z.result}"}, {}, "does not depend"),
        ({"x": "ip=${tasks.a.result.ip}"}, {"depends_on": ["a"]}, "whole value"),
        ({"x": "${tasks.a.result"}, {"depends_on": ["a"]}, "reference"),
        ({"x": "${item}"}, {"depends_on": ["a"]}, "for_each"),
    ],
)
def test_bad_references_are_refused_with_a_422_naming_task_and_reference(
    stack: Stack, args: dict[str, Any], extra: dict[str, Any], words: str
) -> None:
    status, reply = stack.http.post(
        "/workflows",
        {
            "name": "bad",
            "tasks": [
                {"id": "a", "action": "builtin.noop"},
                {"id": "z", "action": "builtin.noop"},
                {"id": "b", "action": "builtin.echo", "args": args, **extra},
            ],
        },
    )
    assert status == 422, reply
    details = reply["error"]["details"]
    assert details["task"] == "b" and details["reason"] == "bad_reference", reply
    assert words in reply["error"]["message"], reply


def inventory(n: int) -> dict[str, Any]:
    return {
        "id": "inventory",
        "action": "builtin.echo",
        "args": {"hosts": [{"name": f"h{i}", "seconds": 0.3} for i in range(n)]},
    }


def test_a_fan_out_over_fifty_items_never_runs_more_than_its_parallelism(stack: Stack) -> None:
    wf_id = submit(
        stack.http,
        [
            inventory(50),
            {
                "id": "install",
                "action": "builtin.sleep",
                "depends_on": ["inventory"],
                "for_each": "${tasks.inventory.result.hosts}",
                "parallelism": 5,
                "args": {"seconds": "${item.seconds}"},
            },
            {
                "id": "report",
                "action": "builtin.echo",
                "depends_on": ["install"],
                "args": {"results": "${tasks.install.result}"},
            },
        ],
        name="fan-out",
    )
    view = stack.http.wait_workflow(wf_id, timeout=90)
    assert view["status"] == "completed", view["error"]
    tasks = {t["id"]: t for t in view["tasks"]}
    children = [f"install[{i}]" for i in range(50)]
    assert [t["id"] for t in view["tasks"]] == ["inventory", "install", *children, "report"]
    assert tasks["install"]["children"] == 50 and tasks["install[7]"]["parent"] == "install"
    spans = [(ts(tasks[c]["started_at"]), ts(tasks[c]["finished_at"])) for c in children]
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    at_once = most = 0
    for _, step in edges:
        at_once += step
        most = max(most, at_once)
    assert most <= 5, most
    assert tasks["report"]["output"]["results"] == [{"slept": 0.3}] * 50
    events = read_event_stream(f"{stack.http.base}/workflows/{wf_id}/events")
    seen = {e.data["task_id"] for e in events if e.event == "task"}
    assert set(children) <= seen  # children appear in the events (SSE) too
    graph = stack.cli("workflow", "graph", wf_id)
    assert graph.returncode == 0 and "install[49]" in graph.stdout, graph.stderr


def test_a_failed_child_fails_the_run_and_a_retry_reruns_only_that_child(stack: Stack) -> None:
    hosts = [{"name": f"h{i}", "seconds": 0.05} for i in range(6)]
    hosts[3]["seconds"] = -1  # refused by builtin.sleep: this child fails
    wf_id = submit(
        stack.http,
        [
            {"id": "inventory", "action": "builtin.echo", "args": {"hosts": hosts}},
            {
                "id": "install",
                "action": "builtin.sleep",
                "depends_on": ["inventory"],
                "for_each": "${tasks.inventory.result.hosts}",
                "args": {"seconds": "${item.seconds}"},
            },
            {"id": "after", "action": "builtin.noop", "depends_on": ["install"]},
        ],
        name="fan-out-fails",
        on_failure="continue",
    )
    view = stack.http.wait_workflow(wf_id)
    tasks = {t["id"]: t for t in view["tasks"]}
    assert view["status"] == "failed"
    assert tasks["install[3]"]["status"] == "failed" and tasks["install"]["status"] == "failed"
    assert tasks["after"]["status"] == "skipped"
    assert all(tasks[f"install[{i}]"]["status"] == "completed" for i in (0, 1, 2, 4, 5))
    assert stack.http.post(f"/workflows/{wf_id}/retry")[0] == 202

    def second_run_ended() -> bool:
        summary = stack.http.get(f"/workflows/{wf_id}?tasks=false")[1]
        return summary["runs"] == 2 and summary["status"] in ("completed", "failed")

    wait_until(second_run_ended, what="the retried run to end")
    again = tasks_of(stack, wf_id)
    assert again["install[3]"]["attempt"] == 2  # re-run
    assert all(again[f"install[{i}]"]["attempt"] == 1 for i in (0, 1, 2, 4, 5))  # not re-run


def test_an_empty_list_completes_the_fan_out_with_no_children(stack: Stack) -> None:
    wf_id = submit(
        stack.http,
        [
            inventory(0),
            {
                "id": "install",
                "action": "builtin.noop",
                "depends_on": ["inventory"],
                "for_each": "${tasks.inventory.result.hosts}",
            },
            {"id": "after", "action": "builtin.noop", "depends_on": ["install"]},
        ],
    )
    view = stack.http.wait_workflow(wf_id)
    tasks = {t["id"]: t for t in view["tasks"]}
    assert view["status"] == "completed" and tasks["install"]["output"] == []
    assert tasks["install"]["children"] == 0 and len(view["tasks"]) == 3


@pytest.mark.stack(env={"PROVISIONING_SCHEDULER_MAX_FANOUT": "10"})
def test_a_list_over_the_bound_fails_saying_so(stack: Stack) -> None:
    wf_id = submit(
        stack.http,
        [
            inventory(11),
            {
                "id": "install",
                "action": "builtin.noop",
                "depends_on": ["inventory"],
                "for_each": "${tasks.inventory.result.hosts}",
            },
        ],
    )
    install = {t["id"]: t for t in stack.http.wait_workflow(wf_id)["tasks"]}["install"]
    assert install["status"] == "failed" and install["reason"] == "too_many_items", install
    assert "11 items" in install["error"] and "10" in install["error"]


@pytest.mark.slow
@pytest.mark.stack(executors=2)
def test_a_scheduler_killed_mid_expansion_creates_no_child_twice_and_loses_none(
    stack: Stack,
) -> None:
    runs = []
    for trial in range(3):
        wf_id = submit(
            stack.http,
            [
                inventory(300),
                {
                    "id": "install",
                    "action": "builtin.noop",
                    "depends_on": ["inventory"],
                    "for_each": "${tasks.inventory.result.hosts}",
                    "parallelism": 20,
                },
            ],
            name=f"kill-{trial}",
        )
        wait_until(
            lambda wf=wf_id: task_of(stack.http, wf, "inventory")["status"] == "completed",
            what="the inventory",
        )
        stack.scheduler.signal(signal.SIGKILL)  # in the middle of expanding and feeding
        if stack.scheduler.proc is not None:
            stack.scheduler.proc.wait()
        stack.scheduler.start()
        runs.append(wf_id)
    for wf_id in runs:
        view = stack.http.wait_workflow(wf_id, timeout=120)
        assert view["status"] == "completed", view["error"]
        ids = [t["id"] for t in view["tasks"]]
        assert len(ids) == len(set(ids)) == 302
        assert all(t["attempt"] == 1 for t in view["tasks"] if t["id"].startswith("install["))
