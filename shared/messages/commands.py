"""Commands: gateway -> scheduler, on the PROV_COMMANDS work queue."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from .definition import WorkflowDefinition

__all__ = [
    "ApproveWorkflow",
    "CancelWorkflow",
    "Command",
    "RejectWorkflow",
    "RetryWorkflow",
    "SubmitWorkflow",
]


class SubmitWorkflow(msgspec.Struct, tag="submit", forbid_unknown_fields=True):
    workflow_id: str
    definition: WorkflowDefinition
    submitted_at: datetime
    source: str = "api"
    idempotency_key: str | None = None
    mode: Literal["run", "plan", "apply"] = "run"
    submitted_by: str | None = None
    # plan: what it was made from (sha256 of the definition, of each infra file it names)
    definition_hash: str | None = None
    infra_hashes: dict[str, str] | None = None
    # apply: the plan applied, and the change it planned for each task
    plan_id: str | None = None
    expect: dict[str, str] | None = None
    v: int = 1


class CancelWorkflow(msgspec.Struct, tag="cancel", forbid_unknown_fields=True):
    workflow_id: str
    reason: str = "cancelled by request"
    v: int = 1


class RetryWorkflow(msgspec.Struct, tag="retry", forbid_unknown_fields=True):
    """Re-run failed, cancelled and skipped tasks. Applied only while the workflow's ``runs``
    still equals ``runs``, so a redelivered retry never re-runs the workflow twice."""

    workflow_id: str
    runs: int
    v: int = 1


class ApproveWorkflow(msgspec.Struct, tag="approve", forbid_unknown_fields=True):
    """Open an approval gate: the workflow's (``task_id`` None) or one task's (None also opens
    every task gate waiting, when the workflow has no gate of its own)."""

    workflow_id: str
    by: str
    task_id: str | None = None
    comment: str = ""
    v: int = 1


class RejectWorkflow(msgspec.Struct, tag="reject", forbid_unknown_fields=True):
    """Refuse an approval gate: the run ends cancelled, with who refused it and why."""

    workflow_id: str
    by: str
    reason: str
    task_id: str | None = None
    v: int = 1


Command = SubmitWorkflow | CancelWorkflow | RetryWorkflow | ApproveWorkflow | RejectWorkflow
