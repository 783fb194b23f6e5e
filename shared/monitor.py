"""Live monitoring of a workflow from its Server-Sent Events, for terminals and for pipes."""

from __future__ import annotations

import shutil
from typing import IO, Any

from .api_client import ApiClient
from .messages import TERMINAL_TASK

__all__ = ["Board", "monitor_workflow", "render_summary"]

_COLOR = {
    "completed": "\x1b[32m",
    "failed": "\x1b[31m",
    "running": "\x1b[36m",
    "retrying": "\x1b[33m",
    "cancelled": "\x1b[35m",
    "cancelling": "\x1b[35m",
    "skipped": "\x1b[90m",
    "waiting": "\x1b[33m",
    "awaiting_approval": "\x1b[33m",
}
_RESET = "\x1b[0m"


def _bar(percent: int, width: int = 20) -> str:
    filled = round(width * max(0, min(100, percent)) / 100)
    return "#" * filled + "." * (width - filled)


class Board:
    """What a monitor knows of a workflow: each event in, the lines that tell it out (and, on a
    terminal, the board redrawn)."""

    def __init__(self, view: dict[str, Any], out: IO[str], tty: bool) -> None:
        self.out = out
        self.tty = tty
        self.name = view.get("name", "")
        self.wf_id = view["workflow_id"]
        self.status = view.get("status", "queued")
        self.tasks: dict[str, dict[str, Any]] = {
            t["id"]: {
                "status": t.get("status", "pending"),
                "progress": t.get("progress", 0),
                "message": t.get("progress_message", ""),
                "attempt": t.get("attempt", 0),
            }
            for t in view.get("tasks", [])
        }
        self.drawn = 0

    def apply(self, kind: str, data: dict[str, Any]) -> list[str]:
        """Update from one event; return the plain lines describing it (in the order things
        happened: a progress report that overtook its task's start announces the start)."""
        if kind == "workflow":
            self.status = data["status"]
            return [
                f"workflow {self.wf_id} {data['status']}"
                + (f": {data['message']}" if data.get("message") else "")
            ]
        task = self.tasks.setdefault(
            data.get("task_id", "?"),
            {"status": "pending", "progress": 0, "message": "", "attempt": 0},
        )
        if kind == "task":
            attempt = data.get("attempt", task["attempt"])
            if task.get("announced") == attempt and data["status"] in ("queued", "running"):
                task["status"] = "running"
                return []  # announced already, by its first progress report
            task["status"] = data["status"]
            task["attempt"] = attempt
            if data["status"] == "completed":
                task["progress"] = 100
            elif data["status"] in ("queued", "retrying"):
                task["progress"], task["message"] = 0, ""
            line = f"task {data['task_id']} {data['status']}"
            if data.get("attempt"):
                line += f" (attempt {data['attempt']})"
            if data.get("error"):
                line += f": {data['error']}"
            elif data.get("detail"):
                line += f": {data['detail']}"
            return [line]
        if kind == "progress":
            lines = []
            attempt = data.get("attempt", task["attempt"])
            started = attempt > task["attempt"] or (
                attempt == task["attempt"] and task["status"] in ("pending", "waiting", "queued")
            )
            if attempt == task["attempt"] and task["status"] in TERMINAL_TASK:
                return []  # a report that came after its attempt's end says nothing new
            if started and task.get("announced") != attempt:
                # the executor's progress came before the scheduler's word that it started
                task["status"], task["attempt"], task["announced"] = "running", attempt, attempt
                lines.append(f"task {data['task_id']} running (attempt {attempt})")
            task["progress"], task["message"] = data["percent"], data.get("message", "")
            lines.append(
                f"task {data['task_id']} {data['percent']:>3}% {data.get('message', '')}".rstrip()
            )
            return lines
        return []

    def draw(self) -> None:
        width = shutil.get_terminal_size((100, 20)).columns
        lines = [f"workflow {self.wf_id} {self.name}: {self.status}"]
        name_w = min(40, max((len(t) for t in self.tasks), default=4))
        for task_id, t in self.tasks.items():
            color = _COLOR.get(t["status"], "")
            text = (
                f"  {task_id:<{name_w}} {color}{t['status']:<9}{_RESET} "
                f"[{_bar(t['progress'])}] {t['progress']:>3}% {t['message']}"
            )
            lines.append(text[: width + len(color) + len(_RESET)])
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F")
        for line in lines:
            self.out.write("\x1b[2K" + line + "\n")
        self.drawn = len(lines)
        self.out.flush()


def render_summary(
    client: ApiClient, view: dict[str, Any], out: IO[str], *, log_tail: int = 5
) -> None:
    status = view.get("status")
    duration = view.get("duration_seconds")
    out.write(
        f"\nworkflow {view['workflow_id']} {status}"
        + (f" in {duration:.1f}s" if duration is not None else "")
        + "\n"
    )
    for task in view.get("tasks", []):
        d = task.get("duration_seconds")
        took = f"{d:.1f}s" if d is not None else "-"
        attempts = f" attempts={task['attempt']}" if task.get("attempt", 0) > 1 else ""
        out.write(f"  {task['id']:<32} {task['status']:<9} {took:>7}{attempts}\n")
        if task["status"] == "completed" and task.get("progress_message"):
            out.write(f"    {task['progress_message']}\n")  # e.g. where the server runs
        if task["status"] == "failed":
            out.write(f"    error: {task.get('error')}\n")
            try:
                attempt = task.get("attempt") or None
                lines = client.log_lines(task["task_id"], attempt=attempt)
                said = [e for e in lines if e.get("stream") == "stdout"][-log_tail:]
            except Exception:
                said = []
            for entry in said:  # what the task said last; its stderr trace stays in its logs
                out.write(f"    | {entry['line']}\n")
            out.write(f"    full output: provisioning task logs {task['task_id']}\n")
    if view.get("trace_id"):
        out.write(f"  trace: {view['trace_id']}\n")
    out.flush()


def monitor_workflow(
    client: ApiClient, wf_id: str, out: IO[str], tty: bool, *, summary: bool = True
) -> dict[str, Any]:
    """Follow a workflow until it ends; return its final view."""
    view = client.get(f"/workflows/{wf_id}")
    board = Board(view, out, tty)
    if tty:
        board.draw()
    # the stream replays every event from the start, then follows live until the workflow ends
    for kind, data in client.stream(f"/workflows/{wf_id}/events"):
        lines = board.apply(kind, data)
        if tty:
            board.draw()
        elif lines:
            out.write("".join(line + "\n" for line in lines))
            out.flush()
    final: dict[str, Any] = client.get(f"/workflows/{wf_id}")
    if summary:
        render_summary(client, final, out)
    return final
