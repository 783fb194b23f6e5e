"""The HTTP API, v1. Stateless: every answer comes from JetStream.

A ``202`` is returned only once the submission is stored in JetStream (the publish was acked),
so no crash after it can lose the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, get_args

import msgspec
import nats.errors
import nats.js.errors
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from nats.js.api import DeliverPolicy
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from core import infra
from core.registry import Registry
from shared import API_VERSION, __version__, subjects
from shared.auth import bearer_token, task_token, tokens_equal
from shared.bus import Bus
from shared.cancellation import cancel_and_wait
from shared.config import Config
from shared.errors import (
    BusUnavailable,
    DefinitionError,
    NotFound,
    PayloadTooLarge,
    ProvisioningError,
    QueueFull,
)
from shared.ids import idempotent_workflow_id, is_workflow_id, new_workflow_id, split_task_key
from shared.messages import (
    TERMINAL_TASK,
    TERMINAL_WORKFLOW,
    CancelWorkflow,
    DecodeError,
    Progress,
    ProgressEvent,
    RetryWorkflow,
    SubmitWorkflow,
    WorkflowDefinition,
    WorkflowEvent,
    WorkflowRecord,
    WorkflowStatus,
    decode_command,
    decode_event,
    decode_lease,
    decode_log,
    encode,
    from_builtins,
)
from shared.nickel_source import evaluate_nickel
from shared.store import Store
from shared.tracing import context_from, headers_with_context, message_span, trace_id_hex
from shared.workflow import (
    format_for_content_type,
    parse_definition,
    validate_definition,
)

from .bodies import ProgressBody, ShortcutBody
from .openapi import openapi_document
from .responses import (
    MAX_OFFSET,
    MAX_PAGE,
    Accepted,
    Cancelling,
    Error,
    ErrorBody,
    Executors,
    Health,
    LogLine,
    NatsHealth,
    ProgressAccepted,
    RetryAccepted,
    SchedulerHealth,
    TaskLogs,
    WorkflowList,
    WorkflowSummary,
    json_response,
)
from .views import (
    executor_view,
    pending_summary,
    pending_view,
    task_view,
    workflow_summary,
    workflow_view,
)

__all__ = ["BUS", "create_app"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer("provisioning.gateway")

BUS = web.AppKey("bus", Bus)
CONFIG = web.AppKey("config", Config)
REGISTRY = web.AppKey("registry", Registry)
STORE = web.AppKey("store", Store)
OPENAPI = web.AppKey("openapi", bytes)  # this app's document, encoded once
# Submissions this gateway accepted, by workflow id: (name, number of tasks, submitted at).
# Their summaries are answered from here until the scheduler writes the record, rather than by
# reading the submission back from JetStream (a 10,000-task definition is about 1 MB).
RECENT = web.AppKey("recent", dict[str, tuple[str, int, datetime]])
RECENT_LIMIT = 1024
SSE_HEARTBEAT_S = 15.0
LOG_FOLLOW_POLL_S = 0.5  # how soon a caught-up log follower notices that its task ended
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROGRESS_ROUTE = "/tasks/{id}/progress"
_EVENT_ID_RE = re.compile(r"[0-9]{1,19}")
_WORKFLOW_STATUSES: frozenset[str] = frozenset(get_args(WorkflowStatus))
# Query booleans: what OpenAPI sends (true/false), and the spellings accepted before it.
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_UNSIGNED_RE = re.compile(r"[0-9]{1,19}")


def _error(status: int, code: str, message: str, **details: Any) -> web.Response:
    body = ErrorBody(code=code, message=message)
    if details:
        body.details = details
    return json_response(Error(error=body), status=status)


_STATUS_FOR: dict[type[ProvisioningError], int] = {
    NotFound: 404,
    PayloadTooLarge: 413,
    BusUnavailable: 503,
    QueueFull: 503,
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except DefinitionError as exc:
        status = 400 if exc.reason == "malformed" else 422
        return _error(status, "bad_request" if status == 400 else exc.code, exc.message, **exc.data)
    except ProvisioningError as exc:
        status = _STATUS_FOR.get(type(exc), 400)
        return _error(status, exc.code, exc.message, **exc.data)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].gateway.max_body_bytes
        return _error(413, "payload_too_large", f"request body over {limit} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        response = _error(exc.status, code, exc.text or exc.reason)
        if "Allow" in exc.headers:  # 405: the methods the resource has (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        log.warning("bus error on %s %s: %s", request.method, request.path, exc)
        return _error(503, "bus_unavailable", f"NATS/JetStream error: {exc or type(exc).__name__}")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error(500, "internal", "internal error; see the gateway log")


async def _task_token_ok(request: web.Request, secret: str, given: str) -> bool:
    """A task's capability token opens ``POST /tasks/{id}/progress`` of that task only, and
    only while the task is at the attempt the token was made for."""
    resource = request.match_info.route.resource
    if request.method != "POST" or resource is None or resource.canonical != PROGRESS_ROUTE:
        return False
    try:
        wf_id, task_id = split_task_key(request.match_info["id"])
    except ValueError:
        return False
    found = await request.app[STORE].task(wf_id, task_id)
    if found is None:
        return False
    return tokens_equal(given, task_token(secret, wf_id, task_id, found[0].attempt))


def _auth_middleware(secret: str) -> Any:
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/health":
            given = bearer_token(request.headers.get("Authorization", ""))
            if given is None or not (
                tokens_equal(given, secret) or await _task_token_ok(request, secret, given)
            ):
                response = _error(401, "unauthorized", "missing or invalid bearer token")
                response.headers["WWW-Authenticate"] = 'Bearer realm="provisioning"'
                return response
        return await handler(request)

    return auth


@web.middleware
async def tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A SERVER span per request, continuing the caller's trace (``traceparent``) if any."""
    route = request.match_info.route.resource
    template = route.canonical if route is not None else request.path
    with tracer.start_as_current_span(
        f"HTTP {request.method} {template}",
        context=context_from(request.headers),
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": request.method,
            "http.route": template,
            "url.path": request.path,
        },
    ) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        return response


@web.middleware
async def bus_ready_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path not in ("/health", "/openapi.json") and not request.app[BUS].ready:
        return _error(503, "bus_unavailable", "not connected to NATS yet")
    return await handler(request)


class _MalformedRequestFilter(logging.Filter):
    """aiohttp logs every request its HTTP parser refuses at ERROR with a traceback that
    echoes the offending bytes (an ``Authorization`` header among them, perhaps). Any client
    can send those: log one line at INFO naming only the error instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "refused a malformed HTTP request: %s %s"
            record.args = (exc.code, type(exc).__name__)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_MALFORMED_REQUESTS = _MalformedRequestFilter()


# -- helpers -----------------------------------------------------------------------------------


def _workflow_id(request: web.Request) -> str:
    wf_id = request.match_info["id"]
    if not is_workflow_id(wf_id):
        raise NotFound(f"no workflow {wf_id!r}", workflow_id=wf_id[:100])
    return wf_id


def _task_ids(request: web.Request) -> tuple[str, str]:
    try:
        return split_task_key(request.match_info["id"])
    except ValueError:
        raise NotFound(f"no task {request.match_info['id'][:100]!r}") from None


def _query_bool(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return default
    value = _BOOLEANS.get(raw.lower())
    if value is None:
        raise DefinitionError(f"{name} must be true or false", reason="malformed")
    return value


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not _UNSIGNED_RE.fullmatch(raw) or not low <= int(raw) <= high:
        raise DefinitionError(f"{name} must be an integer from {low} to {high}", reason="malformed")
    return int(raw)


async def _json_body(request: web.Request) -> Any:
    body = await request.read()
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise DefinitionError("malformed JSON body", reason="malformed") from None


async def _pending_submission(bus: Bus, wf_id: str) -> SubmitWorkflow | None:
    try:
        raw = await bus.js.get_last_msg(
            subjects.STREAM_COMMANDS, subjects.command_subject("submit", wf_id)
        )
    except nats.js.errors.NotFoundError:
        return None
    try:
        command = decode_command(raw.data or b"")
    except (DecodeError, RecursionError):  # nested too deeply: poison too
        return None
    return command if isinstance(command, SubmitWorkflow) else None


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


async def _submit(
    request: web.Request, definition: WorkflowDefinition, source: str
) -> web.Response:
    app = request.app
    config = app[CONFIG]
    bus = app[BUS]
    validate_definition(definition, app[REGISTRY], max_tasks=config.gateway.max_tasks_per_workflow)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _valid_idempotency_key(key):
        raise DefinitionError(
            "Idempotency-Key must be 1 to 200 printable UTF-8 characters", reason="malformed"
        )
    wf_id = idempotent_workflow_id(key) if key else new_workflow_id()
    if key:
        found = await app[STORE].workflow(wf_id)
        if found is not None:
            return json_response(
                Accepted(workflow_id=wf_id, status=found[0].status, idempotent_replay=True),
                status=202,
                headers={"Idempotent-Replayed": "true"},
            )
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
        command = SubmitWorkflow(
            workflow_id=wf_id,
            definition=definition,
            submitted_at=datetime.now(UTC),
            source=source,
            idempotency_key=key,
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
            msg_id=f"submit.{wf_id}",
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
    return json_response(body, status=202, headers={"Location": f"/workflows/{wf_id}"})


# -- handlers ----------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    bus = request.app[BUS]
    ok, reason = await bus.healthy()
    if ok and not bus.ready:  # connected, but other routes still answer 503 until bootstrapped
        ok, reason = False, "connected to NATS; setting up streams and buckets"
    body = Health(
        status="healthy" if ok else "unhealthy",
        version=__version__,
        api_version=API_VERSION,
        nats=NatsHealth(connected=bus.connected, jetstream=ok, detail=reason),
        scheduler=await _scheduler_health(bus) if ok else SchedulerHealth(active=False),
    )
    return json_response(body, status=200 if ok else 503)


async def _scheduler_health(bus: Bus) -> SchedulerHealth:
    """Whether a scheduler holds the lease (submissions are accepted either way; they wait in
    JetStream until one is active)."""
    try:
        entry = await bus.kv.leases.get(subjects.LEASE_SCHEDULER)
    except nats.js.errors.KeyNotFoundError:
        return SchedulerHealth(active=False)
    except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
        detail = f"cannot read the lease: {exc or type(exc).__name__}"
        return SchedulerHealth(active=False, detail=detail)
    if not entry.value:
        return SchedulerHealth(active=False)
    try:
        lease = decode_lease(entry.value)
    except DecodeError:
        return SchedulerHealth(active=False, detail="unreadable lease")
    return SchedulerHealth(
        active=True,
        holder=lease.holder,
        since=datetime.fromtimestamp(lease.acquired_at, UTC).isoformat(),
        renewed_seconds_ago=round(max(0.0, datetime.now(UTC).timestamp() - lease.renewed_at), 3),
    )


async def submit_workflow(request: web.Request) -> web.Response:
    content_type = request.headers.get("Content-Type", "application/json")
    fmt = format_for_content_type(content_type)
    if fmt is None:
        raise web.HTTPUnsupportedMediaType(
            text=f"unsupported Content-Type {content_type!r}: use JSON, TOML, YAML or Nickel"
        )
    body = await request.read()
    if fmt == "nickel":
        definition = parse_definition(await evaluate_nickel(body), "json")
    else:
        definition = parse_definition(body, fmt)
    return await _submit(request, definition, f"api:{fmt}")


def _shortcut(kind: str) -> Handler:
    build = {
        "servers": infra.servers_workflow,
        "taskserv": infra.taskserv_workflow,
        "cluster": infra.cluster_workflow,
    }[kind]

    async def handler(request: web.Request) -> web.Response:
        raw = await _json_body(request)
        try:
            body: ShortcutBody = from_builtins(raw, ShortcutBody)
        except msgspec.ValidationError as exc:
            raise DefinitionError(f"{exc}", reason="wrong_field") from None
        config = request.app[CONFIG]
        params = msgspec.to_builtins(body.params)  # the options given, unset ones left out
        definition = await asyncio.to_thread(
            build, body.infra, params, config.orchestrator.infra_dir
        )
        return await _submit(request, definition, f"{kind}/create")

    return handler


async def _newest_first(store: Store, ids: list[str]) -> list[str]:
    """Workflow ids, newest first. Ids made by the gateway carry their creation time (UUIDv7
    layout: milliseconds, then version 7); ids named by an Idempotency-Key (UUIDv5) do not, so
    those are placed by their record's ``created_at``."""
    keyed = [i for i in ids if i[12:13] != "7"]
    created = {r.id: int(r.created_at.timestamp() * 1000) for r in await store.workflows(keyed)}

    def created_ms(wf_id: str) -> tuple[int, str]:
        return (int(wf_id[:12], 16) if wf_id[12:13] == "7" else created.get(wf_id, 0), wf_id)

    return sorted(ids, key=created_ms, reverse=True)


async def list_workflows(request: web.Request) -> web.Response:
    store = request.app[STORE]
    status = request.query.get("status")
    statuses = set(status.split(",")) if status else None
    if statuses and not statuses <= _WORKFLOW_STATUSES:
        raise DefinitionError(
            f"status must be among {sorted(_WORKFLOW_STATUSES)}", reason="malformed"
        )
    limit = _query_int(request, "limit", 50, 1, MAX_PAGE)
    offset = _query_int(request, "offset", 0, 0, MAX_OFFSET)
    name = request.query.get("name")
    ids = await _newest_first(store, await store.workflow_ids())
    matched: list[WorkflowSummary] = []
    skipped = 0
    for start in range(0, len(ids), 100):
        for record in await store.workflows(ids[start : start + 100]):
            if statuses and record.status not in statuses:
                continue
            if name and name not in record.name:
                continue
            if skipped < offset:
                skipped += 1
                continue
            matched.append(workflow_summary(record))
        if len(matched) > limit:
            break
    has_more = len(matched) > limit
    return json_response(
        WorkflowList(
            workflows=matched[:limit],
            limit=limit,
            offset=offset,
            next_offset=offset + limit if has_more else None,
        )
    )


async def _lookup(
    request: web.Request, wf_id: str
) -> tuple[WorkflowRecord, int] | SubmitWorkflow | None:
    """The workflow's record, else its submission still waiting in the queue, else None.

    Checked record, queue, record: the scheduler writes the record before it acks (removes) the
    submission, so a workflow being taken over between the first two looks is seen by the third.
    """
    store = request.app[STORE]
    found = await store.workflow(wf_id)
    if found is not None:
        return found
    pending = await _pending_submission(request.app[BUS], wf_id)
    if pending is not None:
        return pending
    return await store.workflow(wf_id)


async def _recent_pending(request: web.Request, wf_id: str) -> WorkflowSummary | None:
    """The summary of a submission accepted here and still waiting in the queue, if it is one;
    whether it waits is asked of JetStream without reading the submission back."""
    accepted = request.app[RECENT].get(wf_id)
    if accepted is None:
        return None
    subject = subjects.command_subject("submit", wf_id)
    info = await request.app[BUS].js.stream_info(subjects.STREAM_COMMANDS, subjects_filter=subject)
    if not (info.state.subjects or {}).get(subject):
        return None  # taken by the scheduler (or refused): the record, or nothing, says which
    return pending_summary(wf_id, *accepted)


async def get_workflow(request: web.Request) -> web.Response:
    wf_id = _workflow_id(request)
    store = request.app[STORE]
    include = _query_bool(request, "tasks", True)
    found: tuple[WorkflowRecord, int] | SubmitWorkflow | None = await store.workflow(wf_id)
    if found is None:
        if not include and (summary := await _recent_pending(request, wf_id)) is not None:
            return json_response(summary)
        found = await _lookup(request, wf_id)
    if found is None:
        raise NotFound(f"no workflow {wf_id}", workflow_id=wf_id)
    if isinstance(found, SubmitWorkflow):
        view = pending_view(wf_id, found.definition, found.submitted_at, include_tasks=include)
        return json_response(view)
    request.app[RECENT].pop(wf_id, None)  # the scheduler has it: the record answers from now
    record = found[0]
    if not include and record.counts is not None:  # the summary: one read, however many tasks
        return json_response(workflow_view(record, None, {}))
    tasks, progress = await asyncio.gather(store.tasks(wf_id), store.progress(wf_id))
    records = {k: v[0] for k, v in tasks.items()}
    return json_response(workflow_view(record, records, progress, include_tasks=include))


async def _workflow_exists(request: web.Request, wf_id: str) -> bool:
    return await _lookup(request, wf_id) is not None


async def _sse_response(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    return response


async def _replay(bus: Bus, subject: str) -> AsyncIterator[tuple[int, int, bytes]]:
    """Every message on ``subject`` from the start, then live: ``(seq, pending, data)``."""
    sub = await bus.js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=SSE_HEARTBEAT_S)
            except nats.errors.TimeoutError:
                yield 0, 0, b""
                continue
            meta = msg.metadata
            yield meta.sequence.stream, meta.num_pending, msg.data
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


async def workflow_events(request: web.Request) -> web.StreamResponse:
    try:
        return await _workflow_events(request)
    except ConnectionResetError:  # the client went away
        return web.Response(status=204)


async def _workflow_events(request: web.Request) -> web.StreamResponse:
    wf_id = _workflow_id(request)
    if not await _workflow_exists(request, wf_id):
        raise NotFound(f"no workflow {wf_id}", workflow_id=wf_id)
    # Anything but ASCII digits (a garbled or hostile header) replays from the start.
    raw_last = request.headers.get("Last-Event-ID", "").strip()
    last_id = int(raw_last) if _EVENT_ID_RE.fullmatch(raw_last) else 0
    response = await _sse_response(request)
    terminal_seen = caught_up = False
    async for seq, pending, data in _replay(request.app[BUS], subjects.event_subject(wf_id)):
        if not data:  # quiet for a while: has the workflow ended without its end event?
            if (end := await _recorded_end(request, wf_id)) is not None:
                await response.write(b"event: workflow\ndata: " + end + b"\n\n")
                break
            await response.write(b": keepalive\n\n")
            continue
        try:
            event = decode_event(data)
        except (DecodeError, RecursionError):  # nested too deeply: poison too
            continue
        kind = type(event).__name__.removesuffix("Event").lower()
        if kind == "workflow":  # also when skipped: a Last-Event-ID past the end still ends
            terminal_seen = getattr(event, "status", "") in TERMINAL_WORKFLOW
        if seq > last_id:
            await response.write(f"id: {seq}\nevent: {kind}\ndata: ".encode() + data + b"\n\n")
        if terminal_seen and pending == 0:
            break
        if pending == 0 and not caught_up:  # the history is replayed: once, ask the record
            caught_up = True
            if (end := await _recorded_end(request, wf_id)) is not None:
                await response.write(b"event: workflow\ndata: " + end + b"\n\n")
                break
    await response.write_eof()
    return response


async def _recorded_end(request: web.Request, wf_id: str) -> bytes | None:
    """The workflow's end as an event, when its record says it has ended: a stream whose own
    end event was lost (the scheduler checkpoints first, then publishes) still ends."""
    found = await request.app[STORE].workflow(wf_id)
    if found is None or found[0].status not in TERMINAL_WORKFLOW:
        return None
    record = found[0]
    at = record.finished_at or datetime.now(UTC)
    return encode(WorkflowEvent(wf_id, record.status, at, record.error or ""))


async def cancel_workflow(request: web.Request) -> web.Response:
    wf_id = _workflow_id(request)
    looked_up = await _lookup(request, wf_id)
    if looked_up is None:
        raise NotFound(f"no workflow {wf_id}", workflow_id=wf_id)
    found = None if isinstance(looked_up, SubmitWorkflow) else looked_up
    if found is not None and found[0].status in TERMINAL_WORKFLOW:
        return _error(
            409,
            "conflict",
            f"workflow {wf_id} is already {found[0].status}",
            workflow_status=found[0].status,
        )
    await request.app[BUS].publish(
        subjects.command_subject("cancel", wf_id),
        encode(CancelWorkflow(workflow_id=wf_id)),
        headers=headers_with_context(),
    )
    return json_response(Cancelling(workflow_id=wf_id, status="cancelling"), status=202)


async def retry_workflow(request: web.Request) -> web.Response:
    wf_id = _workflow_id(request)
    looked_up = await _lookup(request, wf_id)
    if looked_up is None:
        raise NotFound(f"no workflow {wf_id}", workflow_id=wf_id)
    # A submission the scheduler has not taken yet is a queued workflow: 409, as for any other.
    status = "queued" if isinstance(looked_up, SubmitWorkflow) else looked_up[0].status
    if isinstance(looked_up, SubmitWorkflow) or status not in ("failed", "cancelled"):
        return _error(
            409,
            "conflict",
            f"only failed or cancelled workflows can be retried; {wf_id} is {status}",
            workflow_status=status,
        )
    record = looked_up[0]
    await request.app[BUS].publish(
        subjects.command_subject("retry", wf_id),
        encode(RetryWorkflow(workflow_id=wf_id, runs=record.runs)),
        msg_id=f"retry.{wf_id}.{record.runs}",
        headers=headers_with_context(),
    )
    return json_response(
        RetryAccepted(workflow_id=wf_id, status="queued", run=record.runs + 1), status=202
    )


async def get_task(request: web.Request) -> web.Response:
    wf_id, task_id = _task_ids(request)
    store = request.app[STORE]
    found = await store.task(wf_id, task_id)
    if found is None:
        raise NotFound(f"no task {wf_id}.{task_id}", task_id=f"{wf_id}.{task_id}")
    return json_response(task_view(found[0], await store.task_progress(wf_id, task_id)))


def _log_entries(data: bytes) -> list[dict[str, Any]]:
    try:
        chunk = decode_log(data)
    except (DecodeError, RecursionError):  # nested too deeply: poison too
        return []
    return [
        {"attempt": chunk.attempt, "stream": chunk.stream, "line": line, "at": chunk.at.isoformat()}
        for line in chunk.lines
    ]


async def _stored_log_lines(bus: Bus, subject: str) -> list[dict[str, Any]]:
    """Every stored line of one task, oldest first; [] at once when there is none."""
    try:
        last = await bus.js.get_last_msg(subjects.STREAM_LOGS, subject)
    except nats.js.errors.NotFoundError:
        return []
    lines: list[dict[str, Any]] = []
    sub = await bus.js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=10)
            except nats.errors.TimeoutError:  # aged out meanwhile: return what there is
                break
            lines += _log_entries(msg.data)
            if msg.metadata.sequence.stream >= (last.seq or 0):
                break
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return lines


async def task_logs(request: web.Request) -> web.StreamResponse:
    wf_id, task_id = _task_ids(request)
    follow = _query_bool(request, "follow", False)
    store = request.app[STORE]
    found = await store.task(wf_id, task_id)
    if found is None:
        raise NotFound(f"no task {wf_id}.{task_id}", task_id=f"{wf_id}.{task_id}")
    bus = request.app[BUS]
    subject = subjects.log_subject(wf_id, task_id)
    if not follow:
        lines = [LogLine(**line) for line in await _stored_log_lines(bus, subject)]
        return json_response(TaskLogs(task_id=f"{wf_id}.{task_id}", lines=lines))
    # Follow: replay, then live. When caught up, poll briefly and recheck the task: the stream
    # ends about one poll after the task has ended and no more lines came.
    response = await _sse_response(request)
    sub = await bus.js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    loop = asyncio.get_running_loop()
    last_write = loop.time()
    ended = False
    try:
        with contextlib.suppress(ConnectionResetError):
            while True:
                try:
                    msg = await sub.next_msg(timeout=LOG_FOLLOW_POLL_S)
                except nats.errors.TimeoutError:
                    if ended:
                        break
                    current = await store.task(wf_id, task_id)
                    ended = current is None or current[0].status in TERMINAL_TASK
                    if loop.time() - last_write >= SSE_HEARTBEAT_S:
                        await response.write(b": waiting\n\n")
                        last_write = loop.time()
                    continue
                await response.write(b"event: log\ndata: " + msg.data + b"\n\n")
                last_write = loop.time()
            await response.write_eof()
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return response


async def post_progress(request: web.Request) -> web.Response:
    wf_id, task_id = _task_ids(request)
    raw = await _json_body(request)
    try:
        body: ProgressBody = from_builtins(raw, ProgressBody)  # 0 to 100; 14.0 is 14
    except msgspec.ValidationError as exc:
        raise DefinitionError(f"{exc}", reason="wrong_field") from None
    try:
        body.message.encode("utf-8")
    except UnicodeEncodeError:
        raise DefinitionError("message is not valid Unicode", reason="wrong_field") from None
    found = await request.app[STORE].task(wf_id, task_id)
    if found is None:
        raise NotFound(f"no task {wf_id}.{task_id}", task_id=f"{wf_id}.{task_id}")
    record = found[0]
    if record.status in TERMINAL_TASK:
        return _error(409, "conflict", f"task {wf_id}.{task_id} is already {record.status}")
    bus = request.app[BUS]
    now = datetime.now(UTC)
    message = body.message[:500]
    with tracer.start_as_current_span(
        "gateway.progress", attributes={"workflow.id": wf_id, "task.id": task_id}
    ) as span:
        span.add_event("progress", {"progress.percent": body.progress, "progress.message": message})
        await bus.nc.publish(
            subjects.event_subject(wf_id),
            encode(ProgressEvent(wf_id, task_id, body.progress, now, message, record.attempt)),
        )
        await bus.kv.progress.put(
            f"{wf_id}.{task_id}",
            encode(
                Progress(percent=body.progress, at=now, message=message, attempt=record.attempt)
            ),
        )
    return json_response(
        ProgressAccepted(task_id=f"{wf_id}.{task_id}", progress=body.progress), status=202
    )


async def list_executors(request: web.Request) -> web.Response:
    now = datetime.now(UTC)
    beats = sorted(await request.app[STORE].executors(), key=lambda b: b.id)
    return json_response(Executors(executors=[executor_view(beat, now) for beat in beats]))


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json", charset="utf-8")


async def not_found(request: web.Request) -> web.Response:
    raise web.HTTPNotFound(text=f"no route {request.method} {request.path}")


# -- application -------------------------------------------------------------------------------


async def _bus_ctx(app: web.Application) -> AsyncIterator[None]:
    bus = app[BUS]

    async def connect() -> None:
        await bus.connect()
        await bus.bootstrap()
        bus.ready = True
        log.info("gateway connected to JetStream")

    task = asyncio.create_task(connect())
    yield
    await cancel_and_wait(task)
    await bus.drain()


def create_app(config: Config, registry: Registry, bus: Bus | None = None) -> web.Application:
    logging.getLogger("aiohttp.server").addFilter(_MALFORMED_REQUESTS)
    middlewares: list[Any] = [tracing_middleware, error_middleware]
    if config.gateway.auth_token:
        middlewares.append(_auth_middleware(config.gateway.auth_token))
    middlewares.append(bus_ready_middleware)
    app = web.Application(client_max_size=config.gateway.max_body_bytes, middlewares=middlewares)
    the_bus = bus or Bus(config.nats, name="gateway")
    app[BUS] = the_bus
    app[CONFIG] = config
    app[REGISTRY] = registry
    app[STORE] = Store(the_bus)
    app[RECENT] = {}
    app[OPENAPI] = msgspec.json.encode(openapi_document(config.gateway, registry.names()))
    app.cleanup_ctx.append(_bus_ctx)
    app.router.add_get("/health", health)
    app.router.add_get("/openapi.json", get_openapi)
    app.router.add_post("/workflows", submit_workflow)
    app.router.add_get("/workflows", list_workflows)
    app.router.add_post("/workflows/servers/create", _shortcut("servers"))
    app.router.add_post("/workflows/taskserv/create", _shortcut("taskserv"))
    app.router.add_post("/workflows/cluster/create", _shortcut("cluster"))
    app.router.add_get("/workflows/{id}", get_workflow)
    app.router.add_get("/workflows/{id}/events", workflow_events)
    app.router.add_post("/workflows/{id}/cancel", cancel_workflow)
    app.router.add_post("/workflows/{id}/retry", retry_workflow)
    app.router.add_get("/tasks/{id}", get_task)
    app.router.add_get("/tasks/{id}/logs", task_logs)
    app.router.add_post(PROGRESS_ROUTE, post_progress)
    app.router.add_get("/executors", list_executors)
    return app
