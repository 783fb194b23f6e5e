"""Plans: what a workflow would change, stored; and applying exactly that plan.

``POST /workflows?plan=true`` runs a workflow in plan mode: each task's read-only plan
function, through the same executors. The plan is that run's record: ``GET /plans/{id}``.
``POST /plans/{id}/apply`` refuses (409, saying what changed) a plan that is not ready, was
applied already, is older than ``[plans] max_age_seconds``, whose infra files changed, or whose
targets changed: the plan is made again and compared task by task before anything runs. Then
the plan's own definition runs in apply mode, each task checking its plan once more right
before it runs (``reason: plan_changed`` if it no longer holds).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web

from core import infra
from shared.errors import Conflict, NotFound
from shared.ids import idempotent_workflow_id
from shared.messages import TaskRecord, WorkflowDefinition, WorkflowRecord, display_order

from .common import CONFIG, STORE, STREAMS, error_response, workflow_id
from .responses import AppliedBy, PlannedChange, PlanNode, PlanView, json_response
from .submission import accept, definition_hash, submit

__all__ = ["apply_plan", "get_plan", "plan_view"]

log = logging.getLogger(__name__)
CHECK_POLL_S = 0.2
_PLAN_STATUS: dict[str, Literal["ready", "failed"]] = {
    "completed": "ready",
    "failed": "failed",
    "cancelled": "failed",
}


def apply_id(plan_id: str) -> str:
    """The one workflow that applies a plan: a second apply finds it."""
    return idempotent_workflow_id(f"apply:{plan_id}")


def _change(task: TaskRecord) -> dict[str, Any]:
    out = task.output if isinstance(task.output, dict) else {}
    return {
        "task": task.spec.id,
        "action": task.spec.action,
        "change": out.get("change"),
        "detail": out.get("detail"),
        "status": task.status,
        "error": task.error,
    }


def _status(record: WorkflowRecord) -> Literal["planning", "ready", "failed"]:
    return _PLAN_STATUS.get(record.status, "planning")


def plan_view(
    record: WorkflowRecord, tasks: dict[str, TaskRecord], now: datetime, max_age_s: float
) -> PlanView:
    order = display_order(record.task_ids, tasks)
    changes = [_change(tasks[t]) for t in order]
    age = max(0.0, (now - record.created_at).total_seconds())
    return PlanView(
        plan_id=record.id,
        name=record.name,
        status=_status(record),
        created_at=record.created_at.isoformat(),
        age_seconds=round(age, 3),
        expires_in_seconds=round(max(0.0, max_age_s - age), 3),
        definition_hash=record.definition_hash,
        infra_hashes=record.infra_hashes or {},
        # a plan function's change is a string; anything else is counted by its JSON text
        summary=dict(Counter(_summary_key(c["change"]) for c in changes)),
        tasks=[PlannedChange(**c) for c in changes],
        dag=[
            PlanNode(id=t, action=tasks[t].spec.action, depends_on=tasks[t].spec.depends_on)
            for t in order
        ],
        error=record.error,
        applied_by=None,
    )


def _summary_key(change: Any) -> str:
    if not change:
        return "pending"
    return change if isinstance(change, str) else json.dumps(change, sort_keys=True)[:100]


async def _load_plan(
    request: web.Request, plan_id: str
) -> tuple[WorkflowRecord, dict[str, TaskRecord]]:
    store = request.app[STORE]
    found = await store.workflow(plan_id)
    if found is None or found[0].mode != "plan":
        raise NotFound(f"no plan {plan_id}", plan_id=plan_id)
    tasks = {k: v[0] for k, v in (await store.tasks(plan_id)).items()}
    return found[0], tasks


async def get_plan(request: web.Request) -> web.Response:
    plan_id = workflow_id(request)
    waiting = await request.app[STREAMS].pending_submission(plan_id)
    if waiting is not None and waiting.mode == "plan":  # not taken by the scheduler yet
        return json_response(
            PlanView(
                plan_id=plan_id,
                name=waiting.definition.name,
                status="planning",
                created_at=waiting.submitted_at.isoformat(),
                summary={"pending": len(waiting.definition.tasks)},
                tasks=[],
                applied_by=None,
            )
        )
    record, tasks = await _load_plan(request, plan_id)
    view = plan_view(record, tasks, datetime.now(UTC), request.app[CONFIG].plans.max_age_seconds)
    applied = await request.app[STORE].workflow(apply_id(plan_id))
    if applied:
        view.applied_by = AppliedBy(workflow_id=applied[0].id, status=applied[0].status)
    return json_response(view)


def _definition(record: WorkflowRecord, tasks: dict[str, TaskRecord]) -> WorkflowDefinition:
    """The definition a plan was made from, as its records keep it."""
    return WorkflowDefinition(
        name=record.name,
        tasks=[tasks[t].spec for t in record.task_ids],
        priority=record.priority,
        on_failure=record.on_failure,  # type: ignore[arg-type]
        description=record.description,
        approval=record.approval,
    )


async def _replan(request: web.Request, definition: WorkflowDefinition) -> dict[str, TaskRecord]:
    """Plan the definition again, now, and wait for it (``[plans] check_timeout_seconds``)."""
    answer, _ = await accept(request, definition, "plan-check", mode="plan")
    check_id = str(answer.plan_id)
    deadline = asyncio.get_running_loop().time() + request.app[CONFIG].plans.check_timeout_seconds
    store = request.app[STORE]
    while asyncio.get_running_loop().time() < deadline:
        found = await store.workflow(check_id)
        if found is not None and found[0].status in ("completed", "failed", "cancelled"):
            if found[0].status != "completed":
                raise Conflict(
                    f"the plan could not be checked again: {found[0].error}", check_id=check_id
                )
            return {k: v[0] for k, v in (await store.tasks(check_id)).items()}
        await asyncio.sleep(CHECK_POLL_S)
    raise Conflict(
        "the plan is being checked again but that did not finish in time; apply again shortly",
        check_id=check_id,
    )


async def apply_plan(request: web.Request) -> web.Response:
    plan_id = workflow_id(request)
    waiting = await request.app[STREAMS].pending_submission(plan_id)
    if waiting is not None and waiting.mode == "plan":  # accepted, not taken yet: not ready
        message = f"plan {plan_id} is planning, not ready"
        return error_response(409, "conflict", message, plan_status="planning")
    record, tasks = await _load_plan(request, plan_id)
    config = request.app[CONFIG]
    if record.status != "completed":
        state = _status(record)
        message = f"plan {plan_id} is {state}, not ready"
        return error_response(409, "conflict", message, plan_status=state)
    # accepted and waiting for the scheduler, or taken by it: applied either way. The queue is
    # asked first: the scheduler checkpoints a workflow before it takes its submission off the
    # queue, so one gone from there is in the store read after (the other order missed both)
    waits = await request.app[STREAMS].submission_waits(apply_id(plan_id))
    if waits or await request.app[STORE].workflow(apply_id(plan_id)) is not None:
        return error_response(
            409,
            "conflict",
            f"plan {plan_id} was applied already, by workflow {apply_id(plan_id)}",
            workflow_id=apply_id(plan_id),
        )
    age = (datetime.now(UTC) - record.created_at).total_seconds()
    if age > config.plans.max_age_seconds:
        return error_response(
            409,
            "plan_expired",
            f"plan {plan_id} is {age:.0f}s old, over [plans] max_age_seconds "
            f"({config.plans.max_age_seconds:g}); make a new one",
            age_seconds=round(age, 3),
        )
    definition = _definition(record, tasks)
    if definition_hash(definition) != record.definition_hash:
        return error_response(409, "plan_changed", "the plan's definition changed since the plan")
    now_infra = infra.infra_hashes(definition, config.orchestrator.infra_dir)
    if now_infra != (record.infra_hashes or {}):
        changed = sorted(
            name
            for name in set(now_infra) | set(record.infra_hashes or {})
            if now_infra.get(name) != (record.infra_hashes or {}).get(name)
        )
        return error_response(
            409,
            "plan_changed",
            f"the infra files changed since the plan: {', '.join(changed)}",
            infra=changed,
        )
    again = await _replan(request, definition)
    differences = []
    for task_id in record.task_ids:
        planned, now = _change(tasks[task_id]), _change(again[task_id])
        if planned["change"] != now["change"]:
            differences.append(
                {
                    "task": task_id,
                    "planned": planned["change"],
                    "now": now["change"],
                    "detail": now["detail"],
                }
            )
    if differences:
        first = differences[0]
        return error_response(
            409,
            "plan_changed",
            f"the state of {len(differences)} target(s) changed since the plan, e.g. task "
            f"{first['task']!r}: planned {first['planned']!r}, now {first['now']!r}",
            changed=differences,
        )
    expect = {t: str(_change(tasks[t])["change"]) for t in record.task_ids}
    log.info("applying plan %s as workflow %s", plan_id, apply_id(plan_id))
    return await submit(
        request,
        definition,
        "plan-apply",
        mode="apply",
        workflow_id=apply_id(plan_id),
        plan_id=plan_id,
        expect=expect,
    )
