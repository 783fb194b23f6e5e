"""The whole path, for real: gateway -> JetStream -> scheduler -> executor -> nu -> result."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from .support import NatsServer, Stack, caught_signals, wait_until

pytestmark = pytest.mark.e2e


def test_server_create_runs_nushell_and_completes(stack: Stack) -> None:
    status, accepted = stack.http.post("/workflows/servers/create", {"infra": "wuji"})
    assert status == 202, accepted
    assert accepted["status"] == "queued"
    wf_id = accepted["workflow_id"]

    view = stack.http.wait_workflow(wf_id)
    assert view["status"] == "completed", json.dumps(view, indent=2)
    hosts = sorted(t["output"]["hostname"] for t in view["tasks"])
    assert hosts == ["wuji-cp-1", "wuji-worker-1", "wuji-worker-2"]
    for task in view["tasks"]:
        assert task["status"] == "completed"
        assert task["exit_code"] == 0
        assert task["attempt"] == 1
        assert task["output"]["provider"] == "local"
        assert task["executor_id"]
        assert task["started_at"] and task["finished_at"]
    assert view["trace_id"]

    task_id = view["tasks"][0]["task_id"]
    status, task = stack.http.get(f"/tasks/{task_id}")
    assert status == 200
    assert task["status"] == "completed" and task["output"] == view["tasks"][0]["output"]

    status, logs = stack.http.get(f"/tasks/{task_id}/logs")
    assert status == 200
    assert any(line["line"].startswith("PROGRESS: 100") for line in logs["lines"]), logs

    # the local provider kept the records under the data dir: direct mode lists them
    listed = stack.cli("server", "list", "--direct", "--output", "json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(s["hostname"] for s in json.loads(listed.stdout)) == hosts


def test_accepted_before_any_work_runs(stack: Stack) -> None:
    """The 202 comes back before the task has even started."""
    status, accepted = stack.http.post(
        "/workflows",
        {"name": "slow", "tasks": [{"id": "s", "action": "builtin.sleep", "args": {"seconds": 2}}]},
    )
    assert status == 202
    status, view = stack.http.get(f"/workflows/{accepted['workflow_id']}")
    assert status == 200 and view["status"] in ("queued", "running")
    assert stack.http.wait_workflow(accepted["workflow_id"])["status"] == "completed"


def test_cli_orchestrated_wait_and_status(stack: Stack) -> None:
    run = stack.cli("server", "create", "--infra", "wuji", "--orchestrated", "--wait")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "completed" in run.stdout
    wf_id = run.stdout.split("workflow ", 1)[1].split()[0]

    status = stack.cli("workflow", "status", wf_id, "--output", "json")
    assert status.returncode == 0, status.stderr
    view = json.loads(status.stdout)
    assert view["workflow_id"] == wf_id and view["status"] == "completed"

    table = stack.cli("workflow", "status", wf_id)
    assert "server-wuji-cp-1" in table.stdout and "completed" in table.stdout


def test_failed_action_reports_error(stack: Stack) -> None:
    status, accepted = stack.http.post(
        "/workflows/servers/create",
        {"infra": "wuji", "params": {"fail": "no capacity in zone", "retries": 0}},
    )
    assert status == 202
    view = stack.http.wait_workflow(accepted["workflow_id"])
    assert view["status"] == "failed"
    for task in view["tasks"]:
        assert task["status"] == "failed"
        assert task["reason"] == "exit_code" and task["exit_code"] != 0
        assert "no capacity in zone" in task["error"]


def test_health_reports_nats_down_then_recovers(stack: Stack) -> None:
    assert stack.http.get("/health")[1]["status"] == "healthy"
    stack.nats.stop()
    status, body = wait_until(
        lambda: (r := stack.http.get("/health", timeout=5)) and r[0] == 503 and r, 20
    )
    assert body["status"] == "unhealthy"
    stack.nats.start()  # same port, same store
    stack.http.wait_healthy(30)
    status, accepted = stack.http.post(
        "/workflows", {"name": "after", "tasks": [{"id": "n", "action": "builtin.noop"}]}
    )
    assert status == 202
    assert stack.http.wait_workflow(accepted["workflow_id"])["status"] == "completed"


def test_services_stop_cleanly_on_sigterm(stack: Stack) -> None:
    for service in stack.services:
        service.signal(signal.SIGTERM)
    for service in stack.services:
        assert service.proc is not None
        assert service.proc.wait(30) == 0, service.log()[-3000:]


@pytest.mark.parametrize("delay_s", [0.1, 0.6])
def test_sigterm_while_starting_is_a_clean_stop(
    tmp_path: Path, nats_server: NatsServer, delay_s: float
) -> None:
    """A supervisor may stop a service that is still importing, configuring or connecting:
    that is a clean stop too (exit 0), not death by signal."""
    stack = Stack(tmp_path, nats_server)
    services = stack.services
    for service in services:
        service.start()
    for service in services:  # the interpreter is up (it catches SIGINT): the service's code runs
        assert service.proc is not None
        wait_until(lambda s=service: signal.SIGINT in caught_signals(s.proc.pid), 10)  # type: ignore[union-attr]
    time.sleep(delay_s)
    for service in services:
        service.signal(signal.SIGTERM)
    for service in services:
        assert service.proc is not None
        assert service.proc.wait(30) == 0, service.log()[-3000:]


def test_health_names_the_active_scheduler(stack: Stack) -> None:
    scheduler = stack.http.get("/health")[1]["scheduler"]
    assert scheduler["active"] is True
    assert scheduler["holder"] and scheduler["since"]
    assert 0 <= scheduler["renewed_seconds_ago"] < 6
    cli = stack.cli("health")
    assert f"scheduler: active ({scheduler['holder']})" in cli.stdout

    assert stack.scheduler.stop() == 0  # a graceful stop releases the lease at once
    wait_until(lambda: not stack.scheduler_active(), 5, what="the lease to be released")
    status, body = stack.http.get("/health")
    assert status == 200 and body["scheduler"] == {"active": False}  # the gateway still serves
    assert "scheduler: none active" in stack.cli("health").stdout

    stack.scheduler.start()
    wait_until(stack.scheduler_active, 30, what="the restarted scheduler to take the lease")
    assert stack.http.get("/health")[1]["scheduler"]["holder"] != scheduler["holder"]
