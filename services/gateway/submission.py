"""Submitting a workflow: validation, then the submission stored in JetStream (the 202 means it
is durable), in one of three modes: run it, plan it, or apply a plan."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime

import msgspec
from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from core import infra
from core.providers import check_providers
from engine.bindings import check_keys
from shared import subjects
from shared.errors import DefinitionError, PayloadTooLarge
from shared.ids import idempotent_workflow_id, new_workflow_id
from shared.messages import Mode, SubmitWorkflow, WorkflowDefinition, encode
from shared.tracing import headers_with_context, message_span, trace_id_hex
from shared.workflow import validate_definition

from .common import BUS, CLAIMS, CONFIG, RECENT, RECENT_LIMIT, REGISTRY, STORE, caller
from .responses import Accepted, json_response

__all__ = ["accept", "definition_hash", "submit"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer("provisioning.gateway")


def definition_hash(definition: WorkflowDefinition) -> str:
    """sha256 of the definition's canonical JSON (keys sorted)."""
    return hashlib.sha256(msgspec.json.encode(definition, order="sorted")).hexdigest()


def _valid_idempotency_key(key: str) -> bool:
    """1 to 200 printable characters that are valid UTF-8 (aiohttp hands invalid bytes over
    as lone surrogates, which cannot be hashed into a workflow id)."""
    if not (0 < len(key) <= 200 and key.isprintable()):
        return False
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def submit(
    request: web.Request,
    definition: WorkflowDefinition,
    source: str,
    *,
    mode: Mode = "run",
    workflow_id: str | None = None,
    plan_id: str | None = None,
    expect: dict[str, str] | None = None,
    validated: bool = False,
) -> web.Response:
    """:func:`accept`, answered: 202 with where to follow the workflow (or the plan)."""
    body, headers = await accept(
        request,
        definition,
        source,
        mode=mode,
        workflow_id=workflow_id,
        plan_id=plan_id,
        expect=expect,
        validated=validated,
    )
    return json_response(body, status=202, headers=headers)


async def accept(
    request: web.Request,
    definition: WorkflowDefinition,
    source: str,
    *,
    mode: Mode = "run",
    workflow_id: str | None = None,
    plan_id: str | None = None,
    expect: dict[str, str] | None = None,
    validated: bool = False,
) -> tuple[Accepted, dict[str, str]]:
    """Validate a definition and store its submission in JetStream; return the 202's body and
    headers once it is.

    ``validated``: the caller validated it already. ``mode="plan"`` plans it instead
    (read-only; the answer names the plan), recording the
    hashes of the definition and of the infra files it names; ``mode="apply"`` runs a plan
    (``plan_id``, ``expect``: the change planned per task) under ``workflow_id``."""
    app = request.app
    config = app[CONFIG]
    bus = app[BUS]
    if not validated:  # (off the loop: the walk over the arguments is bounded Python)
        await asyncio.to_thread(
            validate_definition,
            definition,
            app[REGISTRY],
            max_tasks=config.gateway.max_tasks_per_workflow,
        )
    check_keys(definition, app[CLAIMS])
    check_providers(definition, config)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _valid_idempotency_key(key):
        raise DefinitionError(
            "Idempotency-Key must be 1 to 200 printable UTF-8 characters", reason="malformed"
        )
    wf_id = workflow_id or (idempotent_workflow_id(key) if key else new_workflow_id())
    if key or workflow_id:
        found = await app[STORE].workflow(wf_id)
        if found is not None:
            replay = Accepted(workflow_id=wf_id, status=found[0].status, idempotent_replay=True)
            return replay, {"Idempotent-Replayed": "true"}
    with message_span(
        tracer,
        "gateway.submit",
        subjects.command_subject("submit", wf_id),
        kind=SpanKind.PRODUCER,
        attributes={
            "workflow.id": wf_id,
            "workflow.name": definition.name,
            "workflow.tasks": len(definition.tasks),
        },
    ):
        hashes = (
            (
                definition_hash(definition),
                infra.infra_hashes(definition, config.orchestrator.infra_dir),
            )
            if mode == "plan"
            else (None, None)
        )
        command = SubmitWorkflow(
            workflow_id=wf_id,
            definition=definition,
            submitted_at=datetime.now(UTC),
            source=source,
            idempotency_key=key,
            mode=mode,
            submitted_by=caller(request),
            definition_hash=hashes[0],
            infra_hashes=hashes[1],
            plan_id=plan_id,
            expect=expect,
        )
        data = encode(command)
        limit = bus.nc.max_payload - 4096
        if len(data) > limit:
            raise PayloadTooLarge(
                f"the workflow encodes to {len(data)} bytes; NATS accepts {limit}", limit=limit
            )
        ack = await bus.publish(
            subjects.command_subject("submit", wf_id),
            data,
            msg_id=subjects.submit_msg_id(wf_id),
            headers=headers_with_context(),
        )
        trace_id = trace_id_hex()
    recent = app[RECENT]
    recent[wf_id] = (definition.name, len(definition.tasks), command.submitted_at)
    while len(recent) > RECENT_LIMIT:
        del recent[next(iter(recent))]
    log.info(
        "accepted workflow %s %r (%d tasks, %s)",
        wf_id,
        definition.name,
        len(definition.tasks),
        source,
    )
    body = Accepted(
        workflow_id=wf_id,
        status="queued",
        name=definition.name,
        tasks=len(definition.tasks),
        trace_id=trace_id,
    )
    if ack.duplicate:
        body.idempotent_replay = True
    location = f"/workflows/{wf_id}"
    if mode == "plan":
        body.plan_id, body.status = wf_id, "planning"
        location = f"/plans/{wf_id}"
    return body, {"Location": location}
