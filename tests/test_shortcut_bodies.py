"""The seed's request bodies on the shortcut endpoints (issue 18), against a real stack: its
``{type, infra, params}`` and ``infra_name``, a ``type`` of another endpoint refused, unknown
keys anywhere refused by name (never dropped), named priorities (the seed's Low, Normal, High,
Critical) in shortcut bodies, in ``params`` as the CLI sends them, and in workflow definitions,
and ``POST /workflows`` with curl's default Content-Type."""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest

from .support import Stack, task_of, wait_until

pytestmark = pytest.mark.e2e

SERVERS = "/workflows/servers/create"
FAST = {"delay_seconds": 0}


def refused(stack: Stack, path: str, body: Any) -> dict[str, Any]:
    status, answer = stack.http.post(path, body)
    assert status == 422, (body, status, answer)
    error: dict[str, Any] = answer["error"]
    assert error["code"] == "invalid_definition", error
    return error


def priority_of(stack: Stack, path: str, body: Any) -> int:
    status, accepted = stack.http.post(path, body)
    assert status == 202, (body, accepted)
    view = stack.http.wait_workflow(accepted["workflow_id"])
    assert view["status"] == "completed", view
    return int(view["priority"])


def test_the_seeds_body_infra_name_and_a_type_of_another_endpoint(stack: Stack) -> None:
    # the seed's Pattern 1, as its Nushell CLI sends it
    seed = {"type": "server_create", "infra": "wuji", "params": FAST}
    status, accepted = stack.http.post(SERVERS, seed)
    assert status == 202, accepted
    view = stack.http.wait_workflow(accepted["workflow_id"])
    assert view["status"] == "completed" and view["name"] == "wuji: create servers", view
    assert view["tasks"] and all(t["action"] == "server.create" for t in view["tasks"])
    # the seed's Rust side names the field infra_name
    for body in (
        {"type": "server_create", "infra_name": "wuji", "params": FAST},
        {"infra": "wuji", "infra_name": "wuji", "params": FAST},
    ):
        status, accepted = stack.http.post(SERVERS, body)
        assert status == 202, (body, accepted)
    status, accepted = stack.http.post(
        "/workflows/taskserv/create", {"type": "taskserv_create", "infra_name": "wuji"}
    )
    assert status == 202, accepted
    # a type that is not this endpoint's, two different infras, none at all
    error = refused(stack, SERVERS, {"type": "taskserv_create", "infra": "wuji"})
    assert error["details"]["field"] == "type", error
    assert "'taskserv_create'" in error["message"] and "'server_create'" in error["message"]
    error = refused(stack, "/workflows/cluster/create", {"type": "server", "infra": "wuji"})
    assert "type" in error["message"], error
    error = refused(stack, SERVERS, {"infra": "wuji", "infra_name": "other"})
    assert "infra_name" in error["message"], error
    error = refused(stack, SERVERS, {"type": "server_create", "params": FAST})
    assert "infra_name" in error["message"], error


def test_unknown_keys_anywhere_are_refused_by_name(stack: Stack) -> None:
    # the case: -p plan=large -p bogus=1 was accepted and the server stayed small
    error = refused(
        stack, SERVERS, {"infra": "wuji", "params": {"plan": "large", "bogus": 1, **FAST}}
    )
    assert error["details"]["reason"] == "unknown_field", error
    assert error["details"]["fields"] == ["params.plan", "params.bogus"], error
    assert "'params.plan'" in error["message"] and "'params.bogus'" in error["message"]
    error = refused(stack, SERVERS, {"infra": "wuji", "zone": "de-fra1", "params": {"x": 1}})
    assert error["details"]["fields"] == ["zone", "params.x"], error
    error = refused(stack, "/workflows/cluster/create", {"infra": "wuji", "params": {"app": []}})
    assert error["details"]["fields"] == ["params.app"], error
    # every key the builders read is still taken
    status, accepted = stack.http.post(
        "/workflows/cluster/create",
        {
            "infra": "wuji",
            "params": {
                "servers": ["wuji-cp-1"],
                "taskserv": "containerd",
                "apps": ["web"],
                "retries": 0,
                "priority": 1,
                "delay_seconds": 0,
                "fail": False,
                "fail_at": None,
            },
        },
    )
    assert status == 202, accepted
    # the other bodies likewise
    hold = {
        "name": "hold",
        "tasks": [{"id": "t", "action": "builtin.sleep", "args": {"seconds": 60}}],
    }
    status, accepted = stack.http.post("/workflows", hold)
    assert status == 202, accepted
    wf_id = accepted["workflow_id"]
    wait_until(lambda: task_of(stack.http, wf_id, "t")["status"] == "running")
    error = refused(stack, f"/tasks/{wf_id}.t/progress", {"progress": 5, "percent": 5})
    assert error["details"]["fields"] == ["percent"], error
    status, _ = stack.http.post(f"/tasks/{wf_id}.t/progress", {"progress": 5, "status": "ok"})
    assert status == 202  # the seed's scripts send status: a known key, ignored
    error = refused(stack, f"/workflows/{wf_id}/approve", {"comment": "ok", "by": "me"})
    assert error["details"]["fields"] == ["by"], error
    error = refused(stack, f"/workflows/{wf_id}/reject", {"reason": "no", "force": True})
    assert error["details"]["fields"] == ["force"], error
    stack.http.post(f"/workflows/{wf_id}/cancel")


def test_named_priorities_on_the_shortcuts_and_in_definitions(stack: Stack) -> None:
    assert priority_of(stack, SERVERS, {"infra": "wuji", "params": FAST}) == 0
    assert priority_of(stack, SERVERS, {"infra": "wuji", "priority": "High", "params": FAST}) == 10
    body = {"type": "server_create", "infra": "wuji", "params": {"priority": "critical", **FAST}}
    assert priority_of(stack, SERVERS, body) == 100
    body = {"infra": "wuji", "priority": "LOW", "params": {"priority": -10, **FAST}}
    assert priority_of(stack, SERVERS, body) == -10  # both given, and the same
    assert priority_of(stack, SERVERS, {"infra": "wuji", "priority": 500, "params": FAST}) == 500
    assert priority_of(stack, SERVERS, {"infra": "wuji", "priority": "Normal", "params": FAST}) == 0
    for bad in ("urgent", "", 1001, 1.5, True, None, ["High"]):
        refused(stack, SERVERS, {"infra": "wuji", "priority": bad})
    refused(stack, SERVERS, {"infra": "wuji", "params": {"priority": "highest"}})
    error = refused(
        stack, SERVERS, {"infra": "wuji", "priority": "High", "params": {"priority": 1}}
    )
    assert "differ" in error["message"], error
    # the same names in a workflow definition, of the workflow and of a task
    status, accepted = stack.http.post(
        "/workflows",
        {
            "name": "named",
            "priority": "High",
            "tasks": [{"id": "a", "action": "builtin.noop", "priority": "Critical"}],
        },
    )
    assert status == 202, accepted
    view = stack.http.wait_workflow(accepted["workflow_id"])
    assert view["priority"] == 10 and view["tasks"][0]["priority"] == 100, view
    toml = 'name = "named-toml"\npriority = "low"\n[[tasks]]\nid = "a"\naction = "builtin.noop"\n'
    status, accepted = stack.http.post(
        "/workflows", raw=toml.encode(), headers={"Content-Type": "application/toml"}
    )
    assert status == 202, accepted
    assert stack.http.wait_workflow(accepted["workflow_id"])["priority"] == -10
    error = refused(
        stack,
        "/workflows",
        {"name": "n", "tasks": [{"id": "a", "action": "builtin.noop", "priority": "top"}]},
    )
    assert error["details"]["task"] == "a" and "Critical" in error["message"], error


def post_raw(stack: Stack, body: bytes, content_type: str | None) -> tuple[int, Any]:
    """``POST /workflows`` as curl sends it: ``-d`` makes it a form unless told otherwise."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    try:
        headers = {"Content-Length": str(len(body))}
        if content_type is not None:
            headers["Content-Type"] = content_type
        conn.request("POST", "/workflows", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_curls_default_content_type_is_taken_as_json(stack: Stack) -> None:
    definition = json.dumps({"name": "curl", "tasks": [{"id": "a", "action": "builtin.noop"}]})
    form = "application/x-www-form-urlencoded"
    for content_type in (form, f"{form}; charset=utf-8", None, ""):
        status, accepted = post_raw(stack, definition.encode(), content_type)
        assert status == 202, (content_type, accepted)
        assert stack.http.wait_workflow(accepted["workflow_id"])["status"] == "completed"
    # a form that is not JSON is what its type says: not a definition
    status, answer = post_raw(stack, b"name=curl&tasks=a", form)
    assert status == 415 and answer["error"]["code"] == "unsupported_media_type", answer
    # JSON that is not a valid definition is refused as such, not as a form
    status, answer = post_raw(stack, b'{"name": "x", "tasks": []}', form)
    assert status == 422, answer
    status, answer = post_raw(stack, b"name: x\n", "text/plain")
    assert status == 415, answer
