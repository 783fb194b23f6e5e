"""``server``, ``taskserv`` and ``cluster``: the seed's resource commands, in any mode."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click
import msgspec

from core import infra
from core.infra import server_delete_args, server_list_args
from shared.errors import DefinitionError
from shared.messages import TaskSpec, WorkflowDefinition
from shared.priority import parse_priority

from ..context import (
    EXIT_FAILED,
    EXIT_UNAVAILABLE,
    State,
    fail,
    mode_options,
    output_option,
    param_option,
    parse_params,
    user_errors,
    wait_option,
)
from ..modes import ensure_orchestrator, resolve_mode, run_direct, run_operation
from ..render import emit, table

__all__ = ["cluster", "server", "taskserv"]


def _shortcut_op(
    state: State,
    operation: str,
    kind: str,
    build: Callable[..., WorkflowDefinition],
    kw: dict[str, Any],
) -> None:
    with user_errors():
        params = parse_params(kw.pop("params", ()))
        if kw.get("servers"):
            params["servers"] = list(kw["servers"])
        if kw.get("priority") is not None:
            params["priority"] = kw["priority"]
        for extra in ("taskserv", "apps"):
            if kw.get(extra):
                params[extra] = list(kw[extra]) if extra == "apps" else kw[extra]
        name = kw["infra"]
        definition = build(name, params, state.config.orchestrator.infra_dir)
        # the seed's shortcut: the orchestrator builds the workflow from its own infra files;
        # with an infra of the user's own ([orchestrator] infra_dir) the orchestrator need not
        # have it, and the definition built here from it is what is sent
        shortcut = (
            None
            if state.config.orchestrator.infra_dir
            else (kind, {"infra": name, "params": params})
        )
        if kw.pop("plan", False):
            if shortcut:
                _plan(state, f"/workflows/{kind}/create?plan=true", shortcut[1], kw["output"])
            else:
                _plan(state, "/workflows?plan=true", msgspec.to_builtins(definition), kw["output"])
            return
        run_operation(
            state,
            operation,
            definition,
            mode=kw.get("mode"),
            wait=kw["wait"],
            output=kw["output"],
            shortcut=shortcut,
        )


def _plan(state: State, path: str, body: Any, output: str) -> None:
    """Plan (``--plan``): what it would change, changing nothing."""
    from .workflows import print_plan, wait_for_plan

    if not ensure_orchestrator(state):
        fail(f"no orchestrator answers at {state.config.orchestrator.endpoint}", EXIT_UNAVAILABLE)
    accepted = state.client().post(path, body)
    plan = wait_for_plan(state, accepted["plan_id"])
    print_plan(plan, output)
    if plan["status"] != "ready":
        sys.exit(EXIT_FAILED)


plan_option = click.option(
    "--plan", is_flag=True, help="Only plan: show what it would change, change nothing."
)


def _priority(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_priority(int(value) if value.lstrip("-").isdigit() else value)
    except DefinitionError as exc:
        raise click.BadParameter(exc.message) from None


priority_option = click.option(
    "--priority",
    callback=_priority,
    metavar="LEVEL",
    help="Low, Normal, High, Critical (any case), or an integer from -1000 to 1000: higher "
    "runs first when executors are saturated.",
)


def shortcut_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """What every create command takes: parameters, mode, wait, output, plan, priority."""
    for option in (priority_option, plan_option, output_option, wait_option, mode_options):
        command = option(command)
    return param_option(command)


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
        task: dict[str, Any]
        if chosen == "orchestrated" and ensure_orchestrator(state):
            import msgspec

            client = state.client()
            wf_id = client.post("/workflows", msgspec.to_builtins(definition))["workflow_id"]
            for _ in client.stream(f"/workflows/{wf_id}/events"):
                pass
            task = client.get(f"/workflows/{wf_id}")["tasks"][0]
        else:
            task = run_direct(state, definition, quiet=True)["tasks"]["list"]
        if task["status"] != "completed":
            fail(f"{action} failed: {task.get('error')}", EXIT_FAILED)
        items: list[dict[str, Any]] = (task.get("output") or {}).get(key, [])
        emit(
            items,
            output,
            lambda rows: (
                table([[r.get(c) for c in columns] for r in rows], columns) if rows else f"no {key}"
            ),
        )


@click.group()
def server() -> None:
    """Servers."""


@server.command("create")
@click.option("--infra", default="wuji", show_default=True)
@click.option("--server", "servers", multiple=True, help="Only these hostnames.")
@shortcut_options
@click.pass_obj
def server_create(state: State, /, **kw: Any) -> None:
    """Create the servers of an infra."""
    _shortcut_op(state, "server.create", "servers", infra.servers_workflow, kw)


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


@click.group()
def taskserv() -> None:
    """Task services (containerd, kubernetes, ...)."""


@taskserv.command("create")
@click.argument("taskserv", required=False)
@click.option("--infra", default="wuji", show_default=True)
@click.option("--server", "servers", multiple=True, help="Only on these hostnames.")
@shortcut_options
@click.pass_obj
def taskserv_create(state: State, /, **kw: Any) -> None:
    """Install a task service (default: all of the infra's) on its servers."""
    _shortcut_op(state, "taskserv.create", "taskserv", infra.taskserv_workflow, kw)


@click.group()
def cluster() -> None:
    """Clusters."""


@cluster.command("create")
@click.option("--infra", default="wuji", show_default=True)
@click.option("--app", "apps", multiple=True, help="Applications to deploy on the cluster.")
@shortcut_options
@click.pass_obj
def cluster_create(state: State, /, **kw: Any) -> None:
    """Servers, then task services, then the cluster and its applications (seed Example 3)."""
    _shortcut_op(state, "cluster.create", "cluster", infra.cluster_workflow, kw)
