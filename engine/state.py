"""One active workflow held in memory: its record, its tasks' records and its dependency graph.

Readiness and completion are kept as counters (dependencies not yet completed per task, tasks
in an end state, tasks per status), so the cost of one transition does not grow with the size of
the workflow: a fan-in over 10,000 tasks costs O(1) per finished dependency, not O(10,000).
"""

from __future__ import annotations

from collections import Counter, defaultdict

from shared.messages import BUSY_TASK, TERMINAL_TASK, TaskRecord, WorkflowRecord, display_order

__all__ = ["WorkflowState"]


class WorkflowState:
    """A workflow's record and its tasks' records, with counters kept in step.

    Change a task's status only through :meth:`set_status`, which keeps the counters right.
    """

    def __init__(self, record: WorkflowRecord, tasks: dict[str, TaskRecord]) -> None:
        self.record = record
        self.tasks = tasks
        self.submitted = record.created_at.timestamp()  # ties in the lines of ready tasks
        self.order = display_order(record.task_ids, tasks)  # fan-out children, undos included
        self.dependents: dict[str, list[str]] = defaultdict(list)
        self.waiting: dict[str, int] = {}  # dependencies not completed yet, per task
        self.terminal = 0  # tasks in an end state
        self.counts: Counter[str] = Counter(task.status for task in tasks.values())  # per status
        for task_id, task in tasks.items():
            self.waiting[task_id] = 0
            if task.status in TERMINAL_TASK:
                self.terminal += 1
            for dep in task.spec.depends_on:
                self.dependents[dep].append(task_id)
                dep_task = tasks.get(dep)
                if dep_task is None or dep_task.status != "completed":
                    self.waiting[task_id] += 1

    @property
    def id(self) -> str:
        return self.record.id

    def set_status(self, task_id: str, status: str) -> str:
        """Set a task's status, keeping the counters; returns the previous status."""
        task = self.tasks[task_id]
        old = task.status
        if old == status:
            return old
        self.terminal += (status in TERMINAL_TASK) - (old in TERMINAL_TASK)
        self.counts[old] -= 1
        self.counts[status] += 1
        if old == "completed" or status == "completed":
            step = -1 if status == "completed" else 1
            for child in self.dependents.get(task_id, ()):
                self.waiting[child] += step
        task.status = status  # type: ignore[assignment]
        return old

    def priority(self, task_id: str) -> int:
        spec = self.tasks[task_id].spec
        return spec.priority if spec.priority is not None else self.record.priority

    def is_ready(self, task_id: str) -> bool:
        return self.tasks[task_id].status == "pending" and self.waiting[task_id] == 0

    def ready(self) -> list[str]:
        return [t for t in self.order if self.is_ready(t)]

    def busy(self) -> list[str]:
        """Tasks whose current attempt is out with an executor (dispatched, not yet reported)."""
        return [
            t
            for t in self.order
            if self.tasks[t].status in BUSY_TASK and self.tasks[t].children is None
        ]

    def children(self, parent: str) -> list[str]:
        count = self.tasks[parent].children or 0
        return [f"{parent}[{i}]" for i in range(count)]

    def add_tasks(self, records: list[TaskRecord]) -> None:
        """Tasks made while the workflow runs (compensations), at the end, their
        dependencies among themselves wired."""
        for record in records:
            task_id = record.spec.id
            self.tasks[task_id] = record
            self.counts[record.status] += 1
            self.waiting[task_id] = 0
            self.order.append(task_id)
        for record in records:
            for dep in record.spec.depends_on:
                self.dependents[dep].append(record.spec.id)
                if self.tasks[dep].status != "completed":
                    self.waiting[record.spec.id] += 1

    def add_children(self, parent: str, records: list[TaskRecord]) -> None:
        """A fan-out's children, placed right after it."""
        for record in records:
            task_id = record.spec.id
            self.tasks[task_id] = record
            self.waiting[task_id] = 0
            self.counts[record.status] += 1
        at = self.order.index(parent) + 1
        self.order[at:at] = [r.spec.id for r in records]

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
        return self.terminal == len(self.tasks)

    def count_snapshot(self) -> dict[str, int]:
        """Tasks per status, for the workflow record (summaries never read the tasks)."""
        return {status: n for status, n in sorted(self.counts.items()) if n}

    def final_status(self) -> str:
        """The workflow's end status once every task has ended: completed only if every task
        completed; cancelled when a cancel was asked for; otherwise failed."""
        if self.counts.get("completed", 0) == len(self.tasks):
            return "completed"
        if self.record.cancel_requested:
            return "cancelled"
        if self.counts.get("failed", 0):
            return "failed"
        if self.counts.get("cancelled", 0):
            return "cancelled"
        return "failed"
