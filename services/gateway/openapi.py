"""The OpenAPI 3.1 document of the v1 API, with schemas generated from the message Structs."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from shared import __version__
from shared.messages import WorkflowDefinition

__all__ = ["openapi_document"]

_ERROR = {
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
}


def _err(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


_ID = {
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
                    "params": {"type": "object"},
                },
            }
        }
    },
}
_ACCEPTED = {
    "type": "object",
    "required": ["workflow_id", "status"],
    "properties": {"workflow_id": {"type": "string"}, "status": {"const": "queued"}},
}


def _submit_responses() -> dict[str, Any]:
    return {
        "202": _ok("Accepted: durable in JetStream", _ACCEPTED),
        "400": _err("Malformed body"),
        "401": _err("Missing or bad token"),
        "413": _err("Body too large"),
        "415": _err("Unsupported content type"),
        "422": _err("Invalid definition"),
        "503": _err("NATS unavailable"),
    }


@functools.cache
def openapi_document() -> dict[str, Any]:
    (definition,), components = msgspec.json.schema_components(
        [WorkflowDefinition], ref_template="#/components/schemas/{name}"
    )
    components["Error"] = _ERROR
    shortcut = {"requestBody": _SHORTCUT_BODY, "responses": _submit_responses()}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Provisioning orchestrator API", "version": __version__},
        "servers": [{"url": "http://localhost:9090"}],
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/health": {
                "get": {
                    "security": [],
                    "responses": {"200": _ok("Healthy"), "503": _ok("Unhealthy")},
                }
            },
            "/openapi.json": {"get": {"responses": {"200": _ok("This document")}}},
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
                            "schema": {"type": "string", "maxLength": 200},
                        }
                    ],
                    "responses": _submit_responses(),
                },
                "get": {
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string"}},
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
                    "responses": {"200": _ok("Workflows, newest first"), "400": _err("Bad query")},
                },
            },
            "/workflows/servers/create": {"post": shortcut},
            "/workflows/taskserv/create": {"post": shortcut},
            "/workflows/cluster/create": {"post": shortcut},
            "/workflows/{id}": {
                "get": {
                    "parameters": [_ID],
                    "responses": {
                        "200": _ok("The workflow and its tasks"),
                        "404": _err("Unknown id"),
                    },
                }
            },
            "/workflows/{id}/events": {
                "get": {
                    "parameters": [_ID],
                    "responses": {
                        "200": {
                            "description": "Server-Sent Events",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        "404": _err("Unknown id"),
                    },
                }
            },
            "/workflows/{id}/cancel": {
                "post": {
                    "parameters": [_ID],
                    "responses": {
                        "202": _ok("Cancelling"),
                        "404": _err("Unknown id"),
                        "409": _err("Already finished"),
                    },
                }
            },
            "/workflows/{id}/retry": {
                "post": {
                    "parameters": [_ID],
                    "responses": {
                        "202": _ok("Retrying"),
                        "404": _err("Unknown id"),
                        "409": _err("Not failed or cancelled"),
                    },
                }
            },
            "/tasks/{id}": {
                "get": {
                    "parameters": [_TASK_ID],
                    "responses": {"200": _ok("The task"), "404": _err("Unknown id")},
                }
            },
            "/tasks/{id}/logs": {
                "get": {
                    "parameters": [
                        _TASK_ID,
                        {"name": "follow", "in": "query", "schema": {"type": "boolean"}},
                    ],
                    "responses": {"200": _ok("Log lines"), "404": _err("Unknown id")},
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
                                        "message": {"type": "string"},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "202": _ok("Recorded"),
                        "400": _err("Malformed"),
                        "404": _err("Unknown id"),
                        "409": _err("Task finished"),
                        "422": _err("Invalid"),
                    },
                }
            },
            "/executors": {"get": {"responses": {"200": _ok("Live executors and their load")}}},
        },
    }
