"""Mode selection: direct (here, no orchestrator), orchestrated (through the gateway) or auto,
by flag, by the ``[execution]`` patterns, with the fallback to direct; and what each mode does
with a workflow: run it here on the engine, or submit it and follow it."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import sys
from typing import Any

import click
import msgspec

from core.providers import check_providers
from engine.bindings import check_keys, claims_for
from engine.local import run_local
from shared.api_client import OrchestratorUnavailable
from shared.config import Config
from shared.messages import WorkflowDefinition
from shared.monitor import monitor_workflow
from shared.workflow import validate_definition

from .context import EXIT_FAILED, EXIT_UNAVAILABLE, State, fail
from .localstack import start_background, wait_healthy
from .render import direct_reporter, direct_result, emit, is_tty

__all__ = [
    "ensure_orchestrator",
    "resolve_mode",
    "run_direct",
    "run_operation",
    "submit_and_maybe_wait",
    "wait_for",
]

AUTO_START_WAIT_S = 60


def resolve_mode(config: Config, operation: str, flag: str | None) -> str:
    """``direct``, ``orchestrated`` or ``auto`` for an operation such as ``server.create``."""
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


def ensure_orchestrator(state: State) -> bool:
    """Whether an orchestrator answers; starts a local one when configured to (the seed's
    ensure-orchestrator)."""
    client = state.client()
    try:
        return client.health().get("status") == "healthy"
    except OrchestratorUnavailable:
        pass
    if not state.config.orchestrator.auto_start:
        return False
    click.echo("no orchestrator answers; starting a local one (orchestrator.auto_start)", err=True)
    start_background(state.config)
    if not wait_healthy(client, AUTO_START_WAIT_S):
        fail(
            f"the local orchestrator did not become healthy; see {state.config.data_dir / 'logs'}",
            EXIT_UNAVAILABLE,
        )
    return True


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
        if ensure_orchestrator(state):
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


def run_direct(state: State, definition: WorkflowDefinition, *, quiet: bool) -> dict[str, Any]:
    """Run a workflow here on the engine; its end as :func:`render.direct_result`."""
    config = state.config
    validate_definition(definition, state.registry, max_tasks=config.gateway.max_tasks_per_workflow)
    check_keys(definition, claims_for(state.registry, config))
    check_providers(definition, config)
    final = asyncio.run(
        run_local(definition, state.registry, state.runner(), config, direct_reporter(quiet))
    )
    return direct_result(final)


def run_direct_and_print(state: State, definition: WorkflowDefinition, *, output: str) -> None:
    result = run_direct(state, definition, quiet=output == "json")
    if output == "json":
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(f"{definition.name}: {result['status']} (direct)")
    if result["status"] != "completed":
        sys.exit(EXIT_FAILED)


def submit_and_maybe_wait(
    state: State,
    definition: WorkflowDefinition,
    *,
    wait: bool,
    output: str,
    shortcut: tuple[str, dict[str, Any]] | None = None,
    raw: tuple[bytes, str] | None = None,
    monitor: str = "workflow",
) -> None:
    client = state.client()
    if shortcut:  # the seed's shortcut: the orchestrator builds it from its own infra files
        accepted = client.post(f"/workflows/{shortcut[0]}/create", shortcut[1])
    elif raw:
        accepted = client.call("POST", "/workflows", raw=raw[0], content_type=raw[1])
    else:
        accepted = client.post("/workflows", msgspec.to_builtins(definition))
    wf_id = accepted["workflow_id"]
    if not wait:
        emit(
            accepted,
            output,
            lambda a: (
                f"Workflow submitted: {a['workflow_id']} "
                f"({a['status']}, {a.get('tasks', '?')} tasks)\n"
                f"watch it: provisioning {monitor} monitor {a['workflow_id']}"
            ),
        )
        return
    if output != "json":
        click.echo(f"Workflow submitted: {wf_id} ({accepted['status']})")
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
    return monitor_workflow(client, wf_id, sys.stdout, is_tty())
