"""Approval gates: ``POST /workflows/{id}/approve`` and ``/reject``.

Who decides is the authenticated caller (``[gateway] users`` maps each bearer token to a
name); a gate lists its approvers (any authenticated caller when it lists none). With
``[gateway] allow_self_approval = false`` the submitter of a run cannot approve it. The
decision is a command to the scheduler, recorded in the workflow (``approvals``) and in its
events.
"""

from __future__ import annotations

from typing import Any, TypeVar

from aiohttp import web

from shared import subjects
from shared.errors import Conflict, Forbidden, NotFound
from shared.messages import (
    Approval,
    ApproveWorkflow,
    RejectWorkflow,
    SubmitWorkflow,
    WorkflowRecord,
    encode,
)
from shared.tracing import headers_with_context

from .bodies import ApproveBody, RejectBody, decode_body
from .common import (
    ANONYMOUS,
    BUS,
    CONFIG,
    STORE,
    caller,
    json_body,
    lookup_workflow,
    workflow_id,
)
from .responses import Approving, Rejecting, json_response

__all__ = ["approve", "reject"]

T = TypeVar("T")


async def _body(request: web.Request, kind: type[T]) -> T:
    """The body as ``kind``; no body at all is ``{}`` (an approval needs nothing more)."""
    raw = await json_body(request) if request.can_read_body else {}
    return decode_body(raw, kind)


async def _gates(
    request: web.Request, wf_id: str, task: str | None
) -> tuple[WorkflowRecord, list[tuple[str | None, Approval]]]:
    """The workflow and its gates that wait (``(task id or None, approval)``)."""
    store = request.app[STORE]
    found = await lookup_workflow(request, wf_id)
    if found is None:
        raise NotFound(f"no workflow {wf_id}", workflow_id=wf_id)
    if isinstance(found, SubmitWorkflow):  # accepted: its gates wait only once it is taken
        raise Conflict(
            f"workflow {wf_id} waits for the scheduler; nothing of it awaits approval yet",
            workflow_status="queued",
        )
    record = found[0]
    gates: list[tuple[str | None, Approval]] = []
    if record.approval_deadline is not None and record.approval is not None and task is None:
        gates.append((None, record.approval))
    else:
        for task_id, (rec, _) in (await store.tasks(wf_id)).items():
            waiting = rec.status == "awaiting_approval" and rec.spec.approval is not None
            if waiting and task in (None, task_id) and rec.spec.approval is not None:
                gates.append((task_id, rec.spec.approval))
    if not gates:
        what = f"task {task!r} of workflow {wf_id}" if task else f"workflow {wf_id}"
        raise Conflict(f"nothing of {what} awaits approval", workflow_status=record.status)
    return record, gates


def _may_decide(request: web.Request, record: WorkflowRecord, gates: list[Any]) -> str:
    """The caller, if they may decide every one of ``gates``; raises Forbidden otherwise."""
    who = caller(request)
    for task_id, approval in gates:
        what = f"task {task_id!r}" if task_id else "this workflow"
        if approval.approvers and who not in approval.approvers:
            raise Forbidden(
                f"{who} is not an approver of {what} (approvers: {', '.join(approval.approvers)})",
                caller=who,
            )
    if who == ANONYMOUS and any(a.approvers for _, a in gates):
        raise Forbidden("approvals need an authenticated caller", caller=who)
    allow_self = request.app[CONFIG].gateway.allow_self_approval
    if not allow_self and record.submitted_by is not None and who == record.submitted_by:
        raise Forbidden(
            f"{who} submitted this run and may not approve it ([gateway] allow_self_approval)",
            caller=who,
        )
    return who


async def approve(request: web.Request) -> web.Response:
    wf_id = workflow_id(request)
    body = await _body(request, ApproveBody)
    record, gates = await _gates(request, wf_id, body.task)
    who = _may_decide(request, record, gates)
    command = ApproveWorkflow(wf_id, who, body.task, body.comment)
    await request.app[BUS].publish(
        subjects.command_subject("approve", wf_id), encode(command), headers=headers_with_context()
    )
    gated = [task_id or "workflow" for task_id, _ in gates]
    return json_response(
        Approving(workflow_id=wf_id, status="approving", by=who, gates=gated), status=202
    )


async def reject(request: web.Request) -> web.Response:
    wf_id = workflow_id(request)
    body = await _body(request, RejectBody)
    record, gates = await _gates(request, wf_id, body.task)
    who = _may_decide(request, record, gates)
    command = RejectWorkflow(wf_id, who, body.reason, body.task)
    await request.app[BUS].publish(
        subjects.command_subject("reject", wf_id), encode(command), headers=headers_with_context()
    )
    return json_response(
        Rejecting(workflow_id=wf_id, status="rejecting", by=who, reason=body.reason), status=202
    )
