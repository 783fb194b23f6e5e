"""``workflow``, ``batch`` and ``task``: submit, watch and control workflows, read tasks."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from shared.messages import WorkflowDefinition
from shared.workflow import definition_from_data, parse_definition

from ..context import (
    EXIT_FAILED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    State,
    fail,
    mode_options,
    output_option,
    user_errors,
    wait_option,
)
from ..modes import (
    ensure_orchestrator,
    resolve_mode,
    run_direct_and_print,
    submit_and_maybe_wait,
    wait_for,
)
from ..render import draw_graph, emit, table, workflow_text

__all__ = ["batch", "print_plan", "task", "wait_for_plan", "workflow"]

FORMATS = {".json": "json", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".ncl": "nickel"}
CONTENT_TYPE = {
    "json": "application/json",
    "toml": "application/toml",
    "yaml": "application/yaml",
    "nickel": "application/x-nickel",
}


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
        if not ensure_orchestrator(state):
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


def _follow_to_end(state: State, workflow_id: str, output: str) -> None:
    final = wait_for(state, workflow_id, output=output)
    if output == "json":
        click.echo(json.dumps(final, indent=2, default=str))
    if final.get("status") != "completed":
        sys.exit(EXIT_FAILED)


@click.group()
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


def print_plan(plan: dict[str, Any], output: str) -> None:
    def text(p: dict[str, Any]) -> str:
        head = (
            f"plan {p['plan_id']} {p['name']}: {p['status']}"
            + (f" ({', '.join(f'{n} {c}' for c, n in sorted(p['summary'].items()))})")
            + f"\napply it: provisioning workflow apply {p['plan_id']}"
        )
        rows = [
            [t["task"], t["action"], t["change"] or "-", _short(t["detail"] or t["error"])]
            for t in p["tasks"]
        ]
        return head + "\n" + table(rows, ["task", "action", "change", "detail"])

    emit(plan, output, text)


def _short(value: Any, width: int = 70) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def wait_for_plan(state: State, plan_id: str, timeout_s: float = 300) -> dict[str, Any]:
    client = state.client()
    deadline = time.monotonic() + timeout_s
    while True:
        plan: dict[str, Any] = client.get(f"/plans/{plan_id}")
        if plan["status"] != "planning" or time.monotonic() > deadline:
            return plan
        time.sleep(0.3)


@workflow.command("plan")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@output_option
@click.pass_obj
def workflow_plan(state: State, file: str, output: str) -> None:
    """Plan a workflow file: what it would change, changing nothing; prints the plan's id."""
    with user_errors():
        _, body, fmt = _read_definition(file)
        if not ensure_orchestrator(state):
            fail(
                f"no orchestrator answers at {state.config.orchestrator.endpoint}", EXIT_UNAVAILABLE
            )
        accepted = state.client().call(
            "POST", "/workflows?plan=true", raw=body, content_type=CONTENT_TYPE[fmt]
        )
        plan = wait_for_plan(state, accepted["plan_id"])
        print_plan(plan, output)
        if plan["status"] != "ready":
            sys.exit(EXIT_FAILED)


@workflow.command("apply")
@click.argument("plan_id")
@wait_option
@output_option
@click.pass_obj
def workflow_apply(state: State, plan_id: str, wait: bool, output: str) -> None:
    """Apply a plan: exactly what it planned, refused if anything changed since."""
    with user_errors():
        accepted = state.client().post(f"/plans/{plan_id}/apply")
        if not wait:
            emit(
                accepted,
                output,
                lambda a: (
                    f"plan {plan_id} applying as workflow {a['workflow_id']}\n"
                    f"watch it: provisioning workflow monitor {a['workflow_id']}"
                ),
            )
            return
        _follow_to_end(state, accepted["workflow_id"], output)


@workflow.command("approve")
@click.argument("workflow_id")
@click.option("--task", default=None, help="Approve this task's gate (default: what waits).")
@click.option("--comment", default="", help="Recorded with the decision.")
@output_option
@click.pass_obj
def workflow_approve(
    state: State, workflow_id: str, task: str | None, comment: str, output: str
) -> None:
    """Approve a workflow (or one task) waiting at an approval gate."""
    with user_errors():
        body: dict[str, Any] = {"comment": comment} | ({"task": task} if task else {})
        reply = state.client().post(f"/workflows/{workflow_id}/approve", body)
        emit(reply, output, lambda r: f"workflow {r['workflow_id']} approved by {r['by']}")


@workflow.command("reject")
@click.argument("workflow_id")
@click.option("--reason", required=True, help="Why: recorded, and the run ends cancelled.")
@click.option("--task", default=None, help="Reject this task's gate.")
@output_option
@click.pass_obj
def workflow_reject(
    state: State, workflow_id: str, reason: str, task: str | None, output: str
) -> None:
    """Reject a workflow waiting at an approval gate: it ends cancelled."""
    with user_errors():
        body: dict[str, Any] = {"reason": reason} | ({"task": task} if task else {})
        reply = state.client().post(f"/workflows/{workflow_id}/reject", body)
        emit(reply, output, lambda r: f"workflow {r['workflow_id']} rejected by {r['by']}")


@workflow.command("status")
@click.argument("workflow_id")
@output_option
@click.pass_obj
def workflow_status(state: State, workflow_id: str, output: str) -> None:
    """A workflow's state and every task's."""
    with user_errors():
        emit(state.client().get(f"/workflows/{workflow_id}"), output, workflow_text)


@workflow.command("monitor")
@click.argument("workflow_id")
@output_option
@click.pass_obj
def workflow_monitor(state: State, workflow_id: str, output: str) -> None:
    """Watch a workflow live until it ends."""
    with user_errors():
        _follow_to_end(state, workflow_id, output)


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
            lambda p: table(
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
        _follow_to_end(state, workflow_id, output)


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


@click.group()
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
@click.pass_obj
def batch_monitor(state: State, workflow_id: str, output: str) -> None:
    """Watch a batch workflow live."""
    with user_errors():
        _follow_to_end(state, workflow_id, output)


@click.group()
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


def _line_json(attempt: Any, stream: Any, line: str) -> str:
    return json.dumps({"attempt": attempt, "stream": stream, "line": line})


@task.command("logs")
@click.argument("task_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the task ends.")
@click.option("--attempt", type=int, default=None, help="Only this attempt's lines.")
@output_option
@click.pass_obj
def task_logs(state: State, task_id: str, follow: bool, attempt: int | None, output: str) -> None:
    """A task's stdout and stderr (every attempt, or one)."""
    with user_errors():
        client = state.client()
        only = f"&attempt={attempt}" if attempt else ""
        if follow:
            for _, chunk in client.stream(f"/tasks/{task_id}/logs?follow=true{only}"):
                for line in chunk.get("lines", []):
                    if output == "json":
                        click.echo(_line_json(chunk["attempt"], chunk["stream"], line))
                    else:
                        click.echo(line)
            return
        lines = client.log_lines(task_id, attempt=attempt)
        if output == "json":  # one document (a task's logs are bounded: see log_attempts_kept)
            click.echo(json.dumps({"task_id": task_id, "lines": list(lines)}, indent=2))
            return
        for entry in lines:
            click.echo(entry["line"])
