"""One active workflow held in the scheduler's memory, mirroring its KV checkpoints."""

from __future__ import annotations

from collections import defaultdict

from shared.messages import TERMINAL_TASK, TaskRecord, WorkflowRecord

__all__ = ["WorkflowState"]


class WorkflowState:
    """A workflow's record, its tasks' records and KV revisions, and its dependency graph."""

    def __init__(
        self,
        record: WorkflowRecord,
        revision: int,
        tasks: dict[str, TaskRecord],
        revisions: dict[str, int],
    ) -> None:
        self.record = record
        self.revision = revision
        self.tasks = tasks
        self.revisions = revisions
        self.dependents: dict[str, list[str]] = defaultdict(list)
        for task_id, task in tasks.items():
            for dep in task.spec.depends_on:
                self.dependents[dep].append(task_id)

    @property
    def id(self) -> str:
        return self.record.id

    def priority(self, task_id: str) -> int:
        spec = self.tasks[task_id].spec
        return spec.priority if spec.priority is not None else self.record.priority

    def is_ready(self, task_id: str) -> bool:
        task = self.tasks[task_id]
        return task.status == "pending" and all(
            self.tasks[dep].status == "completed" for dep in task.spec.depends_on
        )

    def ready(self) -> list[str]:
        return [t for t in self.record.task_ids if self.is_ready(t)]

    def descendants(self, task_id: str) -> list[str]:
        out: list[str] = []
        seen = {task_id}
        stack = [task_id]
        while stack:
            for child in self.dependents.get(stack.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    out.append(child)
                    stack.append(child)
        return out

    def all_terminal(self) -> bool:
        return all(t.status in TERMINAL_TASK for t in self.tasks.values())

    def final_status(self) -> str:
        statuses = {t.status for t in self.tasks.values()}
        if statuses == {"completed"}:
            return "completed"
        if self.record.cancel_requested:
            return "cancelled"
        if "failed" in statuses:
            return "failed"
        if "cancelled" in statuses:
            return "cancelled"
        return "failed"
