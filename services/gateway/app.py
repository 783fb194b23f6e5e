"""The HTTP API, v1. Stateless: every answer comes from JetStream.

A ``202`` is returned only once the submission is stored in JetStream (the publish was acked),
so no crash after it can lose the work.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from core import infra
from core.providers import Providers
from core.registry import Registry
from engine.bindings import claims_for
from shared import API_VERSION, __version__, subjects
from shared.auth import bearer_token, task_token, tokens_equal
from shared.bus import Bus
from shared.cancellation import cancel_and_wait
from shared.config import Config, GatewayConfig
from shared.errors import (
    BusUnavailable,
    Conflict,
    DefinitionError,
    Forbidden,
    MessageError,
    NotFound,
    PayloadTooLarge,
    ProvisioningError,
    QueueFull,
    RequestTimeout,
)
from shared.ids import split_task_key
from shared.keys import parse_rate
from shared.messages import (
    TERMINAL_TASK,
    TERMINAL_WORKFLOW,
    CancelWorkflow,
    Mode,
    Progress,
    ProgressEvent,
    RetryWorkflow,
    SubmitWorkflow,
    TaskRecord,
    WorkflowDefinition,
    WorkflowEvent,
    WorkflowRecord,
    WorkflowStatus,
    decode_event,
    encode,
)
from shared.nickel_source import evaluate_nickel
from shared.parsing import DefinitionParser
from shared.priority import parse_priority
from shared.store import Store
from shared.streams import Streams
from shared.tracing import context_from, headers_with_context
from shared.workflow import (
    format_for_content_type,
    parse_definition,
    validate_definition,
)

from . import approvals, plans
from .bodies import SHORTCUT_TYPES, ProgressBody, ShortcutBody, decode_body
from .common import (
    BUS,
    CALLER,
    CLAIMS,
    CONFIG,
    PARSER,
    RECENT,
    REDACTOR,
    REGISTRY,
    STORE,
    STREAMS,
    lookup_workflow,
)
from .common import error_response as _error
from .common import json_body as _json_body
from .common import task_ids as _task_ids
from .common import workflow_id as _workflow_id
from .console import add_console, is_console_asset
from .openapi import openapi_document
from .responses import (
    LOG_CURSOR_PATTERN,
    LOG_PAGE_DEFAULT,
    LOG_PAGE_MAX,
    MAX_ATTEMPT,
    MAX_OFFSET,
    MAX_PAGE,
    Cancelling,
    Concurrency,
    Executors,
    Health,
    KeyView,
    LogLine,
    NatsHealth,
    ProgressAccepted,
    RateView,
    RetryAccepted,
    SchedulerHealth,
    TaskLogs,
    TracingHealth,
    WorkflowList,
    WorkflowSummary,
    json_response,
)
from .submission import submit as _submit
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

SSE_HEARTBEAT_S = 15.0
INLINE_JSON_MAX_BYTES = 16 * 1024  # JSON definitions up to this size are parsed on the loop
LOG_FOLLOW_POLL_S = 0.5  # how soon a caught-up log follower notices that its task ended
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROGRESS_ROUTE = "/tasks/{id}/progress"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"  # curl's default for -d
_EVENT_ID_RE = re.compile(r"[0-9]{1,19}")
OPENAPI = web.AppKey("openapi", bytes)  # this app's document, encoded once
_WORKFLOW_STATUSES: frozenset[str] = frozenset(get_args(WorkflowStatus))
# Query booleans: what OpenAPI sends (true/false), and the spellings accepted before it.
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_UNSIGNED_RE = re.compile(r"[0-9]{1,19}")


_STATUS_FOR: dict[type[ProvisioningError], int] = {
    NotFound: 404,
    PayloadTooLarge: 413,
    BusUnavailable: 503,
    QueueFull: 503,
    RequestTimeout: 504,
    Conflict: 409,
    Forbidden: 403,
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


def _auth_middleware(config: Config) -> Any:
    """Every route but ``/health`` (and the console's static files) needs a bearer token: the
    operators' ``[gateway] auth_token``, a user's (``[gateway] users``: the caller is then that
    user, e.g. for approvals), or a task's own capability token for its progress."""
    secret = config.gateway.auth_token
    names = {"operator": secret, **config.gateway.users}

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/health" and not is_console_asset(request):
            given = bearer_token(request.headers.get("Authorization", ""))
            who = None
            if given is not None:
                who = next((n for n, token in names.items() if tokens_equal(given, token)), None)
                if who is None and await _task_token_ok(request, secret, given):
                    who = "task"
            if who is None:
                response = _error(401, "unauthorized", "missing or invalid bearer token")
                response.headers["WWW-Authenticate"] = 'Bearer realm="provisioning"'
                return response
            request[CALLER] = who
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


def _timeout_middleware(seconds: float) -> Any:
    """Bound every request but the streams (SSE) to ``[gateway] request_timeout_seconds``."""

    @web.middleware
    async def timeout(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.endswith("/events") or request.query.get("follow"):
            return await handler(request)
        try:
            async with asyncio.timeout(seconds) as deadline:
                return await handler(request)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise RequestTimeout(
                f"the request took longer than {seconds:g}s ([gateway] request_timeout_seconds)"
            ) from None

    return timeout


@web.middleware
async def bus_ready_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if (
        request.path not in ("/health", "/openapi.json")
        and not is_console_asset(request)
        and not request.app[BUS].ready
    ):
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
        scheduler=await _scheduler_health(request.app[STORE])
        if ok
        else SchedulerHealth(active=False),
    )
    if ui_url := request.app[CONFIG].tracing.ui_url:  # the console links trace ids there
        body.tracing = TracingHealth(ui_url=ui_url)
    return json_response(body, status=200 if ok else 503)


async def _scheduler_health(store: Store) -> SchedulerHealth:
    """Whether a scheduler holds the lease (submissions are accepted either way; they wait in
    JetStream until one is active)."""
    try:
        lease = await store.lease()
    except MessageError:
        return SchedulerHealth(active=False, detail="unreadable lease")
    except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
        detail = f"cannot read the lease: {exc or type(exc).__name__}"
        return SchedulerHealth(active=False, detail=detail)
    if lease is None:
        return SchedulerHealth(active=False)
    return SchedulerHealth(
        active=True,
        holder=lease.holder,
        since=datetime.fromtimestamp(lease.acquired_at, UTC).isoformat(),
        renewed_seconds_ago=round(max(0.0, datetime.now(UTC).timestamp() - lease.renewed_at), 3),
    )


def _unsupported(content_type: str) -> web.HTTPUnsupportedMediaType:
    return web.HTTPUnsupportedMediaType(
        text=f"unsupported Content-Type {content_type[:100]!r}: use JSON, TOML, YAML or Nickel"
    )


async def submit_workflow(request: web.Request) -> web.Response:
    content_type = request.headers.get("Content-Type", "").strip() or "application/json"
    fmt = format_for_content_type(content_type)
    # curl's default for -d: the body is JSON if it parses as JSON, else it is a 415
    form = fmt is None and content_type.split(";", 1)[0].strip().lower() == FORM_CONTENT_TYPE
    if form:
        fmt = "json"
    if fmt is None:
        raise _unsupported(content_type)
    gateway = request.app[CONFIG].gateway
    body = await _read_definition(request, fmt)
    if fmt == "nickel":
        json_text = await evaluate_nickel(
            body, timeout_s=gateway.parse_timeout_seconds, max_output_bytes=gateway.max_body_bytes
        )
        definition = await _parse_definition(request, json_text, "json")
    else:
        try:
            definition = await _parse_definition(request, body, fmt)
        except DefinitionError as exc:
            if form and exc.reason == "malformed":  # not JSON: a form, as its type says
                raise _unsupported(content_type) from None
            raise
    return await _submit(request, definition, f"api:{fmt}", mode=_mode(request), validated=True)


def _body_limit(gateway: GatewayConfig, fmt: str) -> tuple[int, str]:
    """The size bound of a definition in ``fmt`` and the key that sets it. YAML, TOML and
    Nickel expand (into more values, or by evaluation) and cost more per byte than JSON."""
    match fmt:
        case "yaml":
            limit, name = gateway.max_yaml_bytes, "max_yaml_bytes"
        case "toml":
            limit, name = gateway.max_toml_bytes, "max_toml_bytes"
        case "nickel":
            limit, name = gateway.max_nickel_bytes, "max_nickel_bytes"
        case _:
            return gateway.max_body_bytes, "max_body_bytes"
    if limit >= gateway.max_body_bytes:  # no body is ever read past max_body_bytes
        return gateway.max_body_bytes, "max_body_bytes"
    return limit, name


async def _read_definition(request: web.Request, fmt: str) -> bytes:
    """The request body, within the size bound of its format (413 past it)."""
    limit, name = _body_limit(request.app[CONFIG].gateway, fmt)
    body = await request.read()  # at most max_body_bytes (aiohttp answers 413 past it)
    if len(body) > limit:
        raise PayloadTooLarge(
            f"a {fmt.upper()} definition may have at most {limit} bytes; this one has "
            f"{len(body)} ([gateway] {name})",
            limit=limit,
            format=fmt,
        )
    return body


async def _parse_definition(request: web.Request, body: bytes, fmt: str) -> WorkflowDefinition:
    """Parse and validate a definition: small JSON here, anything else in a parser process,
    bounded in time ([gateway] parse_timeout_seconds), so that the loop never waits for it."""
    app = request.app
    max_tasks = app[CONFIG].gateway.max_tasks_per_workflow
    if fmt == "json" and len(body) <= INLINE_JSON_MAX_BYTES:
        definition = parse_definition(body, fmt)
        validate_definition(definition, app[REGISTRY], max_tasks=max_tasks)
        return definition
    return await app[PARSER].parse(body, fmt, actions=app[REGISTRY].names(), max_tasks=max_tasks)


def _mode(request: web.Request) -> Mode:
    """``?plan=true`` plans the workflow instead of running it."""
    return "plan" if _query_bool(request, "plan", False) else "run"


def _shortcut_request(kind: str, body: ShortcutBody) -> tuple[str, dict[str, Any]]:
    """The infra and the params of a shortcut's body, in the seed's forms too: its ``type``
    must be this endpoint's, ``infra_name`` names the infra as ``infra`` does, and the
    workflow's ``priority`` may be given at the top or in ``params`` (a number or a named
    level: both given, they must be the same)."""
    expected = SHORTCUT_TYPES[kind]
    if body.type is not msgspec.UNSET and body.type != expected:
        raise DefinitionError(
            f"type {body.type!r} is not this endpoint's: POST /workflows/{kind}/create creates "
            f"{expected!r}",
            reason="wrong_field",
            field="type",
            expected=expected,
        )
    names = {n for n in (body.infra, body.infra_name) if isinstance(n, str)}
    if not names:
        raise DefinitionError("infra (or infra_name) is required", reason="wrong_field")
    if len(names) > 1:
        raise DefinitionError(
            f"infra {body.infra!r} and infra_name {body.infra_name!r} name different infras: "
            "give one of them",
            reason="wrong_field",
            field="infra_name",
        )
    params: dict[str, Any] = msgspec.to_builtins(body.params)  # the options given, no others
    priorities = {}
    if body.priority is not msgspec.UNSET:
        priorities["priority"] = parse_priority(body.priority)
    if "priority" in params:
        priorities["params.priority"] = parse_priority(params["priority"], field="params.priority")
    if len(set(priorities.values())) > 1:
        raise DefinitionError(
            f"priority and params.priority differ ({body.priority!r}, {params['priority']!r}): "
            "give one of them",
            reason="wrong_field",
            field="priority",
        )
    if priorities:
        params["priority"] = next(iter(priorities.values()))
    return names.pop(), params


def _shortcut(kind: str) -> Handler:
    build = {
        "servers": infra.servers_workflow,
        "taskserv": infra.taskserv_workflow,
        "cluster": infra.cluster_workflow,
    }[kind]

    async def handler(request: web.Request) -> web.Response:
        raw = await _json_body(request)
        name, params = _shortcut_request(kind, decode_body(raw, ShortcutBody))
        config = request.app[CONFIG]

        def build_and_validate() -> WorkflowDefinition:
            # In a thread: the walk over the arguments is Python and yields the GIL to the
            # loop every few milliseconds (bounded by shared.workflow.MAX_VALUES).
            definition = build(name, params, config.orchestrator.infra_dir)
            validate_definition(
                definition, request.app[REGISTRY], max_tasks=config.gateway.max_tasks_per_workflow
            )
            return definition

        definition = await asyncio.to_thread(build_and_validate)
        return await _submit(
            request, definition, f"{kind}/create", mode=_mode(request), validated=True
        )

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
    recorded = await store.workflow_ids()
    known = set(recorded)
    # accepted (202) but not yet taken by the scheduler: listed too, as queued
    waiting = [i for i in await request.app[STREAMS].pending_submission_ids() if i not in known]
    ids = await _newest_first(store, recorded + waiting)
    matched: list[WorkflowSummary] = []
    skipped = 0
    for start in range(0, len(ids), 100):
        chunk = ids[start : start + 100]
        records = {r.id: r for r in await store.workflows([i for i in chunk if i in known])}
        for wf_id in chunk:
            summary: WorkflowSummary | None
            if wf_id in records:
                summary = workflow_summary(records[wf_id])
            else:
                summary = await _summary_of_waiting(request, wf_id)
            if summary is None:
                continue
            if statuses and summary.status not in statuses:
                continue
            if name and name not in summary.name:
                continue
            if skipped < offset:
                skipped += 1
                continue
            matched.append(summary)
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


async def _summary_of_waiting(request: web.Request, wf_id: str) -> WorkflowSummary | None:
    """The summary of a submission that waited for the scheduler when the listing began: from
    this gateway's memory, else from the submission, else (taken since) from its record."""
    if (accepted := request.app[RECENT].get(wf_id)) is not None:
        return pending_summary(wf_id, *accepted)
    submission = await request.app[STREAMS].pending_submission(wf_id)
    if submission is not None:
        definition = submission.definition
        return pending_summary(
            wf_id, definition.name, len(definition.tasks), submission.submitted_at
        )
    found = await request.app[STORE].workflow(wf_id)
    return workflow_summary(found[0]) if found is not None else None


async def _recent_pending(request: web.Request, wf_id: str) -> WorkflowSummary | None:
    """The summary of a submission accepted here and still waiting in the queue, if it is one;
    whether it waits is asked of JetStream without reading the submission back."""
    accepted = request.app[RECENT].get(wf_id)
    if accepted is None:
        return None
    if not await request.app[STREAMS].submission_waits(wf_id):
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
        found = await lookup_workflow(request, wf_id)
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
    return await lookup_workflow(request, wf_id) is not None


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
    replay = request.app[STREAMS].replay_events(wf_id, idle_s=SSE_HEARTBEAT_S)
    async for seq, pending, data in replay:
        if not data:  # quiet for a while: has the workflow ended without its end event?
            if (end := await _recorded_end(request, wf_id)) is not None:
                await response.write(b"event: workflow\ndata: " + end + b"\n\n")
                break
            await response.write(b": keepalive\n\n")
            continue
        try:
            event = decode_event(data)
        except MessageError:
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
    # A retry accepted (202) but not yet applied makes an ended workflow run again: a cancel
    # behind it wins. Asked before the record is read: the scheduler writes the record of the
    # new run before it removes the retry from the queue, so one of the two looks sees it.
    retry_waits = await request.app[STREAMS].pending_command("retry", wf_id) is not None
    looked_up = await lookup_workflow(request, wf_id)
    if looked_up is None:
        raise NotFound(f"no workflow {wf_id}", workflow_id=wf_id)
    found = None if isinstance(looked_up, SubmitWorkflow) else looked_up
    if found is not None and found[0].status in TERMINAL_WORKFLOW and not retry_waits:
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
    looked_up = await lookup_workflow(request, wf_id)
    if looked_up is None:
        raise NotFound(f"no workflow {wf_id}", workflow_id=wf_id)
    if isinstance(looked_up, SubmitWorkflow):
        return _error(
            409,
            "conflict",
            f"workflow {wf_id} has not run yet (it waits for the scheduler); nothing to retry",
            workflow_status="queued",
        )
    record = looked_up[0]
    if record.status not in ("failed", "cancelled"):
        return _error(
            409,
            "conflict",
            f"only failed or cancelled workflows can be retried; {wf_id} is {record.status}",
            workflow_status=record.status,
        )
    await request.app[BUS].publish(
        subjects.command_subject("retry", wf_id),
        encode(RetryWorkflow(workflow_id=wf_id, runs=record.runs)),
        msg_id=subjects.retry_msg_id(wf_id, record.runs),
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
        waiting = await _waiting_task(request, wf_id, task_id)
        if waiting is None:
            raise NotFound(f"no task {wf_id}.{task_id}", task_id=f"{wf_id}.{task_id}")
        return json_response(task_view(waiting, None))
    return json_response(task_view(found[0], await store.task_progress(wf_id, task_id)))


async def _waiting_task(request: web.Request, wf_id: str, task_id: str) -> TaskRecord | None:
    """A task of a submission still waiting for the scheduler, as the record it will get."""
    submission = await request.app[STREAMS].pending_submission(wf_id)
    if submission is None:
        found = await request.app[STORE].task(wf_id, task_id)  # taken meanwhile
        return found[0] if found is not None else None
    for spec in submission.definition.tasks:
        if spec.id == task_id:
            return TaskRecord(workflow_id=wf_id, spec=spec)
    return None


def _log_query(request: web.Request) -> tuple[int | None, str | None, int]:
    """``attempt``, ``cursor`` and ``limit`` of a logs request, checked."""
    attempt = (
        _query_int(request, "attempt", 1, 1, MAX_ATTEMPT) if "attempt" in request.query else None
    )
    limit = _query_int(request, "limit", LOG_PAGE_DEFAULT, 1, LOG_PAGE_MAX)
    cursor = request.query.get("cursor") or None
    if cursor is not None and not re.fullmatch(LOG_CURSOR_PATTERN, cursor):
        raise DefinitionError(
            "cursor must be a next_cursor from a previous page", reason="malformed"
        )
    return attempt, cursor, limit


async def task_logs(request: web.Request) -> web.StreamResponse:
    """One page of a task's logs (``attempt``, ``cursor``, ``limit``), or with ``follow`` its
    lines as Server-Sent Events, live, until the task has ended."""
    wf_id, task_id = _task_ids(request)
    store = request.app[STORE]
    found = await store.task(wf_id, task_id)
    if found is None and await _waiting_task(request, wf_id, task_id) is None:
        raise NotFound(f"no task {wf_id}.{task_id}", task_id=f"{wf_id}.{task_id}")
    attempt, cursor, limit = _log_query(request)
    streams = request.app[STREAMS]
    follow = _query_bool(request, "follow", False)
    if not follow:
        page = await streams.log_page(wf_id, task_id, attempt=attempt, cursor=cursor, limit=limit)
        body = TaskLogs(
            task_id=subjects.task_key(wf_id, task_id),
            attempt=attempt,
            lines=[msgspec.convert(line, LogLine, from_attributes=True) for line in page.lines],
            next_cursor=page.next_cursor,
        )
        return json_response(body)
    # Follow: replay, then live. When caught up, poll briefly and recheck the task: the stream
    # ends about one poll after the task has ended and no more lines came.
    response = await _sse_response(request)
    loop = asyncio.get_running_loop()
    last_write = loop.time()
    ended = False
    chunks = streams.follow_logs(wf_id, task_id, attempt=attempt, cursor=cursor)
    with contextlib.suppress(ConnectionResetError):
        async for data in chunks:
            if data is None:  # quiet for a moment
                if ended:
                    break
                current = await store.task(wf_id, task_id)
                ended = current is None or current[0].status in TERMINAL_TASK
                if loop.time() - last_write >= SSE_HEARTBEAT_S:
                    await response.write(b": waiting\n\n")
                    last_write = loop.time()
                continue
            await response.write(b"event: log\ndata: " + data + b"\n\n")
            last_write = loop.time()
        await response.write_eof()
    await chunks.aclose()
    return response


async def post_progress(request: web.Request) -> web.Response:
    wf_id, task_id = _task_ids(request)
    raw = await _json_body(request)
    body = decode_body(raw, ProgressBody)  # 0 to 100; 14.0 is 14; any other key is a 422
    try:
        body.message.encode("utf-8")
    except UnicodeEncodeError:
        raise DefinitionError("message is not valid Unicode", reason="wrong_field") from None
    found = await request.app[STORE].task(wf_id, task_id)
    if found is None:
        if await _waiting_task(request, wf_id, task_id) is None:
            raise NotFound(f"no task {wf_id}.{task_id}", task_id=f"{wf_id}.{task_id}")
        message = f"task {wf_id}.{task_id} has not started: its workflow waits for the scheduler"
        return _error(409, "conflict", message)
    record = found[0]
    if record.status in TERMINAL_TASK:
        return _error(409, "conflict", f"task {wf_id}.{task_id} is already {record.status}")
    bus = request.app[BUS]
    now = datetime.now(UTC)
    message = request.app[REDACTOR].text(body.message[:500])  # a task's own post: mask secrets
    with tracer.start_as_current_span(
        "gateway.progress", attributes={"workflow.id": wf_id, "task.id": task_id}
    ) as span:
        span.add_event("progress", {"progress.percent": body.progress, "progress.message": message})
        await bus.nc.publish(
            subjects.event_subject(wf_id),
            encode(ProgressEvent(wf_id, task_id, body.progress, now, message, record.attempt)),
        )
        await request.app[STORE].put_progress(
            wf_id,
            task_id,
            Progress(percent=body.progress, at=now, message=message, attempt=record.attempt),
        )
    return json_response(
        ProgressAccepted(task_id=f"{wf_id}.{task_id}", progress=body.progress), status=202
    )


async def list_executors(request: web.Request) -> web.Response:
    now = datetime.now(UTC)
    beats = sorted(await request.app[STORE].executors(), key=lambda b: b.id)
    return json_response(Executors(executors=[executor_view(beat, now) for beat in beats]))


async def list_concurrency(request: web.Request) -> web.Response:
    """Every concurrency key in use: its limit, holders, waiters in order, and rate window."""
    now = datetime.now(UTC).timestamp()
    keys = []
    for state, _ in sorted(await request.app[STORE].key_states(), key=lambda s: s[0].key):
        entry = KeyView(
            key=state.key,
            limit=state.limit,
            holders=state.holders,
            waiters=state.waiters,
            rate=None,
        )
        if state.rate:
            rate = parse_rate(state.rate)
            recent = sorted(t for t in state.starts if t > now - rate.window_s)
            entry.rate = RateView(
                count=rate.count,
                window_seconds=rate.window_s,
                started_in_window=len(recent),
                next_free_at=datetime.fromtimestamp(recent[0] + rate.window_s, UTC).isoformat()
                if len(recent) >= rate.count
                else None,
            )
        keys.append(entry)
    return json_response(Concurrency(keys=keys))


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


async def _parser_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[PARSER].close()


def create_app(config: Config, registry: Registry, bus: Bus | None = None) -> web.Application:
    logging.getLogger("aiohttp.server").addFilter(_MALFORMED_REQUESTS)
    middlewares: list[Any] = [
        tracing_middleware,
        error_middleware,
        _timeout_middleware(config.gateway.request_timeout_seconds),
    ]
    if config.gateway.auth_token:
        middlewares.append(_auth_middleware(config))
    middlewares.append(bus_ready_middleware)
    app = web.Application(client_max_size=config.gateway.max_body_bytes, middlewares=middlewares)
    the_bus = bus or Bus(config.nats, name="gateway")
    app[BUS] = the_bus
    app[CONFIG] = config
    app[REGISTRY] = registry
    app[REDACTOR] = Providers.from_config(config).redactor  # secrets as of start (core/redact.py)
    app[STORE] = Store(the_bus)
    app[STREAMS] = Streams(the_bus)
    app[CLAIMS] = claims_for(registry, config)
    app[RECENT] = {}
    app[PARSER] = DefinitionParser(
        workers=config.gateway.parse_workers, timeout_s=config.gateway.parse_timeout_seconds
    )
    app.cleanup_ctx.append(_bus_ctx)
    app.cleanup_ctx.append(_parser_ctx)
    app[OPENAPI] = msgspec.json.encode(openapi_document(config.gateway, registry.names()))
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
    app.router.add_get("/concurrency", list_concurrency)
    app.router.add_post("/workflows/{id}/approve", approvals.approve)
    app.router.add_post("/workflows/{id}/reject", approvals.reject)
    app.router.add_get("/plans/{id}", plans.get_plan)
    app.router.add_post("/plans/{id}/apply", plans.apply_plan)
    add_console(app)
    return app
