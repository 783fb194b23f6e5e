"""Timeouts through the whole stack: at timeout_seconds every process of the task gets SIGTERM,
SIGKILL after the grace, the task fails with reason ``timeout``, and nothing is left running."""

from __future__ import annotations

import pytest

from .support import PROBE_ENV, Stack, submit, task_of, task_processes, wait_until

pytestmark = pytest.mark.e2e


@pytest.mark.stack(
    env={
        **PROBE_ENV,
        "PROVISIONING_EXECUTOR_ALLOW_COMMANDS": "1",
        "PROVISIONING_EXECUTOR_KILL_GRACE_SECONDS": "1",
    }
)
def test_timeout_kills_the_task_and_all_its_children(stack: Stack) -> None:
    wf_id = submit(
        stack.http,
        [
            # job-spawned children sit in process groups of their own; one ignores SIGTERM
            {
                "id": "nu",
                "action": "probe.spawn",
                "args": {"ignore_term": True},
                "timeout_seconds": 3,
                "retries": 0,
            },
            {
                "id": "sh",
                "action": "command.run",
                "args": {"argv": ["/bin/sh", "-c", "sleep 300 & sleep 300"]},
                "timeout_seconds": 3,
            },
        ],
        on_failure="continue",
    )

    def children(task: str, minimum: int) -> list[tuple[int, str]]:
        def enough() -> list[tuple[int, str]] | None:
            found = task_processes(f"{wf_id}.{task}")
            return found if sum("sleep 300" in cmd for _, cmd in found) >= minimum else None

        return list(wait_until(enough, 20, what=f"the children of {task}"))

    # nu, its foreground sleep and three job-spawned ones; sh and its two sleeps
    spawned = {"nu": children("nu", 4), "sh": children("sh", 2)}
    assert all(task_of(stack.http, wf_id, t)["status"] == "running" for t in spawned)

    view = stack.http.wait_workflow(wf_id)
    for task in view["tasks"]:
        assert task["status"] == "failed", task
        assert task["reason"] == "timeout"
        assert task["error"] == "timed out after 3s"
        assert task["attempt"] == 1
    for task in spawned:
        assert task_processes(f"{wf_id}.{task}") == [], task
