"""Executors run only registered actions, pass arguments as data, run plain commands only when
allowed, and hand the task a clean environment: real NATS, services and ``nu`` processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from core import NULIB_DIR

from .support import (
    FIXTURES,
    PROBE_ENV,
    Stack,
    executor_id,
    injection_payloads,
    start_executor,
    submit,
)

pytestmark = pytest.mark.e2e

SECRETS = {
    "PROVISIONING_GATEWAY_AUTH_TOKEN": "s3cret-token-value",
    "MY_SECRET": "my-secret-value",
}
TASK_ENV = {
    "PATH",
    "LANG",
    "HOME",
    "TMPDIR",
    "NU_LIB_DIRS",
    "PROVISIONING_DATA_DIR",
    "PROVISIONING_RESULT_FILE",
    "PROVISIONING_TASK_ID",
    "PROVISIONING_WORKFLOW_ID",
    "PROVISIONING_ATTEMPT",
    "PROVISIONING_GATEWAY_URL",
    "PROVISIONING_TASK_TOKEN",  # auth is on in that stack: the task's capability token
    "TRACEPARENT",
}


@pytest.mark.stack(env=PROBE_ENV)
def test_executor_refuses_an_action_missing_from_its_registry(stack: Stack) -> None:
    """The gateway and scheduler know probe.* but this executor's registry does not: it
    refuses the task instead of resolving the name anywhere else."""
    start_executor(stack, "--pool", "old", env={"PROVISIONING_NUSHELL_REGISTRY": ""})
    wf_id = submit(
        stack.http,
        [{"id": "p", "action": "probe.echo", "args": {"text": "hi"}, "pool": "old", "retries": 2}],
    )
    view = stack.http.wait_workflow(wf_id)
    task = view["tasks"][0]
    assert view["status"] == "failed", view
    assert task["reason"] == "refused", task
    assert task["error"] == "unknown action 'probe.echo'"
    assert task["attempt"] == 1  # a refusal is final: no retry
    assert task["output"] is None

    # an action no registry knows is refused at the door
    status, body = stack.http.post(
        "/workflows", {"name": "x", "tasks": [{"id": "a", "action": "probe.nothing"}]}
    )
    assert status == 422, body
    assert body["error"]["details"]["reason"] == "unknown_action"


@pytest.mark.stack(env=PROBE_ENV)
def test_arguments_stay_data_through_the_whole_stack(stack: Stack, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payloads = injection_payloads(marker)
    labels = {f"label{i}": p for i, p in enumerate(payloads)}
    tasks = [
        {
            "id": "labels",
            "action": "server.create",
            "args": {
                "infra": "wuji",
                "delay_seconds": 0,
                "server": {"hostname": "inject-1", "labels": labels, "plan": payloads[1]},
            },
        },
        {"id": "echo", "action": "probe.echo", "args": {"text": payloads[0], "all": payloads}},
    ]
    tasks += [
        {
            "id": f"host{i}",
            "action": "server.create",
            "args": {"infra": "wuji", "delay_seconds": 0, "server": {"hostname": payload}},
        }
        for i, payload in enumerate(payloads)
    ]
    wf_id = submit(stack.http, tasks, on_failure="continue")
    view = stack.http.wait_workflow(wf_id)
    by_id = {t["id"]: t for t in view["tasks"]}

    created = by_id["labels"]
    assert created["status"] == "completed", created
    assert created["output"]["labels"] == labels
    assert created["output"]["plan"] == payloads[1]

    echo = by_id["echo"]
    assert echo["output"] == {"args": {"text": payloads[0], "all": payloads}}
    status, logs = stack.http.get(f"/tasks/{wf_id}.echo/logs")
    assert status == 200
    assert [e["line"] for e in logs["lines"]] == [f"text: {payloads[0]}"]

    for i, payload in enumerate(payloads):
        task = by_id[f"host{i}"]
        assert task["status"] == "failed", (payload, task)
        assert task["reason"] == "exit_code"
        assert "invalid server.hostname" in task["error"]
    assert not marker.exists()


@pytest.mark.stack(env={**PROBE_ENV, **SECRETS})
def test_task_environment_and_plain_commands(stack: Stack) -> None:
    """A task sees the protocol's variables and nothing of its executor's environment; plain
    commands run only on an executor that allows them."""
    allowed = start_executor(
        stack, "--pool", "cmd", env={"PROVISIONING_EXECUTOR_ALLOW_COMMANDS": "1"}
    )
    wf_id = submit(
        stack.http,
        [
            {"id": "probe", "action": "probe.env"},
            {"id": "env", "action": "command.run", "args": {"argv": ["env"]}, "pool": "cmd"},
            {"id": "refused", "action": "command.run", "args": {"argv": ["env"]}},
        ],
        on_failure="continue",
    )
    view = stack.http.wait_workflow(wf_id)
    by_id = {t["id"]: t for t in view["tasks"]}
    trace_id = view["trace_id"]
    assert trace_id

    def check(environ: list[str], task_id: str) -> None:
        env = dict(item.split("=", 1) for item in environ)
        assert set(env) == TASK_ENV, set(env) ^ TASK_ENV
        assert env["PROVISIONING_TASK_ID"] == f"{wf_id}.{task_id}"
        assert env["PROVISIONING_WORKFLOW_ID"] == wf_id
        assert env["PROVISIONING_ATTEMPT"] == "1"
        assert env["PROVISIONING_GATEWAY_URL"] == stack.env["PROVISIONING_ORCHESTRATOR_ENDPOINT"]
        assert env["TRACEPARENT"].split("-")[1] == trace_id  # the workflow's one trace
        assert env["PROVISIONING_DATA_DIR"] == str(stack.data_dir / "provider")
        dump = "\n".join(environ)
        for secret in SECRETS.values():
            assert secret not in dump
        assert stack.nats.url not in dump

    probe = by_id["probe"]
    assert probe["status"] == "completed", probe
    check(probe["output"]["environ"], "probe")
    assert probe["output"]["environ"][0].startswith("PATH=")
    lib_dirs = [str((FIXTURES / "nulib").resolve()), str(NULIB_DIR.resolve())]
    assert "NU_LIB_DIRS=" + ":".join(lib_dirs) in probe["output"]["environ"]

    env_task = by_id["env"]
    assert env_task["status"] == "completed", env_task
    assert env_task["executor_id"] == executor_id(stack, allowed)
    status, logs = stack.http.get(f"/tasks/{wf_id}.env/logs")
    assert status == 200
    check([e["line"] for e in logs["lines"]], "env")

    refused = by_id["refused"]
    assert refused["status"] == "failed" and refused["reason"] == "refused", refused
    assert "allow_commands" in refused["error"]
    status, logs = stack.http.get(f"/tasks/{wf_id}.refused/logs")
    assert status == 200 and logs["lines"] == []  # nothing ran
