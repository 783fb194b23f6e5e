"""What one step of the scheduler's engine changed, waiting to be applied to JetStream.

The engine handles a batch of inputs (executor reports, retry timers) in memory, then applies
the result in one go and in this order: task checkpoints (KV, with revision checks); then,
together, workflow checkpoints and the dispatches and kills the task checkpoints allow; events;
the end of finished workflows; and only then the acks of the inputs. Several changes to one
task in a step make one write.
"""

from __future__ import annotations

from collections import defaultdict

from nats.aio.msg import Msg

from shared.messages import TaskEvent, WorkflowEvent

from .state import WorkflowState

__all__ = ["Batch"]


class Batch:
    def __init__(self) -> None:
        self.tasks: dict[tuple[str, str], WorkflowState] = {}  # (workflow, task) to write
        self.workflows: dict[str, WorkflowState] = {}  # workflow records to write
        self.events: list[WorkflowEvent | TaskEvent] = []
        self.dispatches: list[tuple[WorkflowState, str]] = []
        self.kills: dict[str, list[str]] = defaultdict(list)  # workflow -> running tasks to stop
        self.finished: dict[str, WorkflowState] = {}  # workflows that reached an end state
        self.msgs: list[Msg] = []  # inputs to ack once all of the above is applied

    def __bool__(self) -> bool:
        return bool(
            self.tasks
            or self.workflows
            or self.events
            or self.dispatches
            or self.kills
            or self.finished
            or self.msgs
        )
