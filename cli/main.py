"""``provisioning``: the user's command line, in the seed's three modes.

Direct mode runs an action here through the same Nushell runner the executors use; orchestrated
mode submits it to the gateway; workflow mode submits a whole definition. ``--output json``
prints only JSON on stdout; errors are one line on stderr with a distinct exit code.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from core import infra
from core.infra import server_delete_args, server_list_args
from core.providers import Providers
from core.registry import Registry, load_registry
from core.runner import Runner, resolve_binary
from shared import API_VERSION, __version__
from shared.auth import redact_url
from shared.config import Config, load_config
from shared.errors import DefinitionError, ProvisioningError
from shared.messages import TaskSpec, WorkflowDefinition
from shared.workflow import definition_from_data, parse_definition

from .client import ApiClient, ApiError, OrchestratorUnavailable
from .direct import run_direct
from .monitor import monitor_workflow

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1  # a workflow or task ended failed or cancelled
EXIT_USAGE = 2  # click's own code for bad usage
EXIT_UNAVAILABLE = 3  # no orchestrator answers
EXIT_API = 4  # the orchestrator refused the request (4xx)
EXIT_NOT_FOUND = 5
EXIT_CONFIG = 6
EXIT_INTERRUPTED = 130

FORMATS = {".json": "json", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".ncl": "nickel"}
CONTENT_TYPE = {
    "json": "application/json",
    "toml": "application/toml",
    "yaml": "application/yaml",
    "nickel": "application/x-nickel",
}


class State:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = load_registry(
                self.config.nushell.registry or None, self.config.nushell.registry_lib or None
            )
        return self._registry

    def client(self, timeout_s: float | None = None) -> ApiClient:
        token = self.config.orchestrator.auth_token or self.config.gateway.auth_token
        return ApiClient(
            self.config.orchestrator.endpoint,
            token=token,
            timeout_s=timeout_s or self.config.orchestrator.timeout_seconds,
        )

    def runner(self) -> Runner:
        data_dir = self.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        return Runner(
            nu_binary=resolve_binary(self.config.nushell.binary),
            data_dir=data_dir,
            extra_env=self.config.nushell.env_vars,
            kill_grace_s=self.config.executor.kill_grace_seconds,
            result_limit_bytes=self.config.executor.result_limit_bytes,
            providers=Providers.from_config(self.config),
        )


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn known errors into one line on stderr and a distinct exit code."""
    try:
        yield
    except OrchestratorUnavailable as exc:
        fail(exc.message, EXIT_UNAVAILABLE)
    except ApiError as exc:
        fail(
            f"{exc.message} ({exc.status} {exc.api_code})",
            EXIT_NOT_FOUND if exc.status == 404 else EXIT_API,
        )
    except DefinitionError as exc:
        fail(exc.message, EXIT_API)
    except ProvisioningError as exc:
        fail(exc.message, EXIT_CONFIG if exc.code == "config_error" else EXIT_API)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        sys.exit(EXIT_OK)


def output_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--output",
        "-o",
        type=click.Choice(["table", "json"]),
        default="table",
        show_default=True,
        help="Output format.",
    )(f)


def mode_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--direct", "mode", flag_value="direct", help="Run here, without the orchestrator."
    )(f)
    return click.option(
        "--orchestrated", "mode", flag_value="orchestrated", help="Run through the orchestrator."
    )(f)


def wait_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--wait/--no-wait", default=False, help="Wait for the workflow, showing live progress."
    )(f)


def emit(data: Any, output: str, table: Callable[[Any], str]) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(table(data))


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str("" if c is None else c) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def _is_tty() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


# -- modes -------------------------------------------------------------------------------------


def resolve_mode(config: Config, operation: str, flag: str | None) -> str:
    """``direct`` or ``orchestrated`` for an operation such as ``server.create``."""
    if flag:
        return flag
    if not config.orchestrator.enabled:
        return "direct"
    ex = config.execution
    if any(fnmatch.fnmatchcase(operation, p) for p in ex.force_orchestrated):
        return "orchestrated"
    if any(fnmatch.fnmatchcase(operation, p) for p in ex.force_direct):
        return "direct"
    return ex.default_mode


def ensure_orchestrator(state: State, *, explicit: bool) -> bool:
    """Whether an orchestrator answers; starts a local one when configured to (the seed's
    ensure-orchestrator)."""
    client = state.client()
    try:
        return client.health().get("status") == "healthy"
    except OrchestratorUnavailable:
        pass
    if state.config.orchestrator.auto_start:
        click.echo(
            "no orchestrator answers; starting a local one (orchestrator.auto_start)", err=True
        )
        start_background(state.config)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if client.health().get("status") == "healthy":
                    return True
            except OrchestratorUnavailable:
                pass
            time.sleep(0.5)
        fail(
            f"the local orchestrator did not become healthy; see {state.config.data_dir / 'logs'}",
            EXIT_UNAVAILABLE,
        )
    return False


def run_operation(
    state: State,
    operation: str,
    definition: WorkflowDefinition,
    *,
    mode: str | None,
    wait: bool,
    output: str,
    shortcut: tuple[str, dict[str, Any]] | None = None,
) -> None:
    chosen = resolve_mode(state.config, operation, mode)
    if chosen in ("orchestrated", "auto"):
        if ensure_orchestrator(state, explicit=mode == "orchestrated"):
            submit_and_maybe_wait(state, definition, wait=wait, output=output, shortcut=shortcut)
            return
        if chosen == "orchestrated" and (
            mode == "orchestrated" or not state.config.execution.fallback_to_direct
        ):
            fail(
                f"no orchestrator answers at {state.config.orchestrator.endpoint}", EXIT_UNAVAILABLE
            )
        click.echo(
            f"note: no orchestrator answers at {state.config.orchestrator.endpoint}; "
            f"running {operation} directly",
            err=True,
        )
    run_direct_and_print(state, definition, output=output)


def run_direct_and_print(state: State, definition: WorkflowDefinition, *, output: str) -> None:
    quiet = output == "json"

    def report(task_id: str, kind: str, data: dict[str, Any]) -> None:
        if quiet:
            return
        if kind == "progress":
            click.echo(f"{task_id}: {data['percent']:>3}% {data['message']}", err=False)
        elif kind == "task" and data["status"] not in ("running",):
            click.echo(
                f"{task_id}: {data['status']}"
                + (f" ({data['error']})" if data.get("error") else "")
            )

    results = asyncio.run(
        run_direct(definition, state.registry, state.runner(), state.config, report)
    )
    ok = all(r["status"] == "completed" for r in results.values())
    if output == "json":
        click.echo(
            json.dumps(
                {"mode": "direct", "status": "completed" if ok else "failed", "tasks": results},
                indent=2,
                default=str,
            )
        )
    else:
        click.echo(f"{definition.name}: {'completed' if ok else 'failed'} (direct)")
    if not ok:
        sys.exit(EXIT_FAILED)


def submit_and_maybe_wait(
    state: State,
    definition: WorkflowDefinition,
    *,
    wait: bool,
    output: str,
    shortcut: tuple[str, dict[str, Any]] | None = None,
    raw: tuple[bytes, str] | None = None,
) -> None:
    client = state.client()
    if shortcut:
        accepted = client.post(f"/workflows/{shortcut[0]}/create", shortcut[1])
    elif raw:
        accepted = client.call("POST", "/workflows", raw=raw[0], content_type=raw[1])
    else:
        import msgspec

        accepted = client.post("/workflows", msgspec.to_builtins(definition))
    wf_id = accepted["workflow_id"]
    if not wait:
        emit(
            accepted,
            output,
            lambda a: (
                f"workflow {a['workflow_id']} {a['status']} ({a.get('tasks', '?')} tasks)\n"
                f"watch it: provisioning workflow monitor {a['workflow_id']}"
            ),
        )
        return
    if output != "json":
        click.echo(f"workflow {wf_id} queued")
    final = wait_for(state, wf_id, output=output)
    if output == "json":
        click.echo(json.dumps(final, indent=2, default=str))
    if final.get("status") != "completed":
        sys.exit(EXIT_FAILED)


def wait_for(state: State, wf_id: str, *, output: str) -> dict[str, Any]:
    client = state.client()
    if output == "json":  # nothing but the final JSON on stdout
        for _ in client.stream(f"/workflows/{wf_id}/events"):
            pass
        result: dict[str, Any] = client.get(f"/workflows/{wf_id}")
        return result
    return monitor_workflow(client, wf_id, sys.stdout, _is_tty())


# -- the CLI -----------------------------------------------------------------------------------


@click.group()
@click.option("--config", type=click.Path(dir_okay=False), help="User configuration file.")
@click.option("--endpoint", help="Orchestrator URL (default [orchestrator] endpoint).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data directory.")
@click.version_option(__version__, prog_name="provisioning", message="%(prog)s %(version)s")
@click.pass_context
def main(
    ctx: click.Context, config: str | None, endpoint: str | None, data_dir: str | None
) -> None:
    """Provision servers, task services and clusters: directly, or through the orchestrator."""
    try:
        cfg = load_config(
            config, overrides={"orchestrator.endpoint": endpoint, "orchestrator.data_dir": data_dir}
        )
    except ProvisioningError as exc:
        fail(exc.message, EXIT_CONFIG)
    for warning in cfg.warnings:
        click.echo(f"warning: {warning}", err=True)
    ctx.obj = State(cfg)


def _params(pairs: tuple[str, ...]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--param")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


param_option = click.option(
    "--param",
    "-p",
    "params",
    multiple=True,
    help="KEY=VALUE passed to the actions (JSON values allowed).",
)


@main.group()
def server() -> None:
    """Servers."""


def _shortcut_op(
    state: State,
    operation: str,
    kind: str,
    build: Callable[..., WorkflowDefinition],
    kw: dict[str, Any],
) -> None:
    with user_errors():
        params = _params(kw.pop("params", ()))
        if kw.get("servers"):
            params["servers"] = list(kw["servers"])
        for extra in ("taskserv", "apps"):
            if kw.get(extra):
                params[extra] = list(kw[extra]) if extra == "apps" else kw[extra]
        name = kw["infra"]
        definition = build(name, params, state.config.orchestrator.infra_dir)
        run_operation(
            state,
            operation,
            definition,
            mode=kw.get("mode"),
            wait=kw["wait"],
            output=kw["output"],
            shortcut=(kind, {"infra": name, "params": params}),
        )


@server.command("list")
@click.option("--infra", default=None)
@mode_options
@output_option
@click.pass_obj
def server_list(state: State, infra: str | None, mode: str | None, output: str) -> None:
    """Servers, as their providers see them (an infra's providers, else those set up here)."""
    with user_errors():
        args = server_list_args(infra, state.config, state.config.orchestrator.infra_dir)
    _list_op(
        state,
        "server.list",
        args,
        mode,
        output,
        "servers",
        ["hostname", "infra", "provider", "plan", "zone", "state", "ip", "instance_id"],
    )


def _list_op(
    state: State,
    action: str,
    args: dict[str, Any],
    mode: str | None,
    output: str,
    key: str,
    columns: list[str],
) -> None:
    with user_errors():
        definition = WorkflowDefinition(
            name=action, tasks=[TaskSpec(id="list", action=action, args=args)]
        )
        chosen = resolve_mode(state.config, action, mode)
        items: list[dict[str, Any]]
        if chosen == "orchestrated" and ensure_orchestrator(state, explicit=mode == "orchestrated"):
            client = state.client()
            import msgspec

            wf_id = client.post("/workflows", msgspec.to_builtins(definition))["workflow_id"]
            for _ in client.stream(f"/workflows/{wf_id}/events"):
                pass
            view = client.get(f"/workflows/{wf_id}")
            task = view["tasks"][0]
            if task["status"] != "completed":
                fail(f"{action} failed: {task.get('error')}", EXIT_FAILED)
            items = (task.get("output") or {}).get(key, [])
        else:
            results = asyncio.run(
                run_direct(
                    definition, state.registry, state.runner(), state.config, lambda *a: None
                )
            )
            task = results["list"]
            if task["status"] != "completed":
                fail(f"{action} failed: {task.get('error')}", EXIT_FAILED)
            items = (task.get("output") or {}).get(key, [])
        emit(
            items,
            output,
            lambda rows: (
                _table([[r.get(c) for c in columns] for r in rows], columns)
                if rows
                else f"no {key}"
            ),
        )


@server.command("delete")
@click.argument("hostname")
@click.option("--infra", default=None)
@mode_options
@wait_option
@output_option
@click.pass_obj
def server_delete(
    state: State, hostname: str, infra: str | None, mode: str | None, wait: bool, output: str
) -> None:
    """Delete a server."""
    with user_errors():
        args = server_delete_args(hostname, infra, state.config.orchestrator.infra_dir)
        definition = WorkflowDefinition(
            name=f"delete server {hostname}",
            tasks=[TaskSpec(id="delete", action="server.delete", args=args)],
        )
        run_operation(state, "server.delete", definition, mode=mode, wait=wait, output=output)


@main.group()
def taskserv() -> None:
    """Task services (containerd, kubernetes, ...)."""


@taskserv.command("create")
@click.argument("taskserv", required=False)
@click.option("--infra", default="wuji", show_default=True)
@click.option("--server", "servers", multiple=True, help="Only on these hostnames.")
@param_option
@mode_options
@wait_option
@output_option
@click.pass_obj
def taskserv_create(state: State, /, **kw: Any) -> None:
    """Install a task service (default: all of the infra's) on its servers."""
    _shortcut_op(state, "taskserv.create", "taskserv", infra.taskserv_workflow, kw)


@main.group()
def cluster() -> None:
    """Clusters."""


@cluster.command("create")
@click.option("--infra", default="wuji", show_default=True)
@click.option("--app", "apps", multiple=True, help="Applications to deploy on the cluster.")
@param_option
@mode_options
@wait_option
@output_option
@click.pass_obj
def cluster_create(state: State, /, **kw: Any) -> None:
    """Servers, then task services, then the cluster and its applications (seed Example 3)."""
    _shortcut_op(state, "cluster.create", "cluster", infra.cluster_workflow, kw)


@server.command("create")
@click.option("--infra", default="wuji", show_default=True)
@click.option("--server", "servers", multiple=True, help="Only these hostnames.")
@param_option
@mode_options
@wait_option
@output_option
@click.pass_obj
def server_create_cmd(state: State, /, **kw: Any) -> None:
    """Create the servers of an infra."""
    _shortcut_op(state, "server.create", "servers", infra.servers_workflow, kw)


# -- workflows ---------------------------------------------------------------------------------


def _read_definition(path: str) -> tuple[WorkflowDefinition | None, bytes, str]:
    file = Path(path)
    fmt = FORMATS.get(file.suffix.lower())
    if fmt is None:
        raise click.BadParameter(
            f"unknown extension {file.suffix!r}: use {', '.join(FORMATS)}", param_hint="FILE"
        )
    try:
        body = file.read_bytes()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}", EXIT_USAGE)
    if fmt == "nickel":
        return None, body, fmt  # evaluated by the gateway (or locally in direct mode)
    return parse_definition(body, fmt), body, fmt


def _submit_file(
    state: State, operation: str, path: str, mode: str | None, wait: bool, output: str
) -> None:
    with user_errors():
        definition, body, fmt = _read_definition(path)
        chosen = resolve_mode(state.config, operation, mode)
        if chosen == "direct":
            if definition is None:
                from shared.nickel_source import evaluate_nickel

                definition = definition_from_data(json.loads(asyncio.run(evaluate_nickel(body))))
            run_direct_and_print(state, definition, output=output)
            return
        if not ensure_orchestrator(state, explicit=True):
            fail(
                f"no orchestrator answers at {state.config.orchestrator.endpoint}", EXIT_UNAVAILABLE
            )
        submit_and_maybe_wait(
            state,
            definition or WorkflowDefinition(name="", tasks=[]),
            wait=wait,
            output=output,
            raw=(body, CONTENT_TYPE[fmt]),
        )


@main.group()
def workflow() -> None:
    """Workflows: submit, watch, control."""


@workflow.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@mode_options
@wait_option
@output_option
@click.pass_obj
def workflow_submit(state: State, file: str, mode: str | None, wait: bool, output: str) -> None:
    """Submit a workflow file (.ncl, .toml, .yaml, .json)."""
    _submit_file(state, "workflow.submit", file, mode, wait, output)


@workflow.command("status")
@click.argument("workflow_id")
@output_option
@click.pass_obj
def workflow_status(state: State, workflow_id: str, output: str) -> None:
    """A workflow's state and every task's."""
    with user_errors():
        view = state.client().get(f"/workflows/{workflow_id}")

        def table(v: dict[str, Any]) -> str:
            head = (
                f"workflow {v['workflow_id']} {v.get('name', '')}\n"
                f"status: {v['status']}  progress: {v.get('progress', 0)}%"
            )
            if v.get("trace_id"):
                head += f"  trace: {v['trace_id']}"
            rows = [
                [
                    t["id"],
                    t["status"],
                    t.get("attempt"),
                    f"{t.get('progress', 0)}%",
                    t.get("executor_id") or "",
                    t.get("error") or "",
                ]
                for t in v.get("tasks", [])
            ]
            return (
                head
                + "\n"
                + _table(rows, ["task", "status", "attempt", "progress", "executor", "error"])
            )

        emit(view, output, table)


@workflow.command("monitor")
@click.argument("workflow_id")
@output_option
@click.pass_obj
def workflow_monitor(state: State, workflow_id: str, output: str) -> None:
    """Watch a workflow live until it ends."""
    with user_errors():
        final = wait_for(state, workflow_id, output=output)
        if output == "json":
            click.echo(json.dumps(final, indent=2, default=str))
        if final.get("status") != "completed":
            sys.exit(EXIT_FAILED)


@workflow.command("list")
@click.option(
    "--status",
    default=None,
    help="queued, running, completed, failed, cancelled (comma-separated).",
)
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--offset", type=int, default=0)
@output_option
@click.pass_obj
def workflow_list(state: State, status: str | None, limit: int, offset: int, output: str) -> None:
    """Workflows, newest first."""
    with user_errors():
        query = f"?limit={limit}&offset={offset}" + (f"&status={status}" if status else "")
        page = state.client().get(f"/workflows{query}")
        emit(
            page,
            output,
            lambda p: _table(
                [
                    [w["workflow_id"], w["name"], w["status"], w["tasks_total"], w["created_at"]]
                    for w in p["workflows"]
                ],
                ["id", "name", "status", "tasks", "created"],
            ),
        )


@workflow.command("cancel")
@click.argument("workflow_id")
@output_option
@click.pass_obj
def workflow_cancel(state: State, workflow_id: str, output: str) -> None:
    """Cancel a workflow: pending tasks are cancelled, running ones stopped."""
    with user_errors():
        emit(
            state.client().post(f"/workflows/{workflow_id}/cancel"),
            output,
            lambda r: f"workflow {r['workflow_id']} {r['status']}",
        )


@workflow.command("retry")
@click.argument("workflow_id")
@wait_option
@output_option
@click.pass_obj
def workflow_retry(state: State, workflow_id: str, wait: bool, output: str) -> None:
    """Re-run the failed, cancelled and skipped tasks of a workflow."""
    with user_errors():
        result = state.client().post(f"/workflows/{workflow_id}/retry")
        if not wait:
            emit(
                result,
                output,
                lambda r: f"workflow {r['workflow_id']} {r['status']} (run {r['run']})",
            )
            return
        final = wait_for(state, workflow_id, output=output)
        if output == "json":
            click.echo(json.dumps(final, indent=2, default=str))
        if final.get("status") != "completed":
            sys.exit(EXIT_FAILED)


@workflow.command("graph")
@click.argument("workflow_id")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "mermaid", "dot"]),
    default="text",
    show_default=True,
)
@click.pass_obj
def workflow_graph(state: State, workflow_id: str, fmt: str) -> None:
    """Draw the DAG with each task's state."""
    with user_errors():
        view = state.client().get(f"/workflows/{workflow_id}")
        click.echo(draw_graph(view["tasks"], fmt))


def draw_graph(tasks: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "mermaid":
        lines = ["graph TD"]
        for t in tasks:
            node = t["id"].replace("-", "_")
            lines.append(f'  {node}["{t["id"]} ({t["status"]})"]:::{t["status"]}')
            lines += [f"  {d.replace('-', '_')} --> {node}" for d in t.get("depends_on", [])]
        lines += [
            "  classDef completed fill:#c8e6c9",
            "  classDef failed fill:#ffcdd2",
            "  classDef running fill:#bbdefb",
            "  classDef skipped fill:#eeeeee",
            "  classDef cancelled fill:#e1bee7",
        ]
        return "\n".join(lines)
    if fmt == "dot":
        color = {
            "completed": "palegreen",
            "failed": "salmon",
            "running": "lightblue",
            "cancelled": "plum",
            "skipped": "lightgrey",
        }
        lines = ["digraph workflow {", "  rankdir=LR;"]
        for t in tasks:
            lines.append(
                f'  "{t["id"]}" [label="{t["id"]}\\n{t["status"]}", style=filled, '
                f"fillcolor={color.get(t['status'], 'white')}];"
            )
            lines += [f'  "{d}" -> "{t["id"]}";' for d in t.get("depends_on", [])]
        return "\n".join([*lines, "}"])
    by_id = {t["id"]: t for t in tasks}
    children: dict[str, list[str]] = {t["id"]: [] for t in tasks}
    for t in tasks:
        for d in t.get("depends_on", []):
            children[d].append(t["id"])
    out: list[str] = []
    seen: set[str] = set()

    def walk(task_id: str, depth: int) -> None:
        mark = " (see above)" if task_id in seen else ""
        out.append(
            f"{'  ' * depth}{'└─ ' if depth else ''}{task_id} [{by_id[task_id]['status']}]{mark}"
        )
        if task_id in seen:
            return
        seen.add(task_id)
        for child in children[task_id]:
            walk(child, depth + 1)

    for t in tasks:
        if not t.get("depends_on"):
            walk(t["id"], 0)
    return "\n".join(out)


@main.group()
def batch() -> None:
    """Batch workflows (the seed's batch mode)."""


@batch.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@wait_option
@output_option
@click.pass_obj
def batch_submit(state: State, file: str, wait: bool, output: str) -> None:
    """Submit a batch workflow file."""
    _submit_file(state, "batch.submit", file, "orchestrated", wait, output)


@batch.command("monitor")
@click.argument("workflow_id")
@output_option
@click.pass_context
def batch_monitor(ctx: click.Context, workflow_id: str, output: str) -> None:
    """Watch a batch workflow live."""
    ctx.invoke(workflow_monitor, workflow_id=workflow_id, output=output)


# -- tasks -------------------------------------------------------------------------------------


@main.group()
def task() -> None:
    """Tasks."""


@task.command("show")
@click.argument("task_id")
@output_option
@click.pass_obj
def task_show(state: State, task_id: str, output: str) -> None:
    """One task: status, attempts, output."""
    with user_errors():
        view = state.client().get(f"/tasks/{task_id}")
        emit(
            view,
            output,
            lambda v: "\n".join(
                f"{k}: {json.dumps(v[k], default=str) if isinstance(v[k], dict | list) else v[k]}"
                for k in v
            ),
        )


@task.command("logs")
@click.argument("task_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the task ends.")
@output_option
@click.pass_obj
def task_logs(state: State, task_id: str, follow: bool, output: str) -> None:
    """A task's stdout and stderr."""
    with user_errors():
        client = state.client()
        if follow:
            for _, chunk in client.stream(f"/tasks/{task_id}/logs?follow=true"):
                for line in chunk.get("lines", []):
                    if output == "json":
                        click.echo(
                            json.dumps(
                                {
                                    "attempt": chunk["attempt"],
                                    "stream": chunk["stream"],
                                    "line": line,
                                }
                            )
                        )
                    else:
                        click.echo(line)
            return
        logs = client.get(f"/tasks/{task_id}/logs")
        emit(logs, output, lambda v: "\n".join(e["line"] for e in v["lines"]))


# -- the rest ----------------------------------------------------------------------------------


@main.command()
@output_option
@click.pass_obj
def health(state: State, output: str) -> None:
    """Whether the orchestrator and its NATS answer."""
    with user_errors():
        doc = state.client().health()
        emit(doc, output, lambda d: _health_text(d, state.config.orchestrator.endpoint))
        if doc.get("status") != "healthy":
            sys.exit(EXIT_UNAVAILABLE)


def _health_text(doc: dict[str, Any], endpoint: str) -> str:
    text = f"{doc['status']} ({endpoint})"
    detail = doc.get("nats", {}).get("detail")
    if detail not in (None, "ok"):
        text += f": {detail}"
    scheduler = doc.get("scheduler")
    if scheduler is not None:  # an older gateway does not say
        text += (
            f"\nscheduler: active ({scheduler.get('holder', '?')})"
            if scheduler.get("active")
            else "\nscheduler: none active (submissions wait in JetStream until one starts)"
        )
    return text


@main.command()
@output_option
@click.pass_obj
def env(state: State, output: str) -> None:
    """The effective configuration and where each value came from."""
    secret = ("auth_token", "password", "token")
    rows = []
    for key, value in state.config.flat().items():
        shown = "********" if key.endswith(secret) and value else value
        if key.endswith("url") and isinstance(value, str):
            shown = redact_url(value)  # nats://user:password@host
        rows.append(
            {"key": key, "value": shown, "source": state.config.sources.get(key, "default")}
        )
    emit(
        rows,
        output,
        lambda r: _table(
            [
                [
                    x["key"],
                    json.dumps(x["value"]) if not isinstance(x["value"], str) else x["value"],
                    x["source"],
                ]
                for x in r
            ],
            ["key", "value", "source"],
        ),
    )


@main.command()
@output_option
@click.pass_obj
def version(state: State, output: str) -> None:
    """CLI, API and orchestrator versions, and whether they are compatible."""
    info: dict[str, Any] = {
        "cli": __version__,
        "api": API_VERSION,
        "orchestrator": None,
        "orchestrator_api": None,
        "compatible": None,
    }
    try:
        doc = state.client().health()
        info["orchestrator"], info["orchestrator_api"] = doc.get("version"), doc.get("api_version")
        same_major = str(doc.get("version", "")).split(".")[:2] == __version__.split(".")[:2]
        info["compatible"] = doc.get("api_version") == API_VERSION and same_major
    except OrchestratorUnavailable:
        pass
    emit(
        info,
        output,
        lambda i: (
            f"cli {i['cli']} (api {i['api']})\norchestrator "
            + (
                f"{i['orchestrator']} (api {i['orchestrator_api']}): "
                f"{'compatible' if i['compatible'] else 'INCOMPATIBLE'}"
                if i["orchestrator"]
                else "not reachable"
            )
        ),
    )


@main.command()
@click.argument("workflow_id")
@output_option
@click.pass_obj
def trace(state: State, workflow_id: str, output: str) -> None:
    """The Jaeger link of a workflow's trace, and its span tree when Jaeger answers."""
    from .jaeger import fetch_spans, render_tree

    with user_errors():
        view = state.client().get(f"/workflows/{workflow_id}?tasks=false")
        trace_id = view.get("trace_id")
        if not trace_id:
            fail("this workflow has no trace id (tracing disabled?)", EXIT_NOT_FOUND)
        jaeger = state.config.tracing.jaeger_ui.rstrip("/")
        spans = fetch_spans(jaeger, trace_id)
        info = {
            "workflow_id": workflow_id,
            "trace_id": trace_id,
            "url": f"{jaeger}/trace/{trace_id}",
            "spans": spans,
        }

        def table(d: dict[str, Any]) -> str:
            text = f"trace {d['trace_id']}\n{d['url']}"
            if d["spans"]:
                return f"{text}\n\n{render_tree(d['spans'])}"
            return f"{text}\n(Jaeger's query API did not answer at {jaeger}: no span tree)"

        emit(info, output, table)


# -- the local orchestrator --------------------------------------------------------------------


def _pidfile(config: Config) -> Path:
    return config.data_dir / "orchestrator.pid"


def _running_pid(config: Config) -> int | None:
    try:
        pid = int(_pidfile(config).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def start_background(config: Config) -> int:
    """Start ``provisioning-orchestrator up`` detached; pidfile and logs under the data dir."""
    pid = _running_pid(config)
    if pid:
        return pid
    data_dir = config.data_dir
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    log = (data_dir / "logs" / "orchestrator.log").open("ab")
    port = config.orchestrator.endpoint.rsplit(":", 1)[-1].split("/")[0]
    argv = [sys.executable, "-m", "services", "--data-dir", str(data_dir), "up", "--nats-port", "0"]
    if port.isdigit():
        argv += ["--port", port]
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    _pidfile(config).write_text(f"{proc.pid}\n")
    return proc.pid


@main.group()
def orchestrator() -> None:
    """Run the orchestrator locally."""


@orchestrator.command("start")
@click.pass_obj
def orchestrator_start(state: State) -> None:
    """Start the local stack in the background."""
    with user_errors():
        if _running_pid(state.config):
            click.echo(f"already running (pid {_running_pid(state.config)})")
            return
        pid = start_background(state.config)
        if not ensure_orchestrator(state, explicit=True):
            deadline = time.monotonic() + 60
            client = state.client()
            while time.monotonic() < deadline:
                try:
                    if client.health().get("status") == "healthy":
                        break
                except OrchestratorUnavailable:
                    pass
                time.sleep(0.5)
            else:
                fail(
                    f"started (pid {pid}) but not healthy; see {state.config.data_dir / 'logs'}",
                    EXIT_UNAVAILABLE,
                )
        click.echo(f"orchestrator running (pid {pid}) at {state.config.orchestrator.endpoint}")


@orchestrator.command("stop")
@click.pass_obj
def orchestrator_stop(state: State) -> None:
    """Stop the local stack started with `start` (or by auto_start)."""
    pid = _running_pid(state.config)
    if not pid:
        click.echo("not running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _running_pid(state.config):
        time.sleep(0.2)
    if _running_pid(state.config):
        fail(f"pid {pid} did not stop", EXIT_FAILED)
    _pidfile(state.config).unlink(missing_ok=True)
    click.echo("stopped")


@orchestrator.command("status")
@output_option
@click.pass_obj
def orchestrator_status(state: State, output: str) -> None:
    """Whether the local stack runs and answers."""
    pid = _running_pid(state.config)
    try:
        health_doc = state.client().health()
    except OrchestratorUnavailable:
        health_doc = {"status": "unreachable"}
    info = {
        "pid": pid,
        "endpoint": state.config.orchestrator.endpoint,
        "status": health_doc.get("status"),
    }
    emit(
        info,
        output,
        lambda i: (
            f"{i['status']} at {i['endpoint']}" + (f" (local pid {i['pid']})" if i["pid"] else "")
        ),
    )
    if info["status"] != "healthy":
        sys.exit(EXIT_UNAVAILABLE)


@orchestrator.command("up", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def orchestrator_up(state: State, args: tuple[str, ...]) -> None:
    """Run the local stack in the foreground (same as `provisioning-orchestrator up`)."""
    os.execv(  # noqa: S606 - replaces this process with the service runner
        sys.executable,
        [sys.executable, "-m", "services", "--data-dir", str(state.config.data_dir), "up", *args],
    )


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script, e.g. `eval "$(provisioning completion bash)"`."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(main, {}, "provisioning", "_PROVISIONING_COMPLETE").source())
