"""What a running task shows: progress (stdout lines and POSTs) in the API, the SSE stream and the
CLI monitor; logs streamed to JetStream, bounded, readable and followable; bounded results."""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

import pytest

from .support import (
    PROBE_ENV,
    VENV_BIN,
    Stack,
    submit,
    task_of,
    wait_until,
    workflow_events,
)

pytestmark = pytest.mark.e2e


@pytest.mark.stack(env=PROBE_ENV)
def test_progress_from_stdout_and_http_reaches_every_watcher(stack: Stack) -> None:
    wf_id = submit(
        stack.http, [{"id": "p", "action": "probe.progress", "args": {"hold_seconds": 4}}]
    )
    monitor = subprocess.Popen(
        [str(VENV_BIN / "provisioning"), "workflow", "monitor", wf_id],
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # while the task holds, the API shows the progress it POSTed through the gateway
        def posted() -> dict[str, Any] | None:
            task = stack.http.get(f"/workflows/{wf_id}")[1]["tasks"][0]
            return task if task["progress"] == 42 else None

        running = wait_until(posted, 20, what="progress 42 in GET /workflows/{id}")
        assert running["status"] == "running"
        assert running["progress_message"] == "posted over HTTP"
        assert task_of(stack.http, wf_id, "p")["progress"] == 42
        # and its output so far, though it prints nothing more while it holds
        wait_until(
            lambda: (
                "posted: true"
                in [e["line"] for e in stack.http.get(f"/tasks/{wf_id}.p/logs")[1]["lines"]]
            ),
            2,
            what="the lines printed so far in GET /tasks/{id}/logs",
        )
        assert task_of(stack.http, wf_id, "p")["status"] == "running"

        view = stack.http.wait_workflow(wf_id)
        assert view["status"] == "completed", view
        assert view["tasks"][0]["output"] == {"posted": True}
        assert view["tasks"][0]["progress"] == 100

        events = workflow_events(stack, wf_id)
        progress = [
            (d["task_id"], d["percent"], d["message"]) for k, d in events if k == "progress"
        ]
        assert progress == [
            ("p", 10, "from stdout"),
            ("p", 42, "posted over HTTP"),
            ("p", 90, "almost done"),
        ]
        assert [d["attempt"] for k, d in events if k == "progress"] == [1, 1, 1]

        out, err = monitor.communicate(timeout=30)
    finally:
        monitor.kill()
    assert monitor.returncode == 0, err
    for line in (
        "task p  10% from stdout",
        "task p  42% posted over HTTP",
        "task p  90% almost done",
        "task p completed",
        f"workflow {wf_id} completed",
    ):
        assert line in out, out


@pytest.mark.stack(env=PROBE_ENV)
def test_logs_follow_prints_lines_while_the_task_runs(stack: Stack) -> None:
    args = {"lines": 5, "width": 3, "pause_seconds": 0.8, "stderr_every": 2}
    wf_id = submit(stack.http, [{"id": "talk", "action": "probe.chatty", "args": args}])
    key = f"{wf_id}.talk"
    wait_until(lambda: task_of(stack.http, wf_id, "talk")["status"] == "running", 20)

    follow = subprocess.Popen(
        [str(VENV_BIN / "provisioning"), "task", "logs", key, "--follow"],
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[tuple[str, str]] = []  # (line, the task's status when it was printed)

    def read() -> None:
        assert follow.stdout is not None
        for line in follow.stdout:
            lines.append((line.rstrip("\n"), task_of(stack.http, wf_id, "talk")["status"]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        view = stack.http.wait_workflow(wf_id)
        assert view["status"] == "completed"
        ended = time.monotonic()
        # the follower notices the end promptly (not on a 15 s keepalive)
        assert follow.wait(timeout=10) == 0, follow.stderr.read() if follow.stderr else ""
        waited = time.monotonic() - ended
    finally:
        follow.kill()
    reader.join(5)
    assert [line for line, _ in lines] == [f"line {i} xxx" for i in range(1, 6)]
    assert lines[0][1] == "running", lines  # printed while the task was still running
    assert waited < 10

    status, logs = stack.http.get(f"/tasks/{key}/logs")
    assert status == 200
    assert [(e["stream"], e["line"]) for e in logs["lines"]] == [
        ("stderr" if i % 2 == 0 else "stdout", f"line {i} xxx") for i in range(1, 6)
    ]
    assert {e["attempt"] for e in logs["lines"]} == {1}

    # a task with no output at all: the answer is immediate and empty
    quiet = submit(stack.http, [{"id": "n", "action": "builtin.noop"}])
    stack.http.wait_workflow(quiet)
    status, logs = stack.http.get(f"/tasks/{quiet}.n/logs", timeout=5)
    assert status == 200 and logs["lines"] == []
    followed = stack.cli("task", "logs", f"{quiet}.n", "--follow", timeout=10)
    assert followed.returncode == 0 and followed.stdout == ""


@pytest.mark.stack(
    env={
        **PROBE_ENV,
        "PROVISIONING_EXECUTOR_LOG_LIMIT_BYTES": "2000",
        "PROVISIONING_EXECUTOR_RESULT_LIMIT_BYTES": "1000",
    }
)
def test_logs_and_results_are_bounded(stack: Stack) -> None:
    wf_id = submit(
        stack.http,
        [
            {"id": "flood", "action": "probe.chatty", "args": {"lines": 400, "width": 40}},
            {"id": "small", "action": "probe.result", "args": {"size": 500}},
            {"id": "huge", "action": "probe.result", "args": {"size": 5000}},
        ],
        on_failure="continue",
    )
    view = stack.http.wait_workflow(wf_id)
    by_id = {t["id"]: t for t in view["tasks"]}

    flood = by_id["flood"]
    assert flood["status"] == "completed" and flood["output"] == {"lines": 400}
    status, logs = stack.http.get(f"/tasks/{wf_id}.flood/logs")
    assert status == 200
    kept = [e for e in logs["lines"] if e["stream"] == "stdout"]
    assert kept and kept[0]["line"].startswith("line 1 ")
    assert sum(len(e["line"]) + 1 for e in kept) <= 2000
    assert len(kept) < 400
    assert logs["lines"][-1]["stream"] == "system"
    assert "log truncated" in logs["lines"][-1]["line"]
    assert "2000 bytes" in logs["lines"][-1]["line"]

    assert by_id["small"]["status"] == "completed"
    assert by_id["small"]["output"] == {"blob": "r" * 500}
    huge = by_id["huge"]
    assert huge["status"] == "failed" and huge["reason"] == "error", huge
    assert "over the 1000-byte limit" in huge["error"]
    assert huge["output"] is None
