"""Control of workflows on a real stack: cancel, retry, listing with filters and pages, and
Idempotency-Key."""

from __future__ import annotations

import json
import threading
from datetime import datetime
from typing import Any

import pytest

from .support import Stack, logged_runs, stream_state, task_processes, wait_until

pytestmark = pytest.mark.e2e


def submit(stack: Stack, definition: dict[str, Any], **headers: str) -> str:
    status, reply = stack.http.post("/workflows", definition, headers=headers)
    assert status == 202, reply
    return str(reply["workflow_id"])


def tasks_of(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["id"]: t for t in view["tasks"]}


def test_cancel_stops_running_subprocesses_and_cancels_pending_tasks(stack: Stack) -> None:
    wf_id = submit(
        stack,
        {
            "name": "to-cancel",
            "tasks": [
                {
                    "id": "nu-long",  # a Nushell subprocess, busy for 60 s
                    "action": "server.create",
                    "args": {"infra": "c", "server": {"hostname": "c-1"}, "delay_seconds": 60},
                },
                {"id": "sleep-long", "action": "builtin.sleep", "args": {"seconds": 60}},
                {"id": "after", "action": "builtin.noop", "depends_on": ["nu-long"]},
                {"id": "after-after", "action": "builtin.noop", "depends_on": ["after"]},
                {  # waiting a minute before its second attempt
                    "id": "backing-off",
                    "action": "builtin.fail",
                    "retries": 3,
                    "backoff": {"initial_seconds": 60},
                },
            ],
        },
    )

    def running() -> bool:
        tasks = tasks_of(stack.http.get(f"/workflows/{wf_id}")[1])
        return (
            tasks["nu-long"]["status"] == tasks["sleep-long"]["status"] == "running"
            and tasks["backing-off"]["status"] == "retrying"
            and tasks["backing-off"]["next_attempt_at"] is not None
        )

    wait_until(running, what="both long tasks to run")
    wait_until(lambda: task_processes(f"{wf_id}.nu-long"), what="the nu process")

    status, reply = stack.http.post(f"/workflows/{wf_id}/cancel")
    assert status == 202 and reply["status"] == "cancelling", reply
    view = stack.http.wait_workflow(wf_id, timeout=20)
    assert view["status"] == "cancelled", json.dumps(view, indent=2)
    tasks = tasks_of(view)
    for task_id in ("nu-long", "sleep-long"):  # stopped while running
        assert tasks[task_id]["status"] == "cancelled", tasks[task_id]
        assert tasks[task_id]["reason"] == "cancelled"
        assert tasks[task_id]["attempt"] == 1 and tasks[task_id]["started_at"]
        assert tasks[task_id]["duration_seconds"] < 30
    for task_id in ("after", "after-after"):  # never started
        assert tasks[task_id]["status"] == "cancelled", tasks[task_id]
        assert tasks[task_id]["attempt"] == 0
    backing_off = tasks["backing-off"]  # its retry will not come
    assert backing_off["status"] == "cancelled" and backing_off["attempt"] == 1, backing_off
    assert backing_off["next_attempt_at"] is None
    assert task_processes(f"{wf_id}.nu-long") == []  # the subprocess (and its group) is gone
    assert view["cancel_requested"] is True

    status, reply = stack.http.post(f"/workflows/{wf_id}/cancel")
    assert status == 409 and reply["error"]["details"]["workflow_status"] == "cancelled"
    assert stack.http.post("/workflows/" + "0" * 32 + "/cancel")[0] == 404

    # cancelled as soon as it was submitted, before the scheduler even took it
    wf_id = submit(
        stack,
        {
            "name": "cancel-at-once",
            "tasks": [
                {"id": f"s{i}", "action": "builtin.sleep", "args": {"seconds": 60}}
                for i in range(5)
            ],
        },
    )
    assert stack.http.post(f"/workflows/{wf_id}/cancel")[0] == 202
    view = stack.http.wait_workflow(wf_id, timeout=20)
    assert view["status"] == "cancelled", view
    assert view["counts"] == {"cancelled": 5}
    assert all(t["duration_seconds"] is None or t["duration_seconds"] < 30 for t in view["tasks"])


def test_retry_reruns_only_failed_cancelled_and_skipped_tasks(stack: Stack) -> None:
    wf_id = submit(
        stack,
        {
            "name": "needs-a-server",
            "on_failure": "stop",
            "tasks": [
                {"id": "prep", "action": "builtin.noop"},
                {  # fails: taskserv.create needs the server, which does not exist yet
                    "id": "install",
                    "action": "taskserv.create",
                    "args": {"infra": "rt", "taskserv": "containerd", "server": "rt-srv-1"},
                    "depends_on": ["prep"],
                },
                {"id": "configure", "action": "builtin.noop", "depends_on": ["install"]},
                {
                    "id": "side",
                    "action": "builtin.sleep",
                    "args": {"seconds": 1.5},
                    "depends_on": ["prep"],
                },
                {"id": "late-side", "action": "builtin.noop", "depends_on": ["side"]},
            ],
        },
    )
    view = stack.http.wait_workflow(wf_id)
    assert view["status"] == "failed", json.dumps(view, indent=2)
    before = tasks_of(view)
    assert {k: t["status"] for k, t in before.items()} == {
        "prep": "completed",
        "install": "failed",
        "configure": "skipped",
        "side": "completed",  # running when install failed: on_failure "stop" let it finish
        "late-side": "cancelled",
    }
    assert "server rt-srv-1 does not exist" in before["install"]["error"]
    assert view["runs"] == 1
    # the summary (from the workflow's record alone) agrees with the tasks
    expected = {"completed": 2, "failed": 1, "skipped": 1, "cancelled": 1}
    summary = stack.http.get(f"/workflows/{wf_id}?tasks=false")[1]
    assert "tasks" not in summary and view["counts"] == summary["counts"] == expected
    assert summary["progress"] == view["progress"] == 40

    # the cause goes away: create the server, then retry the workflow
    server = submit(
        stack,
        {
            "name": "the-server",
            "tasks": [
                {
                    "id": "srv",
                    "action": "server.create",
                    "args": {"infra": "rt", "server": {"hostname": "rt-srv-1"}},
                }
            ],
        },
    )
    assert stack.http.wait_workflow(server)["status"] == "completed"
    status, reply = stack.http.post(f"/workflows/{wf_id}/retry")
    assert status == 202 and reply["run"] == 2, reply
    view = stack.http.wait_workflow(wf_id, statuses=("completed",), timeout=30)
    after = tasks_of(view)
    assert view["runs"] == 2 and view["error"] is None
    assert {k: t["status"] for k, t in after.items()} == dict.fromkeys(after, "completed")
    summary = stack.http.get(f"/workflows/{wf_id}?tasks=false")[1]
    assert summary["counts"] == {"completed": 5} and summary["progress"] == 100
    listed = {w["workflow_id"]: w for w in stack.http.get("/workflows")[1]["workflows"]}
    assert listed[wf_id]["counts"] == {"completed": 5}
    # completed tasks were not run again
    for task_id in ("prep", "side"):
        assert after[task_id]["attempt"] == 1 and len(after[task_id]["attempts"]) == 1
        assert after[task_id]["finished_at"] == before[task_id]["finished_at"]
        assert logged_runs(stack, wf_id, task_id) == [(1, "completed")]
    # the failed one has both attempts; skipped and cancelled ones ran for the first time
    assert [a["outcome"] for a in after["install"]["attempts"]] == ["failed", "completed"]
    assert after["install"]["attempt"] == 2
    assert logged_runs(stack, wf_id, "install", 2) == [(1, "failed"), (2, "completed")]
    for task_id in ("configure", "late-side"):
        assert after[task_id]["attempt"] == 1
        assert logged_runs(stack, wf_id, task_id) == [(1, "completed")]

    status, reply = stack.http.post(f"/workflows/{wf_id}/retry")
    assert status == 409, reply  # nothing left to retry
    assert stack.http.post("/workflows/" + "0" * 32 + "/retry")[0] == 404


def test_each_run_of_a_workflow_has_the_whole_retry_budget(stack: Stack) -> None:
    wf_id = submit(
        stack,
        {
            "name": "budget",
            "tasks": [
                {
                    "id": "flaky",
                    "action": "builtin.fail",
                    "retries": 1,
                    "backoff": {"initial_seconds": 0.1},
                }
            ],
        },
    )
    view = stack.http.wait_workflow(wf_id)
    assert view["status"] == "failed"
    assert [a["attempt"] for a in view["tasks"][0]["attempts"]] == [1, 2]  # one retry

    assert stack.http.post(f"/workflows/{wf_id}/retry")[0] == 202

    def second_run_ended() -> dict[str, Any] | None:
        found = stack.http.get(f"/workflows/{wf_id}")[1]
        return found if found["runs"] == 2 and found["status"] == "failed" else None

    view = wait_until(second_run_ended, 30, what="the second run to fail")
    task = view["tasks"][0]
    # the second run retried once again: attempts 3 and 4, not just 3
    assert [a["attempt"] for a in task["attempts"]] == [1, 2, 3, 4], task["attempts"]
    assert [a["outcome"] for a in task["attempts"]] == ["failed"] * 4


def test_list_filters_by_status_and_paginates(stack: Stack) -> None:
    ids = {"completed": [], "failed": []}  # type: dict[str, list[str]]
    for i in range(7):
        failed = i in (2, 5)
        action = "builtin.fail" if failed else "builtin.noop"
        wf_id = submit(stack, {"name": f"list-{i}", "tasks": [{"id": "t", "action": action}]})
        ids["failed" if failed else "completed"].append(wf_id)
    for wf_ids in ids.values():
        for wf_id in wf_ids:
            stack.http.wait_workflow(wf_id)
    everything = ids["completed"] + ids["failed"]

    def listed(query: str) -> list[dict[str, Any]]:
        status, page = stack.http.get(f"/workflows?{query}")
        assert status == 200, page
        return list(page["workflows"])

    assert sorted(w["workflow_id"] for w in listed("status=failed")) == sorted(ids["failed"])
    assert {w["status"] for w in listed("status=completed")} == {"completed"}
    assert len(listed("status=completed")) == 5
    assert len(listed("status=completed,failed")) == 7
    assert listed("status=running") == []
    assert [w["name"] for w in listed("name=list-3")] == ["list-3"]

    def walk(query: str, limit: int) -> tuple[list[str], list[int]]:
        seen: list[str] = []
        sizes: list[int] = []
        offset: int | None = 0
        while offset is not None:
            status, page = stack.http.get(f"/workflows?{query}&limit={limit}&offset={offset}")
            assert status == 200 and page["limit"] == limit and page["offset"] == offset, page
            seen += [w["workflow_id"] for w in page["workflows"]]
            sizes.append(len(page["workflows"]))
            offset = page["next_offset"]
        return seen, sizes

    seen, sizes = walk("", 3)
    assert sizes == [3, 3, 1]
    assert len(seen) == len(set(seen)) and set(seen) == set(everything)
    created = [
        datetime.fromisoformat(stack.http.get(f"/workflows/{i}")[1]["created_at"]) for i in seen
    ]
    assert created == sorted(created, reverse=True)  # newest first
    seen, sizes = walk("status=completed", 2)
    assert sizes == [2, 2, 1] and set(seen) == set(ids["completed"])
    seen, sizes = walk("status=failed", 2)
    assert sizes == [2] and set(seen) == set(ids["failed"])

    status, reply = stack.http.get("/workflows?status=exploded")
    assert status == 400, reply
    assert stack.http.get("/workflows?limit=abc")[0] == 400


def test_idempotency_key_returns_the_same_workflow_and_runs_it_once(stack: Stack) -> None:
    definition = {
        "name": "once",
        "tasks": [{"id": "work", "action": "builtin.sleep", "args": {"seconds": 0.5}}],
    }
    plain = {"name": "plain", "tasks": [{"id": "t", "action": "builtin.noop"}]}
    oldest = submit(stack, plain)
    before = stream_state(stack.nats.url, "PROV_COMMANDS")["last_seq"]
    replies: list[tuple[int, Any]] = []

    def post() -> None:
        replies.append(stack.http.post("/workflows", definition, headers={"Idempotency-Key": "k1"}))

    threads = [threading.Thread(target=post) for _ in range(5)]  # at the same time
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in replies] == [202] * 5, replies
    wf_ids = {reply["workflow_id"] for _, reply in replies}
    assert len(wf_ids) == 1, replies
    (wf_id,) = wf_ids
    assert sum(1 for _, reply in replies if reply.get("idempotent_replay")) >= 4, replies

    view = stack.http.wait_workflow(wf_id)
    assert view["status"] == "completed"
    # once it is done, the same key still answers with the same workflow, and runs nothing
    status, reply = stack.http.post("/workflows", definition, headers={"Idempotency-Key": "k1"})
    assert status == 202 and reply["workflow_id"] == wf_id, reply
    assert reply["status"] == "completed" and reply["idempotent_replay"] is True
    # a different key is a different workflow
    other = submit(stack, definition, **{"Idempotency-Key": "k2"})
    assert other != wf_id
    assert stack.http.wait_workflow(other)["status"] == "completed"

    assert stream_state(stack.nats.url, "PROV_COMMANDS")["last_seq"] == before + 2
    assert logged_runs(stack, wf_id, "work") == [(1, "completed")]
    assert tasks_of(stack.http.get(f"/workflows/{wf_id}")[1])["work"]["attempt"] == 1

    # workflows named by a key are listed in their place too: newest first
    newest = submit(stack, plain)
    stack.http.wait_workflow(newest)
    listed = [w["workflow_id"] for w in stack.http.get("/workflows")[1]["workflows"]]
    assert listed == [newest, other, wf_id, oldest]
    page = stack.http.get("/workflows?limit=2&offset=1")[1]
    assert [w["workflow_id"] for w in page["workflows"]] == [other, wf_id]
    assert page["next_offset"] == 3
