"""Commands: gateway -> scheduler, on the PROV_COMMANDS work queue."""

from __future__ import annotations

from datetime import datetime

import msgspec

from .definition import WorkflowDefinition

__all__ = ["CancelWorkflow", "Command", "RetryWorkflow", "SubmitWorkflow"]


class SubmitWorkflow(msgspec.Struct, tag="submit", forbid_unknown_fields=True):
    workflow_id: str
    definition: WorkflowDefinition
    submitted_at: datetime
    source: str = "api"
    idempotency_key: str | None = None
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


Command = SubmitWorkflow | CancelWorkflow | RetryWorkflow
