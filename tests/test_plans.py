"""Plan, apply, approve, compensate: on a real stack with the sample infra (local provider).

Each guarantee is broken on purpose: a plan must change nothing; an apply must be refused when
its targets, its infra or its age no longer fit; a gate must hold through a scheduler kill;
a compensation must undo in reverse order and undo nothing twice through a scheduler kill.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from core import INFRA_DIR

from .support import Stack, submit, task_of, wait_until

pytestmark = pytest.mark.e2e


def servers(stack: Stack, infra: str = "wuji") -> list[str]:
    """What exists, asked through the orchestrator (server.list is read-only)."""
    wf_id = submit(stack.http, [{"id": "ls", "action": "server.list", "args": {"infra": infra}}])
    view = stack.http.wait_workflow(wf_id)
    return sorted(s["hostname"] for s in view["tasks"][0]["output"]["servers"])


def make_plan(
    stack: Stack, path: str = "/workflows/servers/create?plan=true", body: Any = None
) -> dict[str, Any]:
    status, accepted = stack.http.post(path, body if body is not None else {"infra": "wuji"})
    assert status == 202 and accepted["status"] == "planning", accepted
    plan_id = accepted["plan_id"]

    def ready() -> dict[str, Any] | None:
        got = stack.http.get(f"/plans/{plan_id}")[1]
        return got if got["status"] != "planning" else None

    plan: dict[str, Any] = wait_until(ready, 60, 0.2, what="the plan")
    return plan


def test_plan_then_apply_then_plan_again_and_a_stale_plan_is_refused(stack: Stack) -> None:
    plan = make_plan(stack)
    assert plan["status"] == "ready" and plan["summary"] == {"create": 3}, plan
    assert [t["change"] for t in plan["tasks"]] == ["create"] * 3
    assert plan["definition_hash"] and set(plan["infra_hashes"]) == {"wuji"}
    assert servers(stack) == []  # a plan changes nothing

    status, applied = stack.http.post(f"/plans/{plan['plan_id']}/apply")
    assert status == 202, applied
    view = stack.http.wait_workflow(applied["workflow_id"])
    assert view["status"] == "completed" and view["mode"] == "apply", view
    assert servers(stack) == ["wuji-cp-1", "wuji-worker-1", "wuji-worker-2"]
    assert (
        stack.http.get(f"/plans/{plan['plan_id']}")[1]["applied_by"]["workflow_id"]
        == (applied["workflow_id"])
    )
    status, again = stack.http.post(f"/plans/{plan['plan_id']}/apply")
    assert status == 409 and "applied already" in again["error"]["message"], again

    second = make_plan(stack)
    assert second["summary"] == {"none": 3}, second

    # someone deletes a server after the plan was made: applying it is refused, nothing runs
    gone = submit(
        stack.http,
        [{"id": "rm", "action": "server.delete", "args": {"hostname": "wuji-worker-2"}}],
    )
    assert stack.http.wait_workflow(gone)["status"] == "completed"
    status, refused = stack.http.post(f"/plans/{second['plan_id']}/apply")
    assert status == 409 and refused["error"]["code"] == "plan_changed", refused
    changed = refused["error"]["details"]["changed"]
    assert [(c["task"], c["planned"], c["now"]) for c in changed] == [
        ("server-wuji-worker-2", "none", "create")
    ]
    assert servers(stack) == ["wuji-cp-1", "wuji-worker-1"]  # the refusal changed nothing


def test_plan_from_a_file_and_apply_through_the_cli(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "two.json"
    server = {"infra": "wuji", "server": {"hostname": "cli-1"}}
    containerd = {"infra": "wuji", "taskserv": "containerd", "server": "cli-1"}
    tasks = [
        {"id": "a", "action": "server.create", "args": server},
        {"id": "b", "action": "taskserv.create", "depends_on": ["a"], "args": containerd},
    ]
    path.write_text(json.dumps({"name": "two", "tasks": tasks}))
    planned = stack.cli("workflow", "plan", str(path))
    assert planned.returncode == 0, planned.stderr
    assert "create" in planned.stdout and "apply it: provisioning workflow apply" in planned.stdout
    plan_id = planned.stdout.split()[1]
    applied = stack.cli("workflow", "apply", plan_id, "--wait", "-o", "json")
    assert applied.returncode == 0, applied.stderr
    shortcut = stack.cli("server", "create", "--infra", "wuji", "--server", "wuji-cp-1", "--plan")
    assert shortcut.returncode == 0 and "create" in shortcut.stdout, shortcut.stdout
    assert "server-wuji-worker-1" not in shortcut.stdout


@pytest.mark.stack(env={"PROVISIONING_PLANS_MAX_AGE_SECONDS": "1"})
def test_an_old_plan_is_refused(stack: Stack) -> None:
    plan = make_plan(stack)
    time.sleep(1.2)  # the plan's age is the point of this test, not a wait for a condition
    status, refused = stack.http.post(f"/plans/{plan['plan_id']}/apply")
    assert status == 409 and refused["error"]["code"] == "plan_expired", refused


@pytest.fixture
def infra_copy(tmp_path: Path) -> Path:
    """The sample infra in a directory of its own (with the schemas its files import)."""
    shutil.copytree(INFRA_DIR.parent / "schemas", tmp_path / "copy" / "schemas")
    shutil.copytree(INFRA_DIR, tmp_path / "copy" / "infra")
    return tmp_path / "copy" / "infra"


def test_a_plan_whose_infra_file_changed_is_refused(tmp_path: Path, infra_copy: Path) -> None:
    from .support import running_stack

    env = {"PROVISIONING_ORCHESTRATOR_INFRA_DIR": str(infra_copy)}
    with running_stack(tmp_path / "stack", env=env) as stack:
        plan = make_plan(stack)
        settings = infra_copy / "wuji" / "settings.ncl"
        settings.write_text(settings.read_text() + "\n")
        status, refused = stack.http.post(f"/plans/{plan['plan_id']}/apply")
        assert status == 409 and refused["error"]["details"]["infra"] == ["wuji"], refused


# -- approvals ------------------------------------------------------------------------------------

USERS = '{"alice": "alice-token", "bob": "bob-token", "carol": "carol-token"}'
APPROVAL_ENV = {
    "PROVISIONING_GATEWAY_AUTH_TOKEN": "operator-token",
    "PROVISIONING_GATEWAY_USERS": USERS,
    "PROVISIONING_GATEWAY_ALLOW_SELF_APPROVAL": "false",
}


def as_user(stack: Stack, token: str) -> Any:
    from .support import Http

    return Http(stack.http.base, token=token)


def gated(name: str, approvers: list[str], timeout: float = 600) -> dict[str, Any]:
    return {
        "name": name,
        "approval": {"approvers": approvers, "timeout_seconds": timeout},
        "tasks": [{"id": "t", "action": "builtin.noop"}],
    }


@pytest.mark.stack(env=APPROVAL_ENV)
def test_approve_reject_self_approval_and_who_decided(stack: Stack) -> None:
    alice, bob, carol = (as_user(stack, f"{n}-token") for n in ("alice", "bob", "carol"))
    status, accepted = alice.post("/workflows", gated("approve-me", ["bob", "alice"]))
    assert status == 202
    wf_id = accepted["workflow_id"]
    wait_until(lambda: alice.get(f"/workflows/{wf_id}")[1]["status"] == "awaiting_approval")
    assert task_of(alice, wf_id, "t")["status"] == "pending"  # nothing runs before approval

    status, refused = alice.post(f"/workflows/{wf_id}/approve", {})
    assert status == 403 and "submitted this run" in refused["error"]["message"], refused
    status, refused = carol.post(f"/workflows/{wf_id}/approve", {})
    assert status == 403 and "not an approver" in refused["error"]["message"], refused
    status, ok = bob.post(f"/workflows/{wf_id}/approve", {"comment": "looks right"})
    assert status == 202 and ok["by"] == "bob", ok
    view = bob.wait_workflow(wf_id)
    assert view["status"] == "completed"
    assert [(a["decision"], a["by"]) for a in view["approvals"]] == [("approved", "bob")]
    events = stack.cli(
        "workflow", "status", wf_id, env={"PROVISIONING_ORCHESTRATOR_AUTH_TOKEN": "bob-token"}
    )
    assert events.returncode == 0, events.stderr

    _, accepted = alice.post("/workflows", gated("reject-me", []))
    wf_id = accepted["workflow_id"]
    wait_until(lambda: alice.get(f"/workflows/{wf_id}")[1]["status"] == "awaiting_approval")
    rejected = stack.cli(
        "workflow",
        "reject",
        wf_id,
        "--reason",
        "not this week",
        env={"PROVISIONING_ORCHESTRATOR_AUTH_TOKEN": "carol-token"},
    )
    assert rejected.returncode == 0, rejected.stderr
    view = alice.wait_workflow(wf_id)
    assert view["status"] == "cancelled" and view["tasks"][0]["attempt"] == 0, view
    assert view["approvals"][0]["decision"] == "rejected" and view["approvals"][0]["by"] == "carol"
    assert "not this week" in view["tasks"][0]["error"]


@pytest.mark.stack(env=APPROVAL_ENV)
def test_an_approval_that_times_out_cancels_the_run(stack: Stack) -> None:
    alice = as_user(stack, "alice-token")
    _, accepted = alice.post("/workflows", gated("slow-approver", ["bob"], timeout=1))
    view = alice.wait_workflow(accepted["workflow_id"], timeout=30)
    assert view["status"] == "cancelled", view
    assert view["approvals"][0]["decision"] == "timed_out"


@pytest.mark.stack(env=APPROVAL_ENV)
def test_a_task_gate_stops_the_run_before_that_task(stack: Stack) -> None:
    bob = as_user(stack, "bob-token")
    _, accepted = bob.post(
        "/workflows",
        {
            "name": "task-gate",
            "tasks": [
                {"id": "prepare", "action": "builtin.noop"},
                {
                    "id": "deploy",
                    "action": "builtin.noop",
                    "depends_on": ["prepare"],
                    "approval": {"approvers": ["alice"]},
                },
            ],
        },
    )
    wf_id = accepted["workflow_id"]
    wait_until(lambda: task_of(bob, wf_id, "deploy")["status"] == "awaiting_approval")
    assert task_of(bob, wf_id, "prepare")["status"] == "completed"
    assert bob.get(f"/workflows/{wf_id}")[1]["status"] == "awaiting_approval"
    approved = stack.cli(
        "workflow", "approve", wf_id, env={"PROVISIONING_ORCHESTRATOR_AUTH_TOKEN": "alice-token"}
    )
    assert approved.returncode == 0, approved.stderr
    assert bob.wait_workflow(wf_id)["status"] == "completed"
    assert task_of(bob, wf_id, "deploy")["approved_by"] == "alice"


@pytest.mark.slow
@pytest.mark.stack(env=APPROVAL_ENV)
def test_a_run_awaiting_approval_keeps_waiting_after_a_scheduler_kill(stack: Stack) -> None:
    alice, bob = as_user(stack, "alice-token"), as_user(stack, "bob-token")
    _, accepted = alice.post("/workflows", gated("survives", ["bob"]))
    wf_id = accepted["workflow_id"]
    wait_until(lambda: alice.get(f"/workflows/{wf_id}")[1]["status"] == "awaiting_approval")
    stack.scheduler.kill9()
    stack.scheduler.start()
    wait_until(stack.scheduler_active, 60, what="the scheduler to come back")
    assert alice.get(f"/workflows/{wf_id}")[1]["status"] == "awaiting_approval"
    assert task_of(alice, wf_id, "t")["attempt"] == 0
    assert bob.post(f"/workflows/{wf_id}/approve", {})[0] == 202
    assert alice.wait_workflow(wf_id)["status"] == "completed"


# -- compensation ----------------------------------------------------------------------------------


def four_steps(fail_last: bool = True, **extra: Any) -> dict[str, Any]:
    """Three servers, one after the other, then a fourth step that fails."""
    tasks: list[dict[str, Any]] = []
    for n in (1, 2, 3):
        tasks.append(
            {
                "id": f"s{n}",
                "action": "server.create",
                "args": {"infra": "wuji", "server": {"hostname": f"comp-{n}"}},
                "depends_on": [f"s{n - 1}"] if n > 1 else [],
            }
        )
    tasks.append(
        {
            "id": "step4",
            "action": "builtin.fail" if fail_last else "builtin.noop",
            "depends_on": ["s3"],
        }
    )
    return {"name": "compensate", "on_failure": "compensate", "tasks": tasks, **extra}


def test_a_failed_run_undoes_what_it_created_in_reverse_order(stack: Stack) -> None:
    _, accepted = stack.http.post("/workflows", four_steps())
    wf_id = accepted["workflow_id"]
    view = stack.http.wait_workflow(
        wf_id, ("completed", "failed", "cancelled", "compensation_failed")
    )
    assert view["status"] == "failed", view
    tasks = {t["id"]: t for t in view["tasks"]}
    undos = ["s1[undo]", "s2[undo]", "s3[undo]"]
    assert all(tasks[u]["status"] == "completed" for u in undos), tasks
    assert tasks["s3[undo]"]["action"] == "server.delete"
    assert tasks["s3[undo]"]["args"]["hostname"] == "comp-3"
    assert tasks["s1[undo]"]["compensates"] == "s1"
    starts = sorted((tasks[u]["started_at"], u) for u in undos)
    assert [u for _, u in starts] == ["s3[undo]", "s2[undo]", "s1[undo]"]
    assert servers(stack) == []
    assert "compensated" in view["error"]


def test_a_failing_compensation_leaves_compensation_failed_naming_what_is_held(
    stack: Stack,
) -> None:
    definition = four_steps()
    definition["tasks"][1]["compensate"] = {
        "action": "builtin.fail",
        "args": {"message": "cannot undo"},
        "retries": 0,
    }
    _, accepted = stack.http.post("/workflows", definition)
    terminal = ("completed", "failed", "cancelled", "compensation_failed")
    view = stack.http.wait_workflow(accepted["workflow_id"], terminal)
    assert view["status"] == "compensation_failed", view
    assert "still held by s1, s2" in view["error"], view["error"]  # s1's undo waits on s2's
    tasks = {t["id"]: t for t in view["tasks"]}
    assert tasks["s3[undo]"]["status"] == "completed"
    assert tasks["s1[undo]"]["status"] == "skipped"  # it comes after s2's undo
    assert stack.http.post(f"/workflows/{accepted['workflow_id']}/retry")[0] == 409


@pytest.mark.slow
@pytest.mark.stack(executors=2)
def test_a_scheduler_killed_during_compensation_finishes_it_and_deletes_nothing_twice(
    stack: Stack,
) -> None:
    definition = four_steps()
    for task in definition["tasks"][:3]:
        task["args"]["delay_seconds"] = 0.2
    definition["tasks"][2]["compensate"] = {
        "action": "server.delete",
        "args": {"hostname": "{args.server.hostname}", "infra": "wuji", "delay_seconds": 2},
    }
    _, accepted = stack.http.post("/workflows", definition)
    wf_id = accepted["workflow_id"]
    wait_until(
        lambda: stack.http.get(f"/workflows/{wf_id}?tasks=false")[1]["status"] == "compensating",
        what="the compensation",
    )
    wait_until(lambda: task_of(stack.http, wf_id, "s3[undo]")["status"] == "running")
    stack.scheduler.signal(signal.SIGKILL)
    if stack.scheduler.proc is not None:
        stack.scheduler.proc.wait()
    stack.scheduler.start()
    terminal = ("completed", "failed", "cancelled", "compensation_failed")
    view = stack.http.wait_workflow(wf_id, terminal, timeout=120)
    assert view["status"] == "failed", view
    tasks = {t["id"]: t for t in view["tasks"]}
    for undo in ("s1[undo]", "s2[undo]", "s3[undo]"):
        assert tasks[undo]["status"] == "completed" and tasks[undo]["attempt"] == 1, tasks[undo]
        assert tasks[undo]["output"]["deleted"] is True  # each deleted its server, once
    assert servers(stack) == []
