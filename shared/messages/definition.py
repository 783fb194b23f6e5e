"""The workflow definition users write (JSON, Nickel, TOML or YAML)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from ..keys import KeySpec

__all__ = ["Approval", "Backoff", "Compensation", "OnFailure", "TaskSpec", "WorkflowDefinition"]

OnFailure = Literal["stop", "continue", "compensate"]

TaskName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
# a task's id: a name, or (made by the engine, never written in a definition) a fan-out
# child's ``<name>[<index>]``, a compensation's ``<task>[undo]``
TaskId = Annotated[
    str,
    msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}(\[(0|[1-9][0-9]{0,4})\])?(\[undo\])?$"),
]
ApproverName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")]
ActionName = Annotated[
    str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*)+$", max_length=128)
]
Priority = Annotated[int, msgspec.Meta(ge=-1000, le=1000)]


class Backoff(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Retry n waits ``initial_seconds * multiplier**(n-1)``, capped at ``max_seconds``."""

    initial_seconds: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 1.0
    multiplier: Annotated[float, msgspec.Meta(ge=1, le=10)] = 2.0
    max_seconds: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 60.0

    def delay(self, retry: int) -> float:
        return float(min(self.max_seconds, self.initial_seconds * self.multiplier ** (retry - 1)))


class Approval(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A gate: the run stops before this point until one of ``approvers`` (any authenticated
    caller when empty) approves it; ``timeout_seconds`` without a decision cancels the run."""

    approvers: Annotated[list[ApproverName], msgspec.Meta(max_length=100)] = msgspec.field(
        default_factory=list
    )
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=30 * 86400)] = 86400.0


class Compensation(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """How to undo what a completed task did, when its run fails under ``on_failure =
    "compensate"``. In ``args``, a string that is exactly ``{args.<path>}`` or
    ``{result.<path>}`` takes that value from the task's own arguments or result."""

    action: ActionName
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    retries: Annotated[int, msgspec.Meta(ge=0, le=100)] = 2


class TaskSpec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One task of a workflow. ``priority``: higher runs first when executors are saturated."""

    id: TaskId
    action: ActionName
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    depends_on: list[TaskId] = msgspec.field(default_factory=list)
    priority: Priority | None = None
    retries: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    backoff: Backoff = msgspec.field(default_factory=Backoff)
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)] | None = None
    pool: TaskName = "default"
    # keys held while an executor has the task, beside its action's defaults (see shared/keys)
    concurrency: Annotated[list[KeySpec], msgspec.Meta(max_length=16)] | None = None
    # fan-out: one child per item of a dependency's result (see shared/refs), at most
    # `parallelism` of them at once
    for_each: Annotated[str, msgspec.Meta(max_length=600)] | None = None
    parallelism: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | None = None
    # a gate before this task (see Approval); and how to undo it (else its action's default)
    approval: Approval | None = None
    compensate: Compensation | None = None


class WorkflowDefinition(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    tasks: list[TaskSpec]
    priority: Priority = 0
    on_failure: OnFailure = "stop"
    description: Annotated[str, msgspec.Meta(max_length=2000)] = ""
    approval: Approval | None = None  # a gate before anything runs
