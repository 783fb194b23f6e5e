"""The OpenAPI 3.1 document of the v1 API.

Every schema is generated from a msgspec Struct: the answers of ``responses.py``, the request
bodies of ``bodies.py`` and ``shared.messages`` (the workflow definition, and the events the
SSE streams carry). Only paths and operations are written here, and the limits that belong to
the running gateway rather than to a type: its registered actions, its task limit, whether
authentication is on. The document is built once per app from its configuration; the contract
test (``tests/test_api_contract.py``) runs schemathesis with every check against it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, get_args

import msgspec

from shared import __version__
from shared.config import GatewayConfig
from shared.ids import NAME_RE
from shared.messages import Event, LogChunk, WorkflowDefinition, WorkflowStatus

from .bodies import REQUESTS, SHORTCUT_TYPES, PriorityValue
from .responses import (
    LOG_CURSOR_PATTERN,
    LOG_PAGE_DEFAULT,
    LOG_PAGE_MAX,
    MAX_ATTEMPT,
    MAX_OFFSET,
    MAX_PAGE,
    RESPONSES,
    TASK_KEY_PATTERN,
    WORKFLOW_ID_PATTERN,
)

__all__ = ["EVENT_KINDS", "openapi_document"]

REF_TEMPLATE = "#/components/schemas/{name}"
# The SSE ``event:`` of each event: its Struct's tag ("workflow", "task", "progress").
EVENT_KINDS: list[str] = [t.__struct_config__.tag for t in get_args(Event)]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(name=name)}


def _json(description: str, schema: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref(schema)}},
        **extra,
    }


def _sse(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/event-stream": {"schema": _ref(schema)}}}


_ERRORS = {
    400: "Malformed body, query parameter or header",
    404: "No such workflow or task",
    413: "Body over [gateway] max_body_bytes (a YAML, TOML or Nickel definition over its own "
    "bound), or a workflow too large for NATS",
    415: "Unsupported Content-Type",
    503: "NATS or JetStream unreachable (or not connected yet), or a queue is full",
    504: "The request took longer than [gateway] request_timeout_seconds (code timeout)",
}
_UNAUTHORIZED = {
    "description": "Authentication is on and the bearer token is missing or wrong",
    "headers": {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    "content": {"application/json": {"schema": _ref("Error")}},
}


class _Operations:
    """Builds operations with the error answers they share."""

    def __init__(self, *, auth: bool) -> None:
        self.auth = auth

    def __call__(
        self,
        operation_id: str,
        summary: str,
        answers: dict[int, dict[str, Any]],
        *,
        errors: dict[int, str] | None = None,
        parameters: list[dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None,
        body_description: str = "",
        body_required: bool = True,
        public: bool = False,
        bus: bool = True,
        timeout: bool = True,
    ) -> dict[str, Any]:
        """``errors``: the 4xx this operation answers besides 401 (auth on, unless ``public``),
        503 (unless it needs no ``bus``) and 504 (unless it is a stream, which has no
        ``timeout``), each with its description or the usual one."""
        responses: dict[str, Any] = {str(code): answer for code, answer in answers.items()}
        codes = dict(errors or {})
        if bus:
            codes.setdefault(503, "")
        if timeout:
            codes.setdefault(504, "")
        for code, text in sorted(codes.items()):
            responses.setdefault(str(code), _json(text or _ERRORS[code], "Error"))
        if self.auth and not public:
            responses["401"] = _UNAUTHORIZED
        operation: dict[str, Any] = {"operationId": operation_id, "summary": summary}
        if parameters:
            operation["parameters"] = parameters
        if body is not None:
            operation["requestBody"] = {"required": body_required, "content": body}
            if body_description:
                operation["requestBody"]["description"] = body_description
        operation["responses"] = dict(sorted(responses.items()))
        if public and self.auth:
            operation["security"] = []
        return operation


def _path(pattern: str, description: str) -> dict[str, Any]:
    return {
        "name": "id",
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "pattern": pattern},
    }


def _query(name: str, schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": schema, **extra}


_WORKFLOW_ID = _path(WORKFLOW_ID_PATTERN, "A workflow id: 32 lowercase hex digits")
_PLAN_ID = _path(WORKFLOW_ID_PATTERN, "A plan id (the id of the run that made the plan)")
_TASK_ID = _path(TASK_KEY_PATTERN, "<workflow_id>.<task id>")
_PLAN = _query(
    "plan",
    {"type": "boolean", "default": False},
    "true plans the workflow instead of running it (read-only: each task's plan function); "
    "the answer names the plan, GET /plans/{id}; true or false (also 1/0, yes/no), anything "
    "else is a 400",
)
_BOOLEAN_SPELLINGS = "true or false (also 1/0, yes/no); anything else is a 400"
# Printable ASCII, 1 to 200 characters once HTTP has dropped the blanks around the value.
_IDEMPOTENCY_KEY = r"^[ \t]*[!-~]([ -~]{0,198}[!-~])?[ \t]*$"


def _links(*targets: str, **parameters: Any) -> dict[str, Any]:
    """OpenAPI links to ``targets`` (operation ids), each given ``parameters``; they let a
    stateful tester chain a submission to the workflow, its tasks, cancel and retry."""
    return {
        target[0].upper() + target[1:]: {"operationId": target, "parameters": parameters}
        for target in targets
    }


# The event streams are not linked: a stream lasts as long as its workflow or task runs.
# A plan's id is the id of the workflow run that makes it: a submission links to its plan too
# (a 404 when it was not planned).
_WORKFLOW_LINKS = _links(
    "getWorkflow",
    "cancelWorkflow",
    "retryWorkflow",
    "approveWorkflow",
    "rejectWorkflow",
    "getPlan",
    **{"path.id": "$response.body#/workflow_id"},
)
_TASK_LINKS = {
    **_links("getTask", "postTaskProgress", **{"path.id": "$response.body#/tasks/0/task_id"}),
    **_links(
        "getTaskLogs", **{"path.id": "$response.body#/tasks/0/task_id", "query.follow": "false"}
    ),
}


def _components(gateway: GatewayConfig, actions: Iterable[str]) -> dict[str, Any]:
    types: list[Any] = [WorkflowDefinition, *REQUESTS, *RESPONSES, Event, LogChunk]
    schemas, components = msgspec.json.schema_components(types, ref_template=REF_TEMPLATE)
    components["Event"] = schemas[types.index(Event)]
    for schema in components.values():  # docstrings, as descriptions
        if "description" in schema:
            schema["description"] = inspect.cleandoc(schema["description"])
    # Limits of this gateway rather than of the type: its action registry and task limit.
    tasks = components["WorkflowDefinition"]["properties"]["tasks"]
    tasks.update(minItems=1, maxItems=gateway.max_tasks_per_workflow)
    task_spec = components["TaskSpec"]["properties"]
    task_spec["action"] = {
        "type": "string",
        "enum": sorted(actions),
        "description": "A registered action (the gateway's action registry)",
    }
    # Names only: <name>[<index>] and <task>[undo] are the engine's, never a definition's.
    name = {"type": "string", "pattern": NAME_RE.pattern}
    task_spec["id"] = name
    task_spec["depends_on"] = {**task_spec["depends_on"], "items": name}
    # A priority may be a named level too (shared.priority), in definitions as in shortcuts.
    priority = msgspec.json.schema(PriorityValue)
    components["WorkflowDefinition"]["properties"]["priority"] = {**priority, "default": 0}
    task_spec["priority"] = {
        "anyOf": [*priority["anyOf"], {"type": "null"}],
        "default": None,
    }
    # The infra is named by infra or (the seed's name) infra_name.
    components["ShortcutBody"]["anyOf"] = [{"required": ["infra"]}, {"required": ["infra_name"]}]
    # The SSE framing: each event's data is one message of shared.messages as JSON.
    components["WorkflowStreamEvent"] = _stream_event(EVENT_KINDS, "Event", "stream sequence")
    components["LogStreamEvent"] = _stream_event(["log"], "LogChunk", None)
    return dict(sorted(components.items()))


def _stream_event(kinds: list[str], data: str, id_description: str | None) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "event": {"enum": kinds},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": _ref(data),
        },
    }
    if id_description:
        properties["id"] = {
            "type": "string",
            "pattern": "^[0-9]+$",
            "description": f"The {id_description}; send it back as Last-Event-ID to resume",
        }
    return {
        "description": "One Server-Sent Event",
        "type": "object",
        "required": ["event", "data"],
        "properties": properties,
    }


def openapi_document(gateway: GatewayConfig, actions: Iterable[str]) -> dict[str, Any]:
    """The document of a gateway with this configuration and these registered actions."""
    auth = bool(gateway.auth_token)
    op = _Operations(auth=auth)
    definition = _ref("WorkflowDefinition")
    accepted = _json(
        "Accepted: durable in JetStream",
        "Accepted",
        headers={
            "Location": {"schema": {"type": "string"}, "description": "/workflows/{id}"},
            "Idempotent-Replayed": {"schema": {"const": "true"}},
        },
        links=_WORKFLOW_LINKS,
    )
    decision_errors = {
        400: "Malformed JSON",
        403: "The caller may not decide: not an approver of a gate, anonymous where a gate "
        "names approvers, or the run's submitter when [gateway] allow_self_approval is false",
        404: "No such workflow",
        409: "Nothing of the workflow (or of the task named) awaits approval",
        413: _ERRORS[413],
    }

    def decision_body(schema: str, example: dict[str, Any]) -> dict[str, Any]:
        return {"application/json": {"schema": _ref(schema), "example": example}}

    submit_errors = {
        400: "Malformed body or Idempotency-Key",
        413: _ERRORS[413],
        422: "Invalid definition (details.task and details.reason say where and why), or a "
        "YAML, TOML or Nickel definition whose parsing took too long (parse_timeout)",
    }

    def shortcut(kind: str, operation_id: str, summary: str) -> dict[str, Any]:
        # The seed's type, when given, must be this endpoint's.
        schema = {
            "allOf": [
                _ref("ShortcutBody"),
                {"properties": {"type": {"const": SHORTCUT_TYPES[kind]}}},
            ]
        }
        return op(
            operation_id,
            summary,
            {202: accepted},
            errors={
                **submit_errors,
                422: "Unknown infra or server, unknown keys (details.fields names them), "
                "infra and infra_name that differ, or invalid params",
            },
            parameters=[_PLAN],
            body={
                "application/json": {
                    "schema": schema,
                    "example": {
                        "type": SHORTCUT_TYPES[kind],
                        "infra": "wuji",
                        "priority": "High",
                        "params": {"delay_seconds": 0},
                    },
                }
            },
        )

    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Provisioning orchestrator API",
            "version": __version__,
            "description": 'Errors are JSON: {"error": {"code", "message", "details"}}.',
        },
        "servers": [{"url": "/"}],
        "paths": {
            "/health": {
                "get": op(
                    "health",
                    "Whether the gateway reaches NATS and JetStream",
                    {
                        200: _json("Healthy", "Health"),
                        503: _json("NATS or JetStream unreachable", "Health"),
                    },
                    public=True,
                    bus=False,
                )
            },
            "/openapi.json": {
                "get": op(
                    "getOpenapi",
                    "This document",
                    {
                        200: {
                            "description": "This document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                    bus=False,
                )
            },
            "/workflows": {
                "post": op(
                    "submitWorkflow",
                    "Submit a workflow definition (JSON, YAML, TOML or Nickel source)",
                    {202: accepted},
                    errors={
                        **submit_errors,
                        415: "Unsupported Content-Type (application/x-www-form-urlencoded, "
                        "curl's default, is taken as JSON when the body parses as JSON)",
                    },
                    parameters=[
                        _PLAN,
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "description": "The same key returns the same workflow_id and "
                            "runs the work once: 1 to 200 printable characters, not counting "
                            "the blanks around it (they are not part of a header value)",
                            "schema": {"type": "string", "pattern": _IDEMPOTENCY_KEY},
                        },
                    ],
                    body_description="The definition as JSON, YAML or TOML, or a Nickel "
                    "program that evaluates to it",
                    body={
                        "application/json": {
                            "schema": definition,
                            "example": {
                                "name": "example",
                                "tasks": [{"id": "hello", "action": "builtin.noop"}],
                            },
                        },
                        "application/yaml": {"schema": definition},
                        "application/toml": {"schema": definition},
                        "application/x-nickel": {"schema": definition},
                    },
                ),
                "get": op(
                    "listWorkflows",
                    "Workflows, newest first",
                    {
                        200: _json(
                            "A page of workflows",
                            "WorkflowList",
                            links=_links(
                                "getWorkflow",
                                **{"path.id": "$response.body#/workflows/0/workflow_id"},
                            ),
                        )
                    },
                    errors={400: "Bad query parameter"},
                    parameters=[
                        _query(
                            "status",
                            {"type": "array", "items": {"enum": list(get_args(WorkflowStatus))}},
                            "Only workflows in these statuses (comma-separated)",
                            style="form",
                            explode=False,
                        ),
                        _query("name", {"type": "string"}, "Only names containing this"),
                        _query(
                            "limit",
                            {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 50},
                            "Page size",
                        ),
                        _query(
                            "offset",
                            {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0},
                            "Workflows to skip",
                        ),
                    ],
                ),
            },
            "/workflows/servers/create": {
                "post": shortcut(
                    "servers", "createServers", "Create an infra's servers, in parallel"
                )
            },
            "/workflows/taskserv/create": {
                "post": shortcut("taskserv", "createTaskservs", "Install an infra's task services")
            },
            "/workflows/cluster/create": {
                "post": shortcut(
                    "cluster", "createCluster", "Servers, task services, cluster and apps"
                )
            },
            "/workflows/{id}": {
                "get": op(
                    "getWorkflow",
                    "A workflow and its tasks",
                    {
                        200: _json(
                            "The workflow",
                            "WorkflowView",
                            links={
                                **_links(
                                    "cancelWorkflow",
                                    "retryWorkflow",
                                    "approveWorkflow",
                                    "rejectWorkflow",
                                    **{"path.id": "$response.body#/workflow_id"},
                                ),
                                **_TASK_LINKS,
                            },
                        )
                    },
                    errors={400: "Bad query parameter", 404: "No such workflow"},
                    parameters=[
                        _WORKFLOW_ID,
                        _query(
                            "tasks",
                            {"type": "boolean", "default": True},
                            f"false leaves the task list out; {_BOOLEAN_SPELLINGS}",
                        ),
                    ],
                )
            },
            "/workflows/{id}/events": {
                "get": op(
                    "getWorkflowEvents",
                    "The workflow's events from the start, then live, until it ends",
                    {200: _sse("Server-Sent Events", "WorkflowStreamEvent")},
                    errors={404: "No such workflow"},
                    timeout=False,
                    parameters=[
                        _WORKFLOW_ID,
                        {
                            "name": "Last-Event-ID",
                            "in": "header",
                            "description": "Continue after this event id; anything but "
                            "digits replays from the start",
                            "schema": {"type": "string"},
                        },
                    ],
                )
            },
            "/workflows/{id}/cancel": {
                "post": op(
                    "cancelWorkflow",
                    "Cancel a workflow",
                    {
                        202: _json(
                            "Cancelling",
                            "Cancelling",
                            links=_links(
                                "getWorkflow",
                                "retryWorkflow",
                                **{"path.id": "$response.body#/workflow_id"},
                            ),
                        )
                    },
                    errors={
                        404: "No such workflow",
                        409: "The workflow has finished (and no retry of it waits)",
                    },
                    parameters=[_WORKFLOW_ID],
                )
            },
            "/workflows/{id}/retry": {
                "post": op(
                    "retryWorkflow",
                    "Re-run a failed or cancelled workflow's unfinished tasks",
                    {
                        202: _json(
                            "Retrying",
                            "RetryAccepted",
                            links=_links(
                                "getWorkflow",
                                "cancelWorkflow",
                                **{"path.id": "$response.body#/workflow_id"},
                            ),
                        )
                    },
                    errors={
                        404: "No such workflow",
                        409: "The workflow is not failed or cancelled (a submission the "
                        "scheduler has not taken yet is queued)",
                    },
                    parameters=[_WORKFLOW_ID],
                )
            },
            "/tasks/{id}": {
                "get": op(
                    "getTask",
                    "A task",
                    {
                        200: _json(
                            "The task",
                            "TaskView",
                            links=_links(
                                "getTaskLogs",
                                **{"path.id": "$response.body#/task_id", "query.follow": "false"},
                            ),
                        )
                    },
                    errors={404: "No such task"},
                    parameters=[_TASK_ID],
                )
            },
            "/tasks/{id}/logs": {
                "get": op(
                    "getTaskLogs",
                    "A task's output, page by page",
                    {
                        200: {
                            "description": "A page of the stored lines; with follow=true, "
                            "Server-Sent Events (event: log) until the task ends",
                            "content": {
                                "application/json": {"schema": _ref("TaskLogs")},
                                "text/event-stream": {"schema": _ref("LogStreamEvent")},
                            },
                        }
                    },
                    errors={400: "Bad query parameter", 404: "No such task"},
                    parameters=[
                        _TASK_ID,
                        _query(
                            "follow",
                            {"type": "boolean", "default": False},
                            f"Stream the lines as they come; {_BOOLEAN_SPELLINGS}",
                        ),
                        _query(
                            "attempt",
                            {"type": "integer", "minimum": 1, "maximum": MAX_ATTEMPT},
                            "Only this attempt's lines (all attempts, in order, without it)",
                        ),
                        _query(
                            "cursor",
                            {"type": "string", "pattern": LOG_CURSOR_PATTERN},
                            "Continue after the last page: its next_cursor",
                        ),
                        _query(
                            "limit",
                            {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": LOG_PAGE_MAX,
                                "default": LOG_PAGE_DEFAULT,
                            },
                            "Lines per page",
                        ),
                    ],
                )
            },
            "/tasks/{id}/progress": {
                "post": op(
                    "postTaskProgress",
                    "A running task reports its progress",
                    {202: _json("Recorded", "ProgressAccepted")},
                    errors={
                        400: "Malformed JSON",
                        404: "No such task",
                        409: "The task has finished",
                        413: _ERRORS[413],
                        422: "Invalid progress or message, or an unknown key",
                    },
                    parameters=[_TASK_ID],
                    body={
                        "application/json": {
                            "schema": _ref("ProgressBody"),
                            "example": {"progress": 50, "message": "halfway"},
                        }
                    },
                )
            },
            "/executors": {
                "get": op(
                    "listExecutors",
                    "Executors that sent a heartbeat recently, and their load",
                    {200: _json("The executors", "Executors")},
                )
            },
            "/concurrency": {
                "get": op(
                    "getConcurrency",
                    "Concurrency keys in use: limits, holders, waiters in order, rates",
                    {200: _json("The keys", "Concurrency")},
                )
            },
            "/workflows/{id}/approve": {
                "post": op(
                    "approveWorkflow",
                    "Approve the gates that wait: the workflow's own, or its tasks' (or one "
                    "task's)",
                    {
                        202: _json(
                            "Sent to the scheduler",
                            "Approving",
                            links=_links(
                                "getWorkflow", **{"path.id": "$response.body#/workflow_id"}
                            ),
                        )
                    },
                    errors={**decision_errors, 422: "Invalid body, or an unknown key"},
                    parameters=[_WORKFLOW_ID],
                    body=decision_body("ApproveBody", {"comment": "looks right"}),
                    body_required=False,
                )
            },
            "/workflows/{id}/reject": {
                "post": op(
                    "rejectWorkflow",
                    "Reject the gates that wait (or one task's): the run is cancelled",
                    {
                        202: _json(
                            "Sent to the scheduler",
                            "Rejecting",
                            links=_links(
                                "getWorkflow",
                                "retryWorkflow",
                                **{"path.id": "$response.body#/workflow_id"},
                            ),
                        )
                    },
                    errors={
                        **decision_errors,
                        422: "Invalid body (a reason is required), or an unknown key",
                    },
                    parameters=[_WORKFLOW_ID],
                    body=decision_body("RejectBody", {"reason": "not this week"}),
                )
            },
            "/plans/{id}": {
                "get": op(
                    "getPlan",
                    "A plan: what each task would change",
                    {
                        200: _json(
                            "The plan",
                            "PlanView",
                            links=_links("applyPlan", **{"path.id": "$response.body#/plan_id"}),
                        )
                    },
                    errors={404: "No such plan"},
                    parameters=[_PLAN_ID],
                )
            },
            "/plans/{id}/apply": {
                "post": op(
                    "applyPlan",
                    "Run exactly what a ready plan planned, once",
                    {202: accepted},
                    errors={
                        404: "No such plan",
                        409: "The plan is not ready, was applied already, expired "
                        "(plan_expired), or what it planned changed (plan_changed: its "
                        "definition, infra files or targets; details say what)",
                        413: _ERRORS[413],
                        422: "The plan's definition no longer passes validation (e.g. an "
                        "action since removed from the registry, a provider disabled)",
                    },
                    parameters=[_PLAN_ID],
                )
            },
        },
        "components": {"schemas": _components(gateway, actions)},
    }
    if auth:
        document["components"]["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "[gateway] auth_token; a task's PROVISIONING_TASK_TOKEN is "
                "accepted by POST /tasks/{id}/progress of that task only",
            }
        }
        document["security"] = [{"bearer": []}]
    return document
