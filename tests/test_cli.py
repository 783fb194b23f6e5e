"""The `provisioning` CLI as a user runs it: real processes, real stack, output parsed back."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest

from .support import VENV_BIN, Stack, free_port, wait_until

pytestmark = pytest.mark.e2e
CLI = str(VENV_BIN / "provisioning")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROVISIONING_", "NATS_URL"))}
    env.update(
        XDG_CONFIG_HOME=str(tmp_path / "xdg"),
        XDG_STATE_HOME=str(tmp_path / "xdg-state"),
        PROVISIONING_ORCHESTRATOR_DATA_DIR=str(tmp_path / "data"),
        PROVISIONING_ORCHESTRATOR_ENDPOINT=f"http://127.0.0.1:{free_port()}",  # nothing there
        PROVISIONING_ORCHESTRATOR_AUTO_START="false",  # unless a test says so
    )
    env.update(extra)  # a test's own values win (passed with the defaults: a TypeError)
    return env


def _run(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# -- direct mode, no orchestrator anywhere ---------------------------------------------------


def test_direct_mode_create_list_delete(tmp_path: Path) -> None:
    env = _env(tmp_path)
    created = _run(env, "server", "create", "--infra", "wuji", "--direct", "--output", "json")
    assert created.returncode == 0, created.stderr
    body = json.loads(created.stdout)
    assert body["mode"] == "direct" and body["status"] == "completed"
    assert body["tasks"]["server-wuji-cp-1"]["output"]["hostname"] == "wuji-cp-1"

    listed = _run(env, "server", "list", "--output", "json")  # *.list runs direct by default
    assert listed.returncode == 0, listed.stderr
    assert sorted(s["hostname"] for s in json.loads(listed.stdout)) == [
        "wuji-cp-1",
        "wuji-worker-1",
        "wuji-worker-2",
    ]
    table = _run(env, "server", "list")
    assert "hostname" in table.stdout and "wuji-worker-2" in table.stdout

    deleted = _run(env, "server", "delete", "wuji-worker-2", "--direct")
    assert deleted.returncode == 0, deleted.stderr
    after = json.loads(_run(env, "server", "list", "-o", "json").stdout)
    assert "wuji-worker-2" not in {s["hostname"] for s in after}


def test_direct_failure_exits_nonzero(tmp_path: Path) -> None:
    result = _run(
        _env(tmp_path), "server", "create", "--direct", "-p", "fail=disk full", "-p", "retries=0"
    )
    assert result.returncode == 1
    assert "disk full" in result.stdout


def test_fallback_to_direct_says_so(tmp_path: Path) -> None:
    result = _run(_env(tmp_path), "server", "create", "--infra", "wuji", "--server", "wuji-cp-1")
    assert result.returncode == 0, result.stderr
    assert (
        "no orchestrator answers" in result.stderr
        and "running server.create directly" in result.stderr
    )
    assert "completed (direct)" in result.stdout


def test_no_fallback_is_a_clear_error(tmp_path: Path) -> None:
    env = _env(tmp_path, PROVISIONING_EXECUTION_FALLBACK_TO_DIRECT="false")
    result = _run(env, "server", "create")
    assert result.returncode == 3
    assert "no orchestrator answers" in _one_line_error(result)
    explicit = _run(_env(tmp_path), "server", "create", "--orchestrated")
    assert explicit.returncode == 3
    _one_line_error(explicit)


def test_user_errors_are_one_line_with_distinct_codes(tmp_path: Path) -> None:
    env = _env(tmp_path)
    bad_ext = tmp_path / "w.txt"
    bad_ext.write_text("{}")
    result = _run(env, "workflow", "submit", str(bad_ext))
    assert result.returncode == 2 and "unknown extension" in result.stderr
    bad_infra = _run(env, "server", "create", "--infra", "nope", "--direct")
    assert bad_infra.returncode == 4
    assert "unknown infra 'nope'" in _one_line_error(bad_infra)
    bad_config = _run({**env, "PROVISIONING_GATEWAY_PORT": "x"}, "env")
    assert bad_config.returncode == 6
    _one_line_error(bad_config)


def test_env_shows_sources_and_masks_secrets(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[executor]\nmax_concurrent_tasks = 7\n")
    env = _env(tmp_path, PROVISIONING_GATEWAY_AUTH_TOKEN="s3cret-token")
    result = _run(env, "--config", str(config), "env", "--output", "json")
    assert result.returncode == 0, result.stderr
    rows = {r["key"]: r for r in json.loads(result.stdout)}
    assert rows["executor.max_concurrent_tasks"] == {
        "key": "executor.max_concurrent_tasks",
        "value": 7,
        "source": f"file:{config}",
    }
    assert rows["gateway.auth_token"]["source"] == "env:PROVISIONING_GATEWAY_AUTH_TOKEN"
    assert rows["gateway.auth_token"]["value"] == "********"
    assert rows["gateway.port"]["source"] == "default"
    assert "s3cret-token" not in result.stdout
    endpoint = _run(env, "--endpoint", "http://x:1", "env", "-o", "json")
    assert {r["key"]: r for r in json.loads(endpoint.stdout)}["orchestrator.endpoint"][
        "source"
    ] == "flag"


def test_completion_scripts(tmp_path: Path) -> None:
    for shell, marker in (
        ("bash", "complete "),
        ("zsh", "#compdef provisioning"),
        ("fish", "complete "),
    ):
        result = _run(_env(tmp_path), "completion", shell)
        assert result.returncode == 0 and marker in result.stdout


# -- orchestrated and workflow modes ---------------------------------------------------------


def test_orchestrated_json_output_is_only_json(stack: Stack) -> None:
    result = stack.cli("server", "create", "--orchestrated", "--wait", "--output", "json")
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)  # nothing else on stdout
    assert view["status"] == "completed" and len(view["tasks"]) == 3

    for args in (
        ["health", "-o", "json"],
        ["version", "-o", "json"],
        ["workflow", "list", "-o", "json"],
        ["workflow", "status", view["workflow_id"], "-o", "json"],
        ["task", "show", view["tasks"][0]["task_id"], "-o", "json"],
        ["task", "logs", view["tasks"][0]["task_id"], "-o", "json"],
        ["trace", view["workflow_id"], "-o", "json"],
        ["orchestrator", "status", "-o", "json"],
    ):
        out = stack.cli(*args)
        assert out.returncode == 0, (args, out.stderr)
        json.loads(out.stdout)
    version = json.loads(stack.cli("version", "-o", "json").stdout)
    assert version["compatible"] is True and version["api"] == "v1"
    listed = json.loads(stack.cli("workflow", "list", "-o", "json").stdout)
    assert view["workflow_id"] in {w["workflow_id"] for w in listed["workflows"]}


def test_workflow_submit_monitor_graph_logs(stack: Stack, tmp_path: Path) -> None:
    definition = {
        "name": "cli-demo",
        "tasks": [
            {
                "id": "a",
                "action": "server.create",
                "args": {"infra": "cli", "server": {"hostname": "cli-1"}, "delay_seconds": 0.5},
            },
            {"id": "b", "action": "builtin.sleep", "args": {"seconds": 0.2}},
            {
                "id": "c",
                "action": "taskserv.create",
                "args": {"infra": "cli", "taskserv": "containerd", "server": "cli-1"},
                "depends_on": ["a", "b"],
            },
        ],
    }
    file = tmp_path / "wf.json"
    file.write_text(json.dumps(definition))
    submitted = stack.cli("workflow", "submit", str(file), "-o", "json")
    assert submitted.returncode == 0, submitted.stderr
    wf_id = json.loads(submitted.stdout)["workflow_id"]

    monitor = stack.cli("workflow", "monitor", wf_id)  # stdout is a pipe: plain lines
    assert monitor.returncode == 0, monitor.stderr
    assert "\x1b" not in monitor.stdout
    assert f"workflow {wf_id} completed" in monitor.stdout
    assert "task a  10%" in monitor.stdout or "task a 10%" in monitor.stdout.replace("  ", " ")
    assert "task c completed" in monitor.stdout

    text = stack.cli("workflow", "graph", wf_id).stdout
    assert "a [completed]" in text and "└─ c [completed]" in text
    mermaid = stack.cli("workflow", "graph", wf_id, "--format", "mermaid").stdout
    assert mermaid.startswith("graph TD") and "a --> c" in mermaid
    dot = stack.cli("workflow", "graph", wf_id, "--format", "dot").stdout
    assert dot.startswith("digraph") and '"b" -> "c"' in dot

    logs = stack.cli("task", "logs", f"{wf_id}.a")
    assert "PROGRESS: 100" in logs.stdout

    batch = stack.cli("batch", "submit", str(file), "--wait")
    assert batch.returncode == 0, batch.stderr
    assert "completed" in batch.stdout


def test_failed_workflow_wait_exits_nonzero_with_summary(stack: Stack) -> None:
    result = stack.cli(
        "server",
        "create",
        "--server",
        "wuji-cp-1",
        "-p",
        "fail=quota exceeded",
        "-p",
        "retries=0",
        "--wait",
    )
    assert result.returncode == 1
    assert "failed" in result.stdout
    assert "error: exited with code 1: quota exceeded" in result.stdout
    assert "| " in result.stdout  # the log tail of the failed task


def test_cancel_and_retry(stack: Stack, tmp_path: Path) -> None:
    file = tmp_path / "slow.yaml"
    file.write_text(
        "name: slow\ntasks:\n  - id: s\n    action: builtin.sleep\n    args: {seconds: 30}\n"
    )
    wf_id = json.loads(stack.cli("workflow", "submit", str(file), "-o", "json").stdout)[
        "workflow_id"
    ]
    wait_until(lambda: stack.http.get(f"/workflows/{wf_id}")[1]["status"] == "running", 30)
    cancelled = stack.cli("workflow", "cancel", wf_id, "-o", "json")
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["status"] == "cancelling"
    assert stack.http.wait_workflow(wf_id)["status"] == "cancelled"
    again = stack.cli("workflow", "cancel", wf_id)
    assert again.returncode == 4 and "already cancelled" in _one_line_error(again)
    retried = stack.cli("workflow", "retry", wf_id, "-o", "json")
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)["run"] == 2
    stack.cli("workflow", "cancel", wf_id)
    missing = stack.cli("workflow", "status", "f" * 32)
    assert missing.returncode == 5
    _one_line_error(missing)


def test_monitor_on_a_terminal_draws_progress(stack: Stack) -> None:
    status, accepted = stack.http.post(
        "/workflows/servers/create", {"infra": "wuji", "params": {"delay_seconds": 1}}
    )
    assert status == 202
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [CLI, "workflow", "monitor", accepted["workflow_id"]],
        env={**stack.env, "TERM": "xterm"},
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    proc.wait(10)
    os.close(leader)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert "\x1b[" in text  # redrawn in place
    assert "####################] 100%" in text


def test_auto_start_then_status_and_stop(tmp_path: Path) -> None:
    env = _env(tmp_path, PROVISIONING_ORCHESTRATOR_AUTO_START="true")
    result = _run(env, "server", "create", "--server", "wuji-cp-1", "--wait", timeout=180)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "starting a local one" in result.stderr
        assert "completed" in result.stdout
        pidfile = tmp_path / "data" / "orchestrator.pid"
        assert pidfile.exists()
        status = _run(env, "orchestrator", "status", "-o", "json")
        assert status.returncode == 0 and json.loads(status.stdout)["status"] == "healthy"
    finally:
        stopped = _run(env, "orchestrator", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    assert not (tmp_path / "data" / "orchestrator.pid").exists()
    status = _run(env, "orchestrator", "status")
    assert status.returncode == 3
    assert (tmp_path / "data" / "logs" / "orchestrator.log").exists()
