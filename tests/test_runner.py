"""The runner and the registry against real ``nu`` subprocesses: arguments are data, the child
sees a clean environment, progress/log/result follow the task protocol, timeouts and cancellation
leave no process behind, and the core library's local provider behaves as documented."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from core import NULIB_DIR
from core.registry import Registry, load_registry
from core.runner import Runner, RunResult, parse_progress, resolve_binary
from shared.errors import ConfigError

from .support import FIXTURES, injection_payloads, task_processes


class Run:
    """One action run, with everything the runner reported."""

    def __init__(self, result: RunResult, lines: list[tuple[str, str]], progress: list[Any]):
        self.result = result
        self.lines = lines
        self.progress = progress

    @property
    def output(self) -> Any:
        assert self.result.outcome == "completed", self.result
        return self.result.output

    def text(self, stream: str = "stdout") -> list[str]:
        return [line for s, line in self.lines if s == stream]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(FIXTURES / "registry.toml", FIXTURES / "nulib")


@pytest.fixture
def runner(tmp_path: Path) -> Runner:
    return Runner(
        nu_binary=resolve_binary("nu"),
        data_dir=tmp_path / "data",
        kill_grace_s=0.5,
        result_limit_bytes=4096,
    )


async def run(
    runner: Runner,
    registry: Registry,
    action: str,
    args: dict[str, Any],
    *,
    timeout_s: float = 30,
    task_id: str | None = None,
    cancel: asyncio.Event | None = None,
    on_line: Any = None,
) -> Run:
    lines: list[tuple[str, str]] = []
    progress: list[tuple[int, str]] = []

    async def line(stream: str, text: str) -> None:
        lines.append((stream, text))
        if on_line is not None:
            await on_line(stream, text)

    async def prog(percent: int, message: str) -> None:
        progress.append((percent, message))

    result = await runner.run(
        registry.get(action),
        args,
        task_env={
            "PROVISIONING_TASK_ID": task_id or f"{uuid.uuid4().hex}.t",
            "PROVISIONING_WORKFLOW_ID": "w",
            "PROVISIONING_GATEWAY_URL": "http://127.0.0.1:9",
            "TRACEPARENT": "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01",
        },
        timeout_s=timeout_s,
        on_line=line,
        on_progress=prog,
        cancel=cancel,
    )
    return Run(result, lines, progress)


# -- the registry: an allow-list that never points outside its library ---------------------------


def _user_registry(tmp_path: Path, module: str, function: str = "go") -> tuple[Path, Path]:
    lib = tmp_path / "lib"
    lib.mkdir(exist_ok=True)
    path = tmp_path / "registry.toml"
    path.write_text(f'[actions."user.go"]\nmodule = "{module}"\nfunction = "{function}"\n')
    return path, lib


@pytest.mark.parametrize(
    "module", ["../outside", "/etc", "a/../../outside", "Outside", "a//b", "x.nu", ""]
)
def test_registry_refuses_module_names_that_are_not_plain_paths(
    tmp_path: Path, module: str
) -> None:
    path, _ = _user_registry(tmp_path, module)
    with pytest.raises(ConfigError, match="not a plain name"):
        load_registry(path, tmp_path / "lib")


@pytest.mark.parametrize("function", ["go; rm -rf ~", "go $(x)", "(go)", "Go", "a b c"])
def test_registry_refuses_functions_that_are_not_plain_names(tmp_path: Path, function: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    path, lib = _user_registry(tmp_path, "good", function)
    (lib / "good.nu").write_text("export def go [args: record] { {} }\n")
    with pytest.raises(ConfigError, match="not a plain name"):
        load_registry(path, lib)


def test_registry_refuses_symlinks_out_of_the_library(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "evil").mkdir(parents=True)
    (outside / "evil" / "mod.nu").write_text("export def go [args: record] { {} }\n")
    (outside / "evil.nu").write_text("export def go [args: record] { {} }\n")
    path, lib = _user_registry(tmp_path, "evil")

    (lib / "evil").symlink_to(outside / "evil")  # a module directory elsewhere
    with pytest.raises(ConfigError, match="points outside"):
        load_registry(path, lib)
    (lib / "evil").unlink()

    (lib / "evil.nu").symlink_to(outside / "evil.nu")  # a module file elsewhere
    with pytest.raises(ConfigError, match="points outside"):
        load_registry(path, lib)
    (lib / "evil.nu").unlink()

    (lib / "evil").mkdir()  # a real directory whose mod.nu lives elsewhere
    (lib / "evil" / "mod.nu").symlink_to(outside / "evil" / "mod.nu")
    with pytest.raises(ConfigError, match="points outside"):
        load_registry(path, lib)


def test_registry_refuses_missing_modules_and_reserved_names(tmp_path: Path) -> None:
    path, lib = _user_registry(tmp_path, "nowhere")
    with pytest.raises(ConfigError, match="not found"):
        load_registry(path, lib)
    for name in ("builtin.sneaky", "command.sneaky", "Nope", "noverb"):
        path.write_text(f'[actions."{name}"]\nmodule = "servers"\nfunction = "create"\n')
        with pytest.raises(ConfigError, match="invalid action name"):
            load_registry(path, lib)
    with pytest.raises(ConfigError, match="does not exist"):
        load_registry(path, tmp_path / "no-such-lib")


async def test_user_registry_file_module_runs(tmp_path: Path, runner: Runner) -> None:
    """A module may be a single ``<name>.nu`` file, and it can use the core library."""
    path, lib = _user_registry(tmp_path, "tools/hello", "greet")
    (lib / "tools").mkdir()
    (lib / "tools" / "hello.nu").write_text(
        "use lib_provisioning/progress.nu\n"
        "export def greet [args: record]: nothing -> record {\n"
        '    progress 50 "greeting"\n'
        '    {greeting: $"hello ($args.name)"}\n'
        "}\n"
    )
    registry = load_registry(path, lib)
    assert "server.create" in registry and "user.go" in registry
    done = await run(runner, registry, "user.go", {"name": "world"})
    assert done.output == {"greeting": "hello world"}
    assert done.progress == [(50, "greeting")]


# -- arguments are data -------------------------------------------------------------------------


async def test_arguments_reach_the_function_as_data(
    tmp_path: Path, runner: Runner, registry: Registry
) -> None:
    marker = tmp_path / "pwned"
    payloads = injection_payloads(marker)
    labels = {f"l{i}": p for i, p in enumerate(payloads)}
    done = await run(
        runner,
        registry,
        "server.create",
        {"infra": "wuji", "delay_seconds": 0, "server": {"hostname": "h1", "labels": labels}},
    )
    assert done.output["labels"] == labels  # verbatim, every one
    assert done.output["hostname"] == "h1"

    echoed = await run(runner, registry, "probe.echo", {"text": payloads[0], "list": payloads})
    assert echoed.output == {"args": {"text": payloads[0], "list": payloads}}
    assert f"text: {payloads[0]}" in echoed.text()
    assert not marker.exists()


async def test_hostnames_with_code_are_refused_not_run(
    tmp_path: Path, runner: Runner, registry: Registry
) -> None:
    marker = tmp_path / "pwned"
    for payload in injection_payloads(marker):
        done = await run(
            runner,
            registry,
            "server.create",
            {"infra": "wuji", "delay_seconds": 0, "server": {"hostname": payload}},
        )
        assert done.result.outcome == "failed", payload
        assert "invalid server.hostname" in (done.result.error or ""), done.result
    assert not marker.exists()
    assert not (runner.state_dir / "local" / "servers").exists() or not any(
        (runner.state_dir / "local" / "servers").iterdir()
    )


async def test_command_run_takes_argv_without_a_shell(tmp_path: Path, runner: Runner) -> None:
    registry = load_registry()
    marker = tmp_path / "pwned"
    argv = ["echo", f"$(touch {marker})", ";", "rm", "-rf", "~", f"`touch {marker}`"]
    done = await run(runner, registry, "command.run", {"argv": argv})
    assert done.result.outcome == "completed" and done.result.exit_code == 0
    assert done.text() == [" ".join(argv[1:])]
    assert not marker.exists()

    missing = await run(runner, registry, "command.run", {"argv": ["no-such-program-here"]})
    assert missing.result.outcome == "failed" and "not found" in (missing.result.error or "")
    for bad in ({"argv": "echo hi"}, {"argv": []}, {"argv": ["echo", 1]}, {}):
        refused = await run(runner, registry, "command.run", bad)
        assert refused.result.outcome == "failed" and refused.result.reason == "refused"


# -- environment ----------------------------------------------------------------------------------


async def test_child_environment_is_clean_and_complete(
    monkeypatch: pytest.MonkeyPatch, runner: Runner, registry: Registry
) -> None:
    monkeypatch.setenv("MY_SECRET", "x-secret-value")
    monkeypatch.setenv("PROVISIONING_GATEWAY_AUTH_TOKEN", "s3cret")
    monkeypatch.setenv("NATS_URL", "nats://user:pass@somewhere:4222")
    done = await run(runner, registry, "probe.env", {}, task_id="wf1.t1")
    env = dict(item.split("=", 1) for item in done.output["environ"])
    assert env["PROVISIONING_TASK_ID"] == "wf1.t1"
    assert env["PROVISIONING_WORKFLOW_ID"] == "w"
    assert env["PROVISIONING_GATEWAY_URL"] == "http://127.0.0.1:9"
    assert env["TRACEPARENT"].startswith("00-0123456789abcdef")
    assert env["NU_LIB_DIRS"].split(":") == [
        str((FIXTURES / "nulib").resolve()),
        str(NULIB_DIR.resolve()),
    ]
    assert env["PROVISIONING_DATA_DIR"] == str(runner.state_dir)  # the tasks' own
    assert env["HOME"] == done.output["cwd"]  # a fresh directory, removed afterwards
    assert not Path(done.output["cwd"]).exists()
    allowed = {
        "PATH",
        "LANG",
        "HOME",
        "TMPDIR",
        "NU_LIB_DIRS",
        "PROVISIONING_DATA_DIR",
        "PROVISIONING_RESULT_FILE",
        "PROVISIONING_TASK_ID",
        "PROVISIONING_WORKFLOW_ID",
        "PROVISIONING_GATEWAY_URL",
        "TRACEPARENT",
    }
    assert set(env) == allowed, set(env) - allowed
    dump = "\n".join(done.output["environ"])
    assert "s3cret" not in dump and "x-secret-value" not in dump and "pass@" not in dump


# -- progress, logs, result, exit codes -----------------------------------------------------------


def test_parse_progress() -> None:
    assert parse_progress("PROGRESS: 30 allocating") == (30, "allocating")
    assert parse_progress("PROGRESS: 7") == (7, "")
    assert parse_progress("  PROGRESS:100   done  ") == (100, "done")
    assert parse_progress("PROGRESS: 250 too far") == (100, "too far")
    for line in ("progress: 30 x", "PROGRESS: -3 x", "PROGRESS: x", "echo PROGRESS: 30", ""):
        assert parse_progress(line) is None, line


async def test_progress_logs_and_result(runner: Runner, registry: Registry) -> None:
    done = await run(runner, registry, "probe.chatty", {"lines": 6, "width": 5, "stderr_every": 3})
    assert done.output == {"lines": 6}
    assert done.text("stdout") == [f"line {i} xxxxx" for i in (1, 2, 4, 5)]
    assert done.text("stderr") == [f"line {i} xxxxx" for i in (3, 6)]

    slow = await run(runner, registry, "server.create", {"infra": "wuji", "server": {}})
    assert slow.result.outcome == "failed" and "server.hostname is required" in (
        slow.result.error or ""
    )
    assert slow.progress == []  # argument errors come before any progress


async def test_result_is_bounded(runner: Runner, registry: Registry) -> None:
    small = await run(runner, registry, "probe.result", {"size": 1000})
    assert small.output == {"blob": "r" * 1000}
    big = await run(runner, registry, "probe.result", {"size": 10_000})
    assert big.result.outcome == "failed" and big.result.reason == "error"
    assert "over the 4096-byte limit" in (big.result.error or "")


async def test_exit_code_and_error_message(runner: Runner, registry: Registry) -> None:
    done = await run(runner, registry, "probe.exit", {"code": 3, "message": "disk full"})
    assert done.result.outcome == "failed"
    assert done.result.exit_code == 3 and done.result.reason == "exit_code"
    assert done.result.error == "exited with code 3: disk full"
    raised = await run(
        runner, registry, "server.create", {"infra": "wuji", "server": {"hostname": "-bad"}}
    )
    assert raised.result.exit_code == 1
    assert (raised.result.error or "").startswith("exited with code 1: invalid server.hostname")


# -- timeouts and cancellation leave nothing behind -----------------------------------------------


async def _watch_children(seen: dict[str, list[tuple[int, str]]], task_id: str) -> Any:
    async def on_line(stream: str, line: str) -> None:
        if line == "children started":
            await asyncio.sleep(0.3)  # let the spawned jobs exec
            seen["during"] = task_processes(task_id)

    return on_line


async def test_timeout_kills_the_task_and_every_child(runner: Runner, registry: Registry) -> None:
    task_id = f"{uuid.uuid4().hex}.spawn"
    seen: dict[str, list[tuple[int, str]]] = {}
    done = await run(
        runner,
        registry,
        "probe.spawn",
        {"ignore_term": True},
        timeout_s=2,
        task_id=task_id,
        on_line=await _watch_children(seen, task_id),
    )
    assert done.result.outcome == "failed" and done.result.reason == "timeout", done.result
    assert done.result.error == "timed out after 2s"
    # nu, the foreground sleep and three job-spawned children (own process groups) were alive
    assert sum("sleep 300" in cmd for _, cmd in seen["during"]) >= 3, seen
    assert task_processes(task_id) == []


async def test_cancel_kills_the_task_and_every_child(runner: Runner, registry: Registry) -> None:
    task_id = f"{uuid.uuid4().hex}.spawn"
    cancel = asyncio.Event()
    seen: dict[str, list[tuple[int, str]]] = {}
    watch = await _watch_children(seen, task_id)

    async def on_line(stream: str, line: str) -> None:
        await watch(stream, line)
        if "during" in seen:
            cancel.set()

    done = await run(
        runner, registry, "probe.spawn", {}, timeout_s=60, task_id=task_id, cancel=cancel,
        on_line=on_line,
    )  # fmt: skip
    assert done.result.outcome == "cancelled" and done.result.reason == "cancelled"
    assert sum("sleep 300" in cmd for _, cmd in seen["during"]) >= 2, seen
    assert task_processes(task_id) == []


async def test_children_left_behind_by_a_finished_task_are_killed(runner: Runner) -> None:
    task_id = f"{uuid.uuid4().hex}.left"
    done = await run(
        runner,
        load_registry(),
        "command.run",
        {"argv": ["/bin/sh", "-c", "sleep 300 & echo started"]},
        task_id=task_id,
    )
    assert done.result.outcome == "completed" and done.text() == ["started"]
    assert task_processes(task_id) == []


# -- the core library: local provider ------------------------------------------------------------


async def test_servers_create_list_delete(runner: Runner, registry: Registry) -> None:
    server = {"hostname": "web-1", "plan": "large", "zone": "z1", "labels": {"role": "web"}}
    created = await run(
        runner, registry, "server.create", {"infra": "wuji", "server": server, "delay_seconds": 0}
    )
    out = created.output
    assert out["existed"] is False and out["state"] == "running" and out["provider"] == "local"
    assert (out["plan"], out["zone"], out["labels"]) == ("large", "z1", {"role": "web"})
    assert out["ip"].startswith("10.")
    assert [p for p, _ in created.progress] == [10, 30, 60, 90, 100]
    assert created.progress[1][1] == "allocating large in z1"
    assert created.progress[-1][1] == f"server web-1 running at {out['ip']}"

    again = await run(
        runner, registry, "server.create", {"infra": "wuji", "server": server, "delay_seconds": 0}
    )
    assert again.output["existed"] is True and again.output["ip"] == out["ip"]
    other = await run(
        runner, registry, "server.create", {"infra": "other", "server": server, "delay_seconds": 0}
    )
    assert "already exists in infra wuji" in (other.result.error or "")

    await run(
        runner,
        registry,
        "server.create",
        {"infra": "lab", "server": {"hostname": "lab-1"}, "delay_seconds": 0},
    )
    listed = await run(runner, registry, "server.list", {"infra": "wuji"})
    assert [s["hostname"] for s in listed.output["servers"]] == ["web-1"]
    everything = await run(runner, registry, "server.list", {})
    assert [s["hostname"] for s in everything.output["servers"]] == ["lab-1", "web-1"]

    deleted = await run(
        runner, registry, "server.delete", {"hostname": "web-1", "delay_seconds": 0}
    )
    assert deleted.output["deleted"] is True and deleted.progress[-1][0] == 100
    missing = await run(
        runner, registry, "server.delete", {"hostname": "web-1", "delay_seconds": 0}
    )
    assert missing.output == {"hostname": "web-1", "deleted": False}
    listed = await run(runner, registry, "server.list", {"infra": "wuji"})
    assert listed.output == {"servers": []}


async def test_taskservs_and_clusters(runner: Runner, registry: Registry) -> None:
    fast = {"delay_seconds": 0}
    no_server = await run(
        runner,
        registry,
        "taskserv.create",
        {"infra": "wuji", "taskserv": "containerd", "server": "n1", **fast},
    )
    assert "server n1 does not exist" in (no_server.result.error or "")
    for host in ("n1", "n2"):
        await run(
            runner,
            registry,
            "server.create",
            {"infra": "wuji", "server": {"hostname": host}, **fast},
        )
    ts = await run(
        runner,
        registry,
        "taskserv.create",
        {"infra": "wuji", "taskserv": "containerd", "server": "n1", **fast},
    )
    assert ts.output["version"] == "1.7.24" and ts.output["state"] == "installed"
    assert ts.output["existed"] is False
    assert [p for p, _ in ts.progress] == [10, 30, 60, 90, 100]
    pinned = await run(
        runner,
        registry,
        "taskserv.create",
        {"infra": "wuji", "taskserv": "kubernetes", "server": "n1", "version": "1.30.0", **fast},
    )
    assert pinned.output["version"] == "1.30.0"
    listed = await run(runner, registry, "taskserv.list", {"server": "n1"})
    assert sorted(t["taskserv"] for t in listed.output["taskservs"]) == [
        "containerd",
        "kubernetes",
    ]

    missing = await run(
        runner,
        registry,
        "cluster.create",
        {"infra": "wuji", "cluster": {"name": "k", "servers": ["n1", "n9"]}, **fast},
    )
    assert "server n9 does not exist" in (missing.result.error or "")
    cluster = await run(
        runner,
        registry,
        "cluster.create",
        {"infra": "wuji", "cluster": {"name": "k", "servers": ["n1", "n2"]}, **fast},
    )
    assert cluster.output["servers"] == ["n1", "n2"] and cluster.output["state"] == "running"
    app = await run(
        runner, registry, "app.deploy", {"infra": "wuji", "cluster": "k", "app": "web", **fast}
    )
    assert app.output["state"] == "deployed" and app.output["existed"] is False
    clusters = await run(runner, registry, "cluster.list", {"infra": "wuji"})
    assert [(c["name"], c["apps"]) for c in clusters.output["clusters"]] == [("k", ["web"])]

    gone = await run(runner, registry, "server.delete", {"hostname": "n1", **fast})
    assert sorted(gone.output["taskservs_removed"]) == ["containerd", "kubernetes"]
    assert (await run(runner, registry, "taskserv.list", {})).output == {"taskservs": []}
    removed = await run(runner, registry, "cluster.delete", {"cluster": "k", **fast})
    assert removed.output["deleted"] is True
    ts_gone = await run(
        runner, registry, "taskserv.delete", {"taskserv": "containerd", "server": "n1", **fast}
    )
    assert ts_gone.output["deleted"] is False


async def test_fail_knobs_fail_before_any_change(runner: Runner, registry: Registry) -> None:
    args = {"infra": "wuji", "server": {"hostname": "f1"}, "delay_seconds": 0}
    failed = await run(runner, registry, "server.create", {**args, "fail": "no capacity"})
    assert failed.result.outcome == "failed" and failed.result.reason == "exit_code"
    assert "no capacity" in (failed.result.error or "")
    assert [p for p, _ in failed.progress] == [10]

    at = await run(runner, registry, "server.create", {**args, "fail_at": 55})
    assert [p for p, _ in at.progress] == [10, 30, 60]
    assert "simulated failure at 60%" in (at.result.error or "")

    listed = await run(runner, registry, "server.list", {})
    assert listed.output == {"servers": []}


async def test_delay_makes_a_task_slow(runner: Runner, registry: Registry) -> None:
    args = {"infra": "wuji", "server": {"hostname": "s1"}, "delay_seconds": 3}
    done = await run(runner, registry, "server.create", args, timeout_s=1)
    assert done.result.reason == "timeout"
    assert [p for p, _ in done.progress][:1] == [10]  # it had started, then was stopped
    assert (await run(runner, registry, "server.list", {})).output == {"servers": []}


def test_nu_is_the_native_binary() -> None:
    """The runner spawns the native ``nu`` (no Node shim in between)."""
    nu = Path(resolve_binary("nu")).resolve()
    assert os.access(nu, os.X_OK)
    assert nu.read_bytes()[:4] == b"\x7fELF"
