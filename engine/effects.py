"""What one step of the engine asks to be done, as data.

The engine never performs I/O: each input it applies adds to an :class:`Effects`, which its
driver takes (:meth:`engine.Engine.take`) and performs. The scheduler service performs them
against JetStream in this order (``services/scheduler/flush.py``): new workflows' records;
task checkpoints; then, together, workflow checkpoints and the dispatches and kills the task
checkpoints allow; events; the end of finished workflows; and only then the acks of the inputs.
Direct mode performs them in memory. Several changes to one task in a step make one write.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

import msgspec

from shared.messages import KeyState, TaskDispatch, TaskEvent, WorkflowEvent

from .state import WorkflowState

__all__ = ["Dispatch", "Effects", "Timer"]


class Timer(msgspec.Struct, frozen=True):
    """Feed :meth:`engine.Engine.timer_due` with this at ``at``: a retry's backoff elapsed
    (``retry``), or an approval gate's deadline passed (``approval``; ``task_id`` "" for the
    workflow's own gate)."""

    workflow_id: str
    task_id: str
    attempt: int
    at: datetime
    kind: str = "retry"


class Dispatch(msgspec.Struct, frozen=True):
    """One task attempt to send to the executors of its pool (after its checkpoint)."""

    message: TaskDispatch
    traceparent: str | None = None  # the workflow's trace, continued by the dispatch span


class Effects:
    def __init__(self) -> None:
        self.created: dict[str, WorkflowState] = {}  # accepted workflows: every record is new
        self.new_tasks: list[tuple[WorkflowState, str]] = []  # fan-out children: records new
        self.reopened: set[str] = set()  # retried workflows: active again
        self.tasks: dict[tuple[str, str], WorkflowState] = {}  # (workflow, task) to checkpoint
        self.workflows: dict[str, WorkflowState] = {}  # workflow records to checkpoint
        # workflows whose only change is their counts of tasks per status: checkpointed too,
        # but a driver may fold several steps' counts into one write (services/scheduler/flush.py)
        self.counts: dict[str, WorkflowState] = {}
        self.dispatches: list[Dispatch] = []
        self.kills: dict[str, list[str]] = defaultdict(list)  # workflow -> tasks to stop now
        self.events: list[WorkflowEvent | TaskEvent] = []
        # per event, the message id of an end (a task's or the workflow's): the same end
        # published twice is stored once; None for the others
        self.event_ids: list[str | None] = []
        self.timers: list[Timer] = []
        self.ended: dict[str, WorkflowState] = {}  # workflows that reached an end state
        # concurrency keys whose state changed: the new state, or None when no longer in use
        self.keys: dict[str, KeyState | None] = {}
        # when to call Engine.pump again although no input came (a rate window opening)
        self.wakeups: list[datetime] = []
        # for metrics: (pool, new status) of every task transition, dispatch-to-start latencies
        self.transitions: list[tuple[str, str]] = []
        self.start_latencies: list[tuple[str, float]] = []

    def __bool__(self) -> bool:
        return bool(
            self.created
            or self.new_tasks
            or self.reopened
            or self.tasks
            or self.workflows
            or self.counts
            or self.dispatches
            or self.kills
            or self.events
            or self.timers
            or self.ended
            or self.keys
            or self.wakeups
        )
