"""The OpenAPI 3.1 document of the v1 API, with schemas generated from the message Structs.

The response schemas describe what the handlers and ``views.py`` return; the fuzzing test
(``tests/test_hostile_fuzz.py``) checks every answer against them.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from shared import __version__
from shared.messages import WorkflowDefinition

__all__ = ["openapi_document"]

_WORKFLOW_STATUS = ["queued", "running", "completed", "failed", "cancelled"]
_TASK_STATUS = [
    "pending",
    "waiting",
    "queued",
    "running",
    "cancelling",
    "retrying",
    "completed",
    "failed",
    "cancelled",
    "skipped",
]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str) -> dict[str, Any]:
    return {"type": [kind, "null"]}


_TIME = {"type": ["string", "null"], "format": "date-time"}
_SCHEMAS: dict[str, Any] = {
    "Concurrency": {
        "type": "object",
        "required": ["keys"],
        "properties": {
            "keys": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["key", "limit", "holders", "waiters", "rate"],
                    "properties": {
                        "key": {"type": "string"},
                        "limit": _nullable("integer"),
                        "holders": {"type": "array", "items": {"type": "string"}},
                        "waiters": {"type": "array", "items": {"type": "string"}},
                        "rate": {"type": ["object", "null"]},
                    },
                },
            }
        },
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "details": {"type": "object"},
                },
            }
        },
    },
    "Accepted": {
        "type": "object",
        "required": ["workflow_id", "status"],
        "properties": {
            "workflow_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "status": {"enum": _WORKFLOW_STATUS},
            "name": {"type": "string"},
            "tasks": {"type": "integer", "minimum": 1},
            "trace_id": _nullable("string"),
            "idempotent_replay": {"type": "boolean"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "version", "api_version", "nats"],
        "properties": {
            "status": {"enum": ["healthy", "unhealthy"]},
            "version": {"type": "string"},
            "api_version": {"type": "string"},
            "nats": {
                "type": "object",
                "required": ["connected", "jetstream"],
                "properties": {
                    "connected": {"type": "boolean"},
                    "jetstream": {"type": "boolean"},
                    "detail": {"type": "string"},
                },
            },
            "scheduler": {
                "type": "object",
                "description": "The active scheduler (the holder of the lease), if any.",
                "required": ["active"],
                "properties": {
                    "active": {"type": "boolean"},
                    "holder": {"type": "string"},
                    "since": {"type": "string", "format": "date-time"},
                    "renewed_seconds_ago": {"type": "number"},
                    "detail": {"type": "string"},
                },
            },
            "tracing": {
                "type": "object",
                "description": "Present when `[tracing] ui_url` is set: where trace ids open.",
                "properties": {"ui_url": {"type": "string"}},
            },
        },
    },
    "WorkflowSummary": {
        "type": "object",
        "required": ["workflow_id", "name", "status", "tasks_total", "created_at"],
        "properties": {
            "workflow_id": {"type": "string"},
            "name": {"type": "string"},
            "status": {"enum": _WORKFLOW_STATUS},
            "tasks_total": {"type": "integer"},
            "created_at": _TIME,
            "started_at": _TIME,
            "finished_at": _TIME,
            "duration_seconds": _nullable("number"),
            "source": {"type": "string"},
            "runs": {"type": "integer"},
            "trace_id": _nullable("string"),
            "error": _nullable("string"),
            "counts": {
                "type": "object",
                "description": "Tasks per status (once the scheduler has taken the workflow)",
                "propertyNames": {"enum": _TASK_STATUS},
                "additionalProperties": {"type": "integer"},
            },
            "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        },
    },
    "WorkflowPage": {
        "type": "object",
        "required": ["workflows", "limit", "offset", "next_offset"],
        "properties": {
            "workflows": {"type": "array", "items": _ref("WorkflowSummary")},
            "limit": {"type": "integer", "minimum": 1, "maximum": 500},
            "offset": {"type": "integer", "minimum": 0},
            "next_offset": _nullable("integer"),
        },
    },
    "Task": {
        "type": "object",
        "required": ["id", "task_id", "action", "status", "attempt", "progress", "depends_on"],
        "properties": {
            "id": {"type": "string"},
            "task_id": {"type": "string"},
            "workflow_id": {"type": "string"},
            "action": {"type": "string"},
            "status": {"enum": _TASK_STATUS},
            "attempt": {"type": "integer", "minimum": 0},
            "max_attempts": {"type": "integer", "minimum": 1},
            "progress": {"type": "integer", "minimum": 0, "maximum": 100},
            "progress_message": {"type": "string"},
            "executor_id": _nullable("string"),
            "exit_code": _nullable("integer"),
            "reason": _nullable("string"),
            "error": _nullable("string"),
            "args": {"description": "The task's arguments, as submitted"},
            "output": {},
            "depends_on": {"type": "array", "items": {"type": "string"}},
            "priority": _nullable("integer"),
            "pool": {"type": "string"},
            "queued_at": _TIME,
            "started_at": _TIME,
            "finished_at": _TIME,
            "next_attempt_at": _TIME,
            "duration_seconds": _nullable("number"),
            "attempts": {"type": "array", "items": {"type": "object"}},
            "handbacks": {"type": "integer", "minimum": 0},
            "note": _nullable("string"),
            "keys": {"type": "array", "items": {"type": "string"}},
            "waiting_for": _nullable("string"),
            "waiting_since": _TIME,
        },
    },
    "Workflow": {
        "allOf": [
            _ref("WorkflowSummary"),
            {
                "type": "object",
                "required": ["counts", "progress"],
                "properties": {
                    "tasks": {"type": "array", "items": _ref("Task")},
                    "priority": {"type": "integer"},
                    "on_failure": {"enum": ["stop", "continue"]},
                    "description": {"type": "string"},
                    "cancel_requested": {"type": "boolean"},
                },
            },
        ]
    },
    "ControlAccepted": {
        "type": "object",
        "required": ["workflow_id", "status"],
        "properties": {
            "workflow_id": {"type": "string"},
            "status": {"enum": ["cancelling", "queued"]},
            "run": {"type": "integer", "minimum": 1},
        },
    },
    "Logs": {
        "type": "object",
        "required": ["task_id", "lines"],
        "properties": {
            "task_id": {"type": "string"},
            "lines": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["attempt", "stream", "line", "at"],
                    "properties": {
                        "attempt": {"type": "integer"},
                        "stream": {"enum": ["stdout", "stderr", "system"]},
                        "line": {"type": "string"},
                        "at": {"type": "string", "format": "date-time"},
                    },
                },
            },
        },
    },
    "Event": {
        "description": "One Server-Sent Event; data is the event (or log chunk) as JSON",
        "type": "object",
        "required": ["data"],
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9]+$"},
            "event": {"enum": ["workflow", "task", "progress", "log"]},
            "data": {"type": "string", "contentMediaType": "application/json"},
        },
    },
    "ProgressAccepted": {
        "type": "object",
        "required": ["task_id", "progress"],
        "properties": {
            "task_id": {"type": "string"},
            "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        },
    },
    "Executors": {
        "type": "object",
        "required": ["executors"],
        "properties": {
            "executors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "pool", "slots", "running", "alive", "last_beat"],
                    "properties": {
                        "id": {"type": "string"},
                        "pool": {"type": "string"},
                        "hostname": {"type": "string"},
                        "pid": {"type": "integer"},
                        "slots": {"type": "integer"},
                        "running": {"type": "integer"},
                        "running_tasks": {"type": "array", "items": {"type": "string"}},
                        "draining": {"type": "boolean"},
                        "alive": {"type": "boolean"},
                        "last_beat": {"type": "string", "format": "date-time"},
                        "last_beat_age_seconds": {"type": "number"},
                        "started_at": {"type": "string", "format": "date-time"},
                        "version": {"type": "string"},
                    },
                },
            }
        },
    },
}


def _err(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _responses(**codes: dict[str, Any]) -> dict[str, Any]:
    """``codes`` keyed ``r200``, ``r404``...; every route may also answer 401 (auth on) and
    503 (NATS unreachable)."""
    answers = {name[1:]: value for name, value in codes.items()}
    answers.setdefault("401", _err("Authentication is on and the bearer token is missing or wrong"))
    answers.setdefault("503", _err("NATS or JetStream unreachable, or a queue is full"))
    return answers


_WORKFLOW_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
}
_TASK_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": r"^[0-9a-f]{32}\.[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"},
    "description": "<workflow_id>.<task id>",
}
_SHORTCUT_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["infra"],
                "additionalProperties": False,
                "properties": {
                    "infra": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"},
                    "params": {
                        "type": "object",
                        "properties": {
                            "servers": {"type": "array", "items": {"type": "string"}},
                            "taskserv": {"type": "string"},
                            "apps": {"type": "array", "items": {"type": "string"}},
                            "retries": {"type": "integer", "minimum": 0, "maximum": 100},
                            "delay_seconds": {"type": "number", "minimum": 0},
                            "fail": {},
                            "fail_at": {},
                        },
                    },
                },
            }
        }
    },
}


def _submit_responses() -> dict[str, Any]:
    return _responses(
        r202={
            **_ok("Accepted: durable in JetStream", "Accepted"),
            "headers": {"Location": {"schema": {"type": "string"}}},
        },
        r400=_err("Malformed body or Idempotency-Key"),
        r413=_err("Body too large"),
        r415=_err("Unsupported content type"),
        r422=_err("Invalid definition: details.task and details.reason say where and why"),
    )


@functools.cache
def openapi_document() -> dict[str, Any]:
    (definition,), components = msgspec.json.schema_components(
        [WorkflowDefinition], ref_template="#/components/schemas/{name}"
    )
    components.update(_SCHEMAS)
    shortcut = {"requestBody": _SHORTCUT_BODY, "responses": _submit_responses()}
    sse = {"text/event-stream": {"schema": _ref("Event")}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Provisioning orchestrator API", "version": __version__},
        "servers": [{"url": "/"}],
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "[gateway] auth_token; a task's PROVISIONING_TASK_TOKEN is "
                    "accepted by POST /tasks/{id}/progress of that task only",
                }
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/health": {
                "get": {
                    "security": [],
                    "responses": {
                        "200": _ok("Healthy", "Health"),
                        "503": _ok("NATS or JetStream unreachable", "Health"),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "responses": _responses(
                        r200={
                            "description": "This document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    )
                }
            },
            "/workflows": {
                "post": {
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": definition},
                            "application/toml": {"schema": {"type": "string"}},
                            "application/yaml": {"schema": {"type": "string"}},
                            "application/x-nickel": {"schema": {"type": "string"}},
                        },
                    },
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                        }
                    ],
                    "responses": _submit_responses(),
                },
                "get": {
                    "parameters": [
                        {
                            "name": "status",
                            "in": "query",
                            "description": "comma-separated workflow statuses",
                            "schema": {"type": "string"},
                        },
                        {"name": "name", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                        },
                        {
                            "name": "offset",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 0},
                        },
                    ],
                    "responses": _responses(
                        r200=_ok("Workflows, newest first", "WorkflowPage"),
                        r400=_err("Bad query parameter"),
                    ),
                },
            },
            "/workflows/servers/create": {"post": shortcut},
            "/workflows/taskserv/create": {"post": shortcut},
            "/workflows/cluster/create": {"post": shortcut},
            "/workflows/{id}": {
                "get": {
                    "parameters": [
                        _WORKFLOW_ID,
                        {"name": "tasks", "in": "query", "schema": {"type": "boolean"}},
                    ],
                    "responses": _responses(
                        r200=_ok("The workflow and its tasks", "Workflow"),
                        r404=_err("Unknown id"),
                    ),
                }
            },
            "/workflows/{id}/events": {
                "get": {
                    "parameters": [
                        _WORKFLOW_ID,
                        {
                            "name": "Last-Event-ID",
                            "in": "header",
                            "description": "continue after this event id (the stream sequence)",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": _responses(
                        r200={"description": "Server-Sent Events", "content": sse},
                        r404=_err("Unknown id"),
                    ),
                }
            },
            "/workflows/{id}/cancel": {
                "post": {
                    "parameters": [_WORKFLOW_ID],
                    "responses": _responses(
                        r202=_ok("Cancelling", "ControlAccepted"),
                        r404=_err("Unknown id"),
                        r409=_err("Already finished"),
                    ),
                }
            },
            "/workflows/{id}/retry": {
                "post": {
                    "parameters": [_WORKFLOW_ID],
                    "responses": _responses(
                        r202=_ok("Retrying", "ControlAccepted"),
                        r404=_err("Unknown id"),
                        r409=_err("Not failed or cancelled"),
                    ),
                }
            },
            "/tasks/{id}": {
                "get": {
                    "parameters": [_TASK_ID],
                    "responses": _responses(r200=_ok("The task", "Task"), r404=_err("Unknown id")),
                }
            },
            "/tasks/{id}/logs": {
                "get": {
                    "parameters": [
                        _TASK_ID,
                        {"name": "follow", "in": "query", "schema": {"type": "boolean"}},
                    ],
                    "responses": _responses(
                        r200={
                            "description": "Log lines (JSON), or with follow=true a stream",
                            "content": {
                                "application/json": {"schema": _ref("Logs")},
                                **sse,
                            },
                        },
                        r404=_err("Unknown id"),
                    ),
                }
            },
            "/tasks/{id}/progress": {
                "post": {
                    "parameters": [_TASK_ID],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["progress"],
                                    "properties": {
                                        "progress": {
                                            "type": "integer",
                                            "minimum": 0,
                                            "maximum": 100,
                                        },
                                        "message": {
                                            "type": "string",
                                            "description": "kept to 500 characters",
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": _responses(
                        r202=_ok("Recorded", "ProgressAccepted"),
                        r400=_err("Malformed JSON"),
                        r404=_err("Unknown id"),
                        r409=_err("Task finished"),
                        r413=_err("Body too large"),
                        r422=_err("Invalid progress or message"),
                    ),
                }
            },
            "/executors": {
                "get": {
                    "responses": _responses(r200=_ok("Live executors and their load", "Executors"))
                }
            },
            "/concurrency": {
                "get": {
                    "responses": _responses(
                        r200=_ok("Concurrency keys in use: holders, waiters, rates", "Concurrency")
                    )
                }
            },
        },
    }
