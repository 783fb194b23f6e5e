"""The seed's walkthrough, run as written: its configuration files, its request bodies, its CLI
lines and its Nushell helpers, through the real `provisioning` binary, the real `nu` and real
services. Each test names the part of the seed it replays; where the seed's text cannot run as
written (a Nushell `use` without `*` prefixes the commands), the test says so and runs the
nearest form.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from .support import VENV_BIN, Stack, free_port, submit, task_of, wait_until

pytestmark = pytest.mark.e2e
CLI = str(VENV_BIN / "provisioning")
ROOT = Path(__file__).resolve().parents[1]
NULIB = ROOT / "core" / "nulib"
NU = str(VENV_BIN / "nu") if (VENV_BIN / "nu").exists() else "nu"

# -- the seed's configuration blocks, verbatim --------------------------------------------------

# "Core Package (provisioning-core) config" (Configuration-Based Integration)
CORE_CONFIG = """\
# /usr/local/share/provisioning/config/config.defaults.toml
[orchestrator]
enabled = true
endpoint = "http://localhost:9090"
timeout = 60
auto_start = true # Start orchestrator if not running
[execution]
default_mode = "orchestrated" # Use orchestrator by default
fallback_to_direct = true # Fall back if orchestrator down
"""

# "Platform Package (provisioning-platform) config"
PLATFORM_CONFIG = """\
# /usr/local/share/provisioning/platform/config.toml
[orchestrator]
host = "127.0.0.1"
port = 8080
data_dir = "/var/lib/provisioning/orchestrator"
[executor]
nushell_binary = "nu" # Expects nu in PATH
provisioning_lib = "/usr/local/lib/provisioning"
max_concurrent_tasks = 10
task_timeout_seconds = 3600
"""

# "Configuration" section: the core package's user configuration
USER_CONFIG = """\
[orchestrator]
enabled = true
endpoint = "http://localhost:9090"
timeout_seconds = 60
auto_start = true
fallback_to_direct = true
[execution]
# Modes: "direct", "orchestrated", "auto"
default_mode = "auto" # Auto-detect based on complexity
# Operations that always use orchestrator
force_orchestrated = [
"server.create",
"cluster.create",
"batch.*",
"workflow.*"
]
# Operations that always run direct
force_direct = [
"*.list",
"*.show",
"help",
"version"
]
"""

# "Platform Package Config" (/usr/local/share/provisioning/platform/config.toml)
PLATFORM_FULL_CONFIG = """\
[server]
host = "127.0.0.1"
port = 8080
[storage]
backend = "filesystem" # or "surrealdb"
data_dir = "/var/lib/provisioning/orchestrator"
[executor]
max_concurrent_tasks = 10
task_timeout_seconds = 3600
checkpoint_interval_seconds = 30
[nushell]
binary = "nu" # Expects nu in PATH
provisioning_lib = "/usr/local/lib/provisioning"
env_vars = { NU_LIB_DIRS = "/usr/local/lib/provisioning" }
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROVISIONING_", "NATS_URL"))}
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_CONFIG_HOME=str(tmp_path / "xdg"),
        XDG_STATE_HOME=str(tmp_path / "xdg-state"),
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        **extra,
    )
    return env


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _settings(env: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """`provisioning env -o json` as {key: (value, source)}, and the warnings it printed."""
    shown = _cli(env, "env", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    rows = {row["key"]: (row["value"], row["source"]) for row in json.loads(shown.stdout)}
    return rows, [ln for ln in shown.stderr.splitlines() if ln.startswith("warning: ")]


def _config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def _nu(env: dict[str, str], script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NU, "-n", "-c", script],
        env={**env, "NU_LIB_DIRS": str(NULIB)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- Configuration-Based Integration -----------------------------------------------------------


def test_core_package_config_is_read_as_the_seed_means_it(tmp_path: Path) -> None:
    env = _env(tmp_path, PROVISIONING_CONFIG=str(_config_file(tmp_path, CORE_CONFIG)))
    rows, warnings = _settings(env)
    assert warnings == []
    assert rows["orchestrator.timeout_seconds"][0] == 60  # the seed's `timeout`
    assert "(orchestrator.timeout)" in rows["orchestrator.timeout_seconds"][1]
    assert rows["orchestrator.auto_start"][0] is True
    assert rows["execution.default_mode"][0] == "orchestrated"
    assert rows["execution.fallback_to_direct"][0] is True


def test_platform_package_config_is_read_as_the_seed_means_it(tmp_path: Path) -> None:
    env = _env(tmp_path, PROVISIONING_CONFIG=str(_config_file(tmp_path, PLATFORM_CONFIG)))
    rows, warnings = _settings(env)
    assert warnings == []
    assert rows["gateway.host"][0] == "127.0.0.1" and rows["gateway.port"][0] == 8080
    assert rows["orchestrator.data_dir"][0] == "/var/lib/provisioning/orchestrator"
    assert rows["nushell.binary"][0] == "nu"  # executor.nushell_binary
    assert rows["nushell.provisioning_lib"][0] == "/usr/local/lib/provisioning"
    assert rows["executor.max_concurrent_tasks"][0] == 10
    assert rows["executor.task_timeout_seconds"][0] == 3600
    # the CLI on the same machine talks to the port the orchestrator was given
    assert rows["orchestrator.endpoint"][0] == "http://localhost:8080"


def test_user_config_with_force_lists_is_read(tmp_path: Path) -> None:
    env = _env(tmp_path, PROVISIONING_CONFIG=str(_config_file(tmp_path, USER_CONFIG)))
    rows, warnings = _settings(env)
    assert warnings == []
    assert rows["execution.fallback_to_direct"][0] is True  # from [orchestrator]
    assert rows["execution.force_orchestrated"][0] == [
        "server.create",
        "cluster.create",
        "batch.*",
        "workflow.*",
    ]
    assert rows["execution.force_direct"][0] == ["*.list", "*.show", "help", "version"]


def test_platform_full_config_warns_once_per_key_without_meaning(tmp_path: Path) -> None:
    path = _config_file(tmp_path, PLATFORM_FULL_CONFIG)
    rows, warnings = _settings(_env(tmp_path, PROVISIONING_CONFIG=str(path)))
    assert rows["gateway.port"][0] == 8080  # [server]
    assert rows["orchestrator.data_dir"][0] == "/var/lib/provisioning/orchestrator"  # [storage]
    assert rows["nushell.env_vars"][0] == {"NU_LIB_DIRS": "/usr/local/lib/provisioning"}
    assert len(warnings) == 2, warnings
    assert f"{path}:5: storage.backend is ignored" in warnings[0]
    assert "JetStream" in warnings[0]
    assert f"{path}:10: executor.checkpoint_interval_seconds is ignored" in warnings[1]


def test_several_bad_keys_are_one_error_with_every_line(tmp_path: Path) -> None:
    path = _config_file(
        tmp_path,
        textwrap.dedent("""\
            [orchestrator]
            endpont = "http://localhost:9090"
            [executor]
            max_concurent_tasks = 4
            [queue]
            path = "/var/lib/provisioning/queue"
            """),
    )
    result = _cli(_env(tmp_path, PROVISIONING_CONFIG=str(path)), "server", "list")
    assert result.returncode == 6, result.stderr
    assert "3 unknown configuration key(s)" in result.stderr
    assert f"{path}:2: unknown key orchestrator.endpont" in result.stderr
    assert f"{path}:4: unknown key executor.max_concurent_tasks" in result.stderr
    assert f"{path}:5: unknown section [queue]" in result.stderr


def test_auto_start_is_on_unless_turned_off(tmp_path: Path) -> None:
    rows, _ = _settings(_env(tmp_path))
    assert rows["orchestrator.auto_start"] == (True, "default")


def _start_executor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run an executor that is expected to refuse to start; its exit and output."""
    return subprocess.run(
        [str(VENV_BIN / "provisioning-orchestrator"), "executor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_seed_platform_config_fails_fast_where_its_library_is_missing(tmp_path: Path) -> None:
    """The executor checks its Nushell and library at start: the seed's file on a machine with
    nothing under /usr/local/lib/provisioning stops it at once, the fix named, instead of every
    task failing with `Module not found.` and being retried."""
    path = _config_file(tmp_path, PLATFORM_FULL_CONFIG)
    env = _env(tmp_path, PROVISIONING_CONFIG=str(path), NATS_URL=f"nats://127.0.0.1:{free_port()}")
    started = _start_executor(env)
    assert started.returncode != 0
    assert "provisioning_lib /usr/local/lib/provisioning is not a directory" in started.stderr

    # the library in place but one module broken: caught the same way, the module named
    lib = tmp_path / "usr-local-lib-provisioning"
    shutil.copytree(NULIB, lib)
    with (lib / "servers" / "mod.nu").open("a") as module:
        module.write("\nexport def broken [ {\n")
    path.write_text(PLATFORM_FULL_CONFIG.replace("/usr/local/lib/provisioning", str(lib)))
    refused = _start_executor(env)
    assert refused.returncode != 0
    assert "module 'servers'" in refused.stderr, refused.stderr
    assert "does not load from" in refused.stderr and "provisioning_lib" in refused.stderr


# -- the CLI's own forms ------------------------------------------------------------------------


def test_help_and_version_run_without_an_orchestrator(tmp_path: Path) -> None:
    env = _env(tmp_path, PROVISIONING_ORCHESTRATOR_AUTO_START="false")
    top = _cli(env, "help")
    assert top.returncode == 0 and "server" in top.stdout and "workflow" in top.stdout
    one = _cli(env, "help", "server", "create")
    assert one.returncode == 0 and "--priority" in one.stdout and "--orchestrated" in one.stdout
    unknown = _cli(env, "help", "nosuch")
    assert unknown.returncode != 0 and "no command 'nosuch'" in unknown.stderr
    version = _cli(env, "version")
    assert version.returncode == 0 and version.stdout.strip()


# -- Example 1: Simple Server Creation (Direct Mode) --------------------------------------------


def test_example_1_server_list_needs_no_orchestrator(tmp_path: Path) -> None:
    env = _env(
        tmp_path,
        PROVISIONING_ORCHESTRATOR_DATA_DIR=str(tmp_path / "data"),
        PROVISIONING_ORCHESTRATOR_ENDPOINT=f"http://127.0.0.1:{free_port()}",  # nothing there
        PROVISIONING_ORCHESTRATOR_AUTO_START="true",  # *.list never starts one
    )
    listed = _cli(env, "server", "list")
    assert listed.returncode == 0, listed.stderr
    assert "no servers" in listed.stdout
    assert "starting" not in listed.stderr
    assert not (tmp_path / "data" / "orchestrator.pid").exists()


# -- Example 2: Server Creation with Orchestrator ----------------------------------------------


def test_example_2_create_orchestrated_then_status_and_list(stack: Stack) -> None:
    """`provisioning server create --orchestrated --infra wuji`, then `workflow status <id>`
    shows each server's result, and `server list` sees the same servers: one world."""
    submitted = stack.cli("server", "create", "--orchestrated", "--infra", "wuji")
    assert submitted.returncode == 0, submitted.stderr
    found = re.search(r"Workflow submitted: (\w+)", submitted.stdout)
    assert found, submitted.stdout
    wf_id = found.group(1)
    stack.http.wait_workflow(wf_id, timeout=120)

    status = stack.cli("workflow", "status", wf_id)
    assert status.returncode == 0, status.stderr
    assert "completed" in status.stdout
    for host in ("wuji-cp-1", "wuji-worker-1", "wuji-worker-2"):
        assert re.search(rf"server {host} running at 10\.", status.stdout), status.stdout

    listed = stack.cli("server", "list", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(s["hostname"] for s in json.loads(listed.stdout)) == [
        "wuji-cp-1",
        "wuji-worker-1",
        "wuji-worker-2",
    ]


def test_example_2_the_seed_request_body(stack: Stack) -> None:
    """Step 4-9: `{type: "server_create", infra: "wuji", params: {...}}` POSTed to
    /workflows/servers/create answers `{workflow_id, status: "queued"}`; the Rust side's
    `infra_name` works too; a named priority is taken; unknown keys are named, not dropped."""
    status, body = stack.http.post(
        "/workflows/servers/create",
        {"type": "server_create", "infra": "wuji", "params": {"servers": ["wuji-cp-1"]}},
    )
    assert status == 202, body
    assert body["status"] == "queued" and body["workflow_id"]
    assert stack.http.wait_workflow(body["workflow_id"], timeout=120)["status"] == "completed"

    status, body = stack.http.post(
        "/workflows/servers/create",
        {"infra_name": "wuji", "priority": "High", "params": {"servers": ["wuji-worker-1"]}},
    )
    assert status == 202, body
    view = stack.http.wait_workflow(body["workflow_id"], timeout=120)
    assert view["status"] == "completed" and view["priority"] == 10, view["priority"]

    status, body = stack.http.post(
        "/workflows/servers/create", {"infra": "wuji", "params": {"plan": "large", "bogus": 1}}
    )
    assert status == 422, body
    assert "bogus" in body["error"]["message"]
    status, body = stack.http.post("/workflows/servers/create", {"infra": "wuji", "colour": "red"})
    assert status == 422 and "colour" in body["error"]["message"], body


def test_curl_default_content_type_is_accepted(stack: Stack) -> None:
    """`curl -d '{...}'` sends application/x-www-form-urlencoded: the body is JSON all the
    same, on the shortcuts and on POST /workflows alike."""
    for path, doc in (
        ("/workflows/servers/create", {"infra": "wuji", "params": {"servers": ["wuji-cp-1"]}}),
        ("/workflows", {"name": "hello", "tasks": [{"id": "a", "action": "builtin.noop"}]}),
    ):
        result = subprocess.run(
            ["curl", "-s", "-X", "POST", f"{stack.http.base}{path}", "-d", json.dumps(doc)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        answer = json.loads(result.stdout)
        assert answer.get("status") == "queued", (path, answer)


def test_priority_on_create_commands(stack: Stack) -> None:
    submitted = stack.cli(
        "server", "create", "--infra", "wuji", "--server", "wuji-cp-1", "--priority", "Critical",
        "-o", "json",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    wf_id = json.loads(submitted.stdout)["workflow_id"]
    assert stack.http.wait_workflow(wf_id, timeout=120)["priority"] == 100
    bad = stack.cli("server", "create", "--infra", "wuji", "--priority", "Urgent")
    assert bad.returncode == 2 and "Low, Normal, High, Critical" in bad.stderr, bad.stderr


# -- Example 3: Batch Workflow with Dependencies -----------------------------------------------


def test_example_3_batch_submit_and_monitor(stack: Stack) -> None:
    definition = ROOT / "core" / "workflows" / "example3.ncl"
    submitted = stack.cli("batch", "submit", str(definition))
    assert submitted.returncode == 0, submitted.stderr
    assert "provisioning batch monitor" in submitted.stdout
    wf_id = re.search(r"Workflow submitted: (\w+)", submitted.stdout)
    assert wf_id, submitted.stdout
    monitored = stack.cli("batch", "monitor", wf_id.group(1), timeout=240)
    assert monitored.returncode == 0, monitored.stdout + monitored.stderr
    assert f"workflow {wf_id.group(1)} completed" in monitored.stdout
    # every task's start comes before its progress lines
    for task in re.findall(r"task (\S+) running", monitored.stdout):
        started = monitored.stdout.index(f"task {task} running")
        first = re.search(rf"task {re.escape(task)} +\d+%", monitored.stdout)
        assert first is None or first.start() > started, task


# -- Pattern 3: Bidirectional Communication (the Nushell helpers) ------------------------------


def test_pattern_3_helpers_against_a_running_orchestrator(stack: Stack) -> None:
    env = {**stack.env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    health = _nu(
        env,
        "use lib_provisioning/orchestrator/client.nu *; check-orchestrator-health | to json",
    )
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["status"] == "healthy"
    available = _nu(env, "use lib_provisioning/orchestrator/client.nu *; orchestrator-available")
    assert available.stdout.strip() == "true", available.stderr
    ensured = _nu(env, "use lib_provisioning/orchestrator/client.nu *; ensure-orchestrator")
    assert ensured.stdout.strip() == "true" and "Starting" not in ensured.stdout

    # report-progress [task_id, progress] for a task that is running
    wf_id = submit(
        stack.http,
        [{"id": "t", "action": "builtin.sleep", "args": {"seconds": 30}}],
        name="reported",
    )
    wait_until(lambda: task_of(stack.http, wf_id, "t")["status"] == "running", 60, what="the task")
    reported = _nu(
        env,
        f"use lib_provisioning/orchestrator/client.nu *; report-progress '{wf_id}.t' 42",
    )
    assert reported.returncode == 0 and reported.stdout.strip() == "true", reported.stderr
    view = stack.http.get(f"/workflows/{wf_id}")[1]
    assert view["tasks"][0]["progress"] == 42, view["tasks"][0]
    assert view["progress"] == 42  # the workflow's progress is its tasks', not 0% until done
    stack.http.post(f"/workflows/{wf_id}/cancel", {})


def test_pattern_3_health_check_raises_when_nothing_answers(tmp_path: Path) -> None:
    env = _env(tmp_path, PROVISIONING_ORCHESTRATOR_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    raised = _nu(env, "use lib_provisioning/orchestrator/client.nu *; check-orchestrator-health")
    assert raised.returncode != 0
    assert "Orchestrator not available" in raised.stderr
    available = _nu(env, "use lib_provisioning/orchestrator/client.nu *; orchestrator-available")
    assert available.stdout.strip() == "false"
    # auto_start off in the user's file: ensure-orchestrator says no and starts nothing
    (tmp_path / "xdg" / "provisioning").mkdir(parents=True)
    (tmp_path / "xdg" / "provisioning" / "config.toml").write_text(
        "[orchestrator]\nauto_start = false\n"
    )
    ensured = _nu(env, "use lib_provisioning/orchestrator/client.nu *; ensure-orchestrator")
    assert ensured.returncode == 0 and ensured.stdout.strip() == "false", ensured.stderr


def test_server_create_workflow_orchestrated_and_direct(stack: Stack, tmp_path: Path) -> None:
    """The seed's `server_create_workflow wuji --orchestrated` posts its task body and returns
    `{workflow_id, status: queued}`; without the flag it runs directly (`do-server-create`)."""
    env = {**stack.env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    queued = _nu(
        env,
        "use workflows/server_create.nu *; server_create_workflow wuji --orchestrated | to json",
    )
    assert queued.returncode == 0, queued.stderr
    body = json.loads(queued.stdout)
    assert body["status"] == "queued"
    assert stack.http.wait_workflow(body["workflow_id"], timeout=120)["status"] == "completed"

    direct_env = {**env, "PROVISIONING_ORCHESTRATOR_DATA_DIR": str(tmp_path / "direct")}
    direct = _nu(
        direct_env, "use workflows/server_create.nu *; server_create_workflow wuji | to json"
    )
    assert direct.returncode == 0, direct.stderr
    assert json.loads(direct.stdout)["mode"] == "direct"


def test_the_executor_line_of_example_2(tmp_path: Path) -> None:
    """Step 12: `nu -c "use .../servers/create.nu; create-server 'wuji'"`. In Nushell, `use`
    without `*` imports a module's commands under its name, so the seed's line as written says
    `Command create-server not found` in every Nushell; the two forms that do run it are
    `create create-server` and `use servers/create.nu *`."""
    env = _env(
        tmp_path,
        PROVISIONING_ORCHESTRATOR_DATA_DIR=str(tmp_path / "data"),
        PROVISIONING_ORCHESTRATOR_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        PROVISIONING_ORCHESTRATOR_AUTO_START="false",
    )
    as_written = _nu(env, f"use {NULIB}/servers/create.nu; create-server 'wuji'")
    assert as_written.returncode != 0 and "create create-server" in as_written.stderr
    prefixed = _nu(env, f"use {NULIB}/servers/create.nu; create create-server 'wuji' | to json")
    assert prefixed.returncode == 0, prefixed.stderr
    assert json.loads(prefixed.stdout)["status"] == "completed"
    starred = _nu(env, "use servers/create.nu *; create-server 'wuji' | get status")
    assert starred.stdout.strip() == "completed", starred.stderr


# -- Installation: `provisioning-orchestrator --daemon`, and one world with the CLI -------------


def test_daemon_then_the_readme_sequence_sees_one_world(tmp_path: Path) -> None:
    """`ensure-orchestrator` starts `provisioning-orchestrator --daemon` when nothing answers
    and auto_start is on; then the CLI, left at its defaults, works in the daemon's world:
    what `server create --orchestrated` made, `server list` shows."""
    port = free_port()
    data = tmp_path / "daemon-data"
    (tmp_path / "xdg" / "provisioning").mkdir(parents=True)
    # the daemon reads the seed's platform config (its port and data_dir); the CLI the
    # core config with the matching endpoint, and no data_dir of its own
    (tmp_path / "xdg" / "provisioning" / "config.toml").write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n[storage]\ndata_dir = "{data}"\n'
    )
    env = _env(tmp_path)
    try:
        ensured = _nu(
            env, "use lib_provisioning/orchestrator/client.nu *; ensure-orchestrator", timeout=180
        )
        assert ensured.returncode == 0, ensured.stdout + ensured.stderr
        assert "Starting orchestrator..." in ensured.stdout and ensured.stdout.strip().endswith(
            "true"
        )
        (tmp_path / "xdg" / "provisioning" / "config.toml").write_text(
            f'[orchestrator]\nendpoint = "http://localhost:{port}"\n'
        )  # no data_dir: the CLI's default, which the running daemon overrides
        created = _cli(env, "server", "create", "--orchestrated", "--infra", "wuji", "--wait")
        assert created.returncode == 0, created.stdout + created.stderr
        listed = _cli(env, "server", "list", "-o", "json")
        assert listed.returncode == 0, listed.stderr
        assert len(json.loads(listed.stdout)) == 3
        shown, _ = _settings(env)
        assert shown["orchestrator.data_dir"][0] == str(data.resolve())
        assert "the local stack" in shown["orchestrator.data_dir"][1]
    finally:
        _cli({**env, "PROVISIONING_ORCHESTRATOR_DATA_DIR": str(data)}, "orchestrator", "stop")
    wait_until(lambda: not (data / "orchestrator.pid").exists(), 60, what="the daemon to stop")
    # gone: the CLI is back at its own default
    shown, _ = _settings(env)
    assert shown["orchestrator.data_dir"][1] == "default"
