"""Rendering for the terminal: tables, JSON, the DAG as text, Mermaid or DOT, and the lines
direct mode prints as it runs. (The live monitor of an orchestrated run is
:mod:`shared.monitor`, shared with ``provisioning-orchestrator up --demo``.)"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from engine import WorkflowState

__all__ = [
    "direct_reporter",
    "direct_result",
    "draw_graph",
    "emit",
    "health_text",
    "is_tty",
    "table",
    "workflow_text",
]


def emit(data: Any, output: str, text: Callable[[Any], str]) -> None:
    """``data`` as JSON (``--output json``) or as ``text(data)``."""
    if output == "json":
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(text(data))


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str("" if c is None else c) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def is_tty() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


def workflow_text(view: dict[str, Any]) -> str:
    head = (
        f"workflow {view['workflow_id']} {view.get('name', '')}\n"
        f"status: {view['status']}  progress: {view.get('progress', 0)}%"
    )
    if view.get("trace_id"):
        head += f"  trace: {view['trace_id']}"
    rows = [
        [
            t["id"],
            t["status"],
            t.get("attempt"),
            f"{t.get('progress', 0)}%",
            t.get("executor_id") or "",
            t.get("error") or "",
        ]
        for t in view.get("tasks", [])
    ]
    return head + "\n" + table(rows, ["task", "status", "attempt", "progress", "executor", "error"])


def health_text(doc: dict[str, Any], endpoint: str) -> str:
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


def direct_reporter(quiet: bool) -> Callable[[str, str, dict[str, Any]], None]:
    """What direct mode prints while it runs: progress lines and task status changes."""

    def report(task_id: str, kind: str, data: dict[str, Any]) -> None:
        if quiet:
            return
        if kind == "progress":
            click.echo(f"{task_id}: {data['percent']:>3}% {data['message']}")
        elif kind == "task" and data["status"] not in ("queued", "running"):
            click.echo(
                f"{task_id}: {data['status']}"
                + (f" ({data['error']})" if data.get("error") else "")
            )

    return report


def direct_result(state: WorkflowState) -> dict[str, Any]:
    """A direct run's end, as ``--output json`` prints it."""
    tasks: dict[str, dict[str, Any]] = {}
    for task_id in state.order:
        task = state.tasks[task_id]
        duration = (
            round((task.finished_at - task.started_at).total_seconds(), 3)
            if task.started_at and task.finished_at
            else None
        )
        tasks[task_id] = {
            "status": task.status,
            "attempt": task.attempt,
            "output": task.output,
            "error": task.error,
            "exit_code": task.exit_code,
            "reason": task.reason,
            "duration_seconds": duration,
        }
    return {"mode": "direct", "status": state.record.status, "tasks": tasks}


def _mermaid_id(task_id: str) -> str:
    return task_id.replace("-", "_").replace("[", "_").replace("]", "")


_COLOURS = {
    "completed": ("#c8e6c9", "palegreen"),
    "failed": ("#ffcdd2", "salmon"),
    "running": ("#bbdefb", "lightblue"),
    "skipped": ("#eeeeee", "lightgrey"),
    "cancelled": ("#e1bee7", "plum"),
}


def _edges(task: dict[str, Any]) -> list[str]:
    """What a task comes after: its dependencies, or for a fan-out child its parent."""
    return [task["parent"]] if task.get("parent") else list(task.get("depends_on", []))


def draw_graph(tasks: list[dict[str, Any]], fmt: str) -> str:
    """The DAG with each task's status, as ``text``, ``mermaid`` or ``dot``; fan-out
    children hang under their parent."""
    tasks = [{**t, "depends_on": _edges(t)} for t in tasks]
    if fmt == "mermaid":
        lines = ["graph TD"]
        for t in tasks:
            node = _mermaid_id(t["id"])
            lines.append(f'  {node}["{t["id"]} ({t["status"]})"]:::{t["status"]}')
            lines += [f"  {_mermaid_id(d)} --> {node}" for d in t.get("depends_on", [])]
        lines += [f"  classDef {status} fill:{fill}" for status, (fill, _) in _COLOURS.items()]
        return "\n".join(lines)
    if fmt == "dot":
        lines = ["digraph workflow {", "  rankdir=LR;"]
        for t in tasks:
            colour = _COLOURS.get(t["status"], ("", "white"))[1]
            lines.append(
                f'  "{t["id"]}" [label="{t["id"]}\\n{t["status"]}", style=filled, '
                f"fillcolor={colour}];"
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
