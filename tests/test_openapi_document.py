"""The OpenAPI document generated from the Structs, without NATS: valid OpenAPI 3.1, every
status of the Literals in it, security declared only with auth on, the running gateway's limits,
and the views' answers valid against it (the document cannot drift from what the API answers).
The end-to-end run of schemathesis against it is ``test_api_contract.py``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import jsonschema
import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from schemathesis.specs.openapi.definitions import OPENAPI_31

from core.registry import load_registry
from services.gateway import plans, views
from services.gateway.app import create_app
from services.gateway.bodies import ProgressBody, ShortcutBody
from services.gateway.openapi import EVENT_KINDS, openapi_document
from services.gateway.responses import RESPONSES, json_response
from shared.config import GatewayConfig, load_config
from shared.ids import NAME_RE
from shared.messages import (
    Approval,
    AttemptRecord,
    Decision,
    ExecutorBeat,
    Progress,
    TaskRecord,
    TaskSpec,
    TaskStatus,
    WorkflowDefinition,
    WorkflowRecord,
    WorkflowStatus,
    from_builtins,
)
from shared.workflow import definition_from_data

ACTIONS = load_registry().names()
NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
WF = "01a2" + "0" * 28


def gateway(auth_token: str = "") -> GatewayConfig:
    return msgspec.structs.replace(
        load_config(environ={}).gateway,
        host="127.0.0.1",
        port=9090,
        auth_token=auth_token,
        max_body_bytes=1 << 22,
        max_tasks_per_workflow=123,
        request_timeout_seconds=10,
    )


@pytest.fixture(scope="module", params=["auth off", "auth on"])
def document(request: pytest.FixtureRequest) -> dict[str, Any]:
    return openapi_document(gateway("s3cret" if request.param == "auth on" else ""), ACTIONS)


def validator(document: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    """A validator of one component, its references resolved within the document."""
    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema.Draft202012Validator(root, format_checker=jsonschema.FormatChecker())


def answer(body: msgspec.Struct) -> Any:
    """What the API sends for ``body``, decoded as a client would."""
    response = json_response(body)
    assert response.content_type == "application/json"
    assert isinstance(response.body, bytes)
    return json.loads(response.body)


def refs(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref":
                yield item
            else:
                yield from refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from refs(item)


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(OPENAPI_31).validate(document)
    schemas = document["components"]["schemas"]
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    for ref in refs(document):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    ids = [op["operationId"] for path in document["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)) == 20  # every route of the gateway, each named once
    json.dumps(document)  # plain JSON data


def test_every_response_and_request_struct_is_a_component(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for struct in (*RESPONSES, ProgressBody, ShortcutBody, WorkflowDefinition):
        assert struct.__name__ in schemas, struct
    used = set(refs(document["paths"]))
    for struct in RESPONSES:
        assert f"#/components/schemas/{struct.__name__}" in used, struct


def test_every_status_of_the_literals_is_in_the_document(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    workflow, task = set(get_args(WorkflowStatus)), set(get_args(TaskStatus))
    assert set(schemas["WorkflowSummary"]["properties"]["status"]["enum"]) == workflow
    assert set(schemas["WorkflowView"]["properties"]["status"]["enum"]) == workflow
    accepted = schemas["Accepted"]["properties"]["status"]["anyOf"]
    assert {s for choice in accepted for s in choice["enum"]} == workflow | {"planning"}
    assert set(schemas["TaskView"]["properties"]["status"]["enum"]) == task
    counts = schemas["WorkflowView"]["properties"]["counts"]
    assert set(counts["propertyNames"]["enum"]) == task
    listing = document["paths"]["/workflows"]["get"]["parameters"]
    status = next(p for p in listing if p["name"] == "status")
    assert set(status["schema"]["items"]["enum"]) == workflow
    stream = schemas["WorkflowStreamEvent"]["properties"]["event"]["enum"]
    assert stream == EVENT_KINDS == ["workflow", "task", "progress"]


def test_security_is_declared_only_when_auth_is_on(document: dict[str, Any]) -> None:
    auth = "securitySchemes" in document["components"]
    assert ("security" in document) is auth
    for path, item in document["paths"].items():
        for operation in item.values():
            has_401 = "401" in operation["responses"]
            assert has_401 is (auth and path != "/health"), (path, operation["operationId"])
            if has_401:
                assert operation["responses"]["401"]["headers"]["WWW-Authenticate"]["required"]
    health = document["paths"]["/health"]["get"]
    assert health.get("security") == ([] if auth else None)


def test_the_gateway_limits_are_in_the_document(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    tasks = schemas["WorkflowDefinition"]["properties"]["tasks"]
    assert (tasks["minItems"], tasks["maxItems"]) == (1, 123)
    assert schemas["TaskSpec"]["properties"]["action"]["enum"] == sorted(ACTIONS)
    progress = schemas["ProgressBody"]["properties"]["progress"]
    assert (progress["type"], progress["minimum"], progress["maximum"]) == ("integer", 0, 100)
    listing = {p["name"]: p["schema"] for p in document["paths"]["/workflows"]["get"]["parameters"]}
    assert (listing["limit"]["minimum"], listing["limit"]["maximum"]) == (1, 500)
    assert listing["offset"]["minimum"] == 0
    paths = document["paths"]
    assert paths["/workflows/{id}"]["get"]["parameters"][0]["schema"]["pattern"] == (
        "^[0-9a-f]{32}$"
    )
    sse = paths["/workflows/{id}/events"]["get"]["responses"]["200"]["content"]
    assert list(sse) == ["text/event-stream"]
    logs = paths["/tasks/{id}/logs"]["get"]["responses"]["200"]["content"]
    assert set(logs) == {"application/json", "text/event-stream"}
    links = paths["/workflows"]["post"]["responses"]["202"]["links"]
    assert {link["operationId"] for link in links.values()} == {
        "getWorkflow",
        "cancelWorkflow",
        "retryWorkflow",
        "approveWorkflow",
        "rejectWorkflow",
        "getPlan",
    }
    plan = paths["/plans/{id}"]["get"]["responses"]["200"]["links"]
    assert {link["operationId"] for link in plan.values()} == {"applyPlan"}
    # a definition's task ids are names: the engine's child and undo ids are for records only
    assert schemas["TaskSpec"]["properties"]["id"]["pattern"] == NAME_RE.pattern
    assert "[" in schemas["TaskView"]["properties"]["id"]["pattern"]


def spec(task_id: str = "a", **fields: Any) -> TaskSpec:
    return TaskSpec(id=task_id, action="builtin.noop", **fields)


def task_record(status: str, **fields: Any) -> TaskRecord:
    return msgspec.structs.replace(TaskRecord(WF, spec()), status=status, **fields)


def records() -> tuple[WorkflowRecord, dict[str, TaskRecord]]:
    done = task_record(
        "completed",
        attempt=1,
        executor_id="host-1-abc",
        queued_at=NOW,
        started_at=NOW,
        finished_at=NOW + timedelta(seconds=2),
        exit_code=0,
        output={"ok": [1, 2.5, None]},
        attempts=[AttemptRecord(1, "host-1-abc", NOW, NOW, "completed", 0)],
    )
    waiting = TaskRecord(
        WF, spec("b", depends_on=["a"], priority=5, retries=2), "retrying", attempt=1
    )
    fanned = TaskRecord(
        WF, spec("c", for_each="${a.result}", parallelism=2), "completed", attempt=1, children=2
    )
    child = TaskRecord(
        WF,
        spec("c[0]"),
        "waiting",
        parent="c",
        keys=[],
        waiting_for="key host-1 (held by x.a)",
        waiting_since=NOW,
        args={"host": "h1"},
    )
    gated = TaskRecord(
        WF,
        spec("c[1]", approval=Approval(approvers=["alice"])),
        "awaiting_approval",
        parent="c",
        approval_deadline=NOW,
    )
    undo = TaskRecord(WF, spec("a[undo]"), "cancelling", compensates="a", handbacks=1, note="x")
    record = WorkflowRecord(
        id=WF,
        name="w",
        status="compensating",
        created_at=NOW,
        task_ids=["a", "b", "c"],
        on_failure="compensate",
        started_at=NOW,
        trace_id="ab" * 16,
        counts={"completed": 2, "retrying": 1, "waiting": 1, "awaiting_approval": 1},
        submitted_by="alice",
        approval=Approval(approvers=["bob"], timeout_seconds=60),
        approval_deadline=NOW,
        approvals=[Decision("approved", "bob", NOW), Decision("rejected", "carol", NOW, "c[1]")],
        mode="apply",
        plan_id="ff" * 16,
    )
    return record, {
        "a": done,
        "b": waiting,
        "c": fanned,
        "c[0]": child,
        "c[1]": gated,
        "a[undo]": undo,
    }


def test_the_views_answer_what_the_document_says(document: dict[str, Any]) -> None:
    record, tasks = records()
    progress = {"b": Progress(percent=40, at=NOW, message="half", attempt=1)}
    definition = WorkflowDefinition(name="p", tasks=[spec(), spec("b", depends_on=["a"])])
    beat = ExecutorBeat("e1", "default", "host", 1, 4, 1, NOW, NOW, "0.1.0", ["x.a"])
    answers = [
        ("WorkflowView", views.workflow_view(record, tasks, progress)),
        ("WorkflowView", views.workflow_view(record, None, {})),
        ("WorkflowView", views.workflow_view(record, tasks, progress, include_tasks=False)),
        ("WorkflowView", views.pending_view(WF, definition, NOW)),
        ("WorkflowView", views.pending_view(WF, definition, NOW, include_tasks=False)),
        ("WorkflowSummary", views.workflow_summary(record)),
        ("WorkflowSummary", views.workflow_summary(msgspec.structs.replace(record, counts=None))),
        ("WorkflowSummary", views.pending_summary(WF, "p", 2, NOW)),
        ("TaskView", views.task_view(tasks["a"], None)),
        ("TaskView", views.task_view(tasks["b"], progress["b"])),
        ("ExecutorView", views.executor_view(beat, NOW + timedelta(seconds=1))),
        ("PlanView", plans.plan_view(record, tasks, NOW + timedelta(seconds=5), 3600)),
    ]
    for name, body in answers:
        validator(document, name).validate(answer(body))


def test_views_keep_the_answers_of_before() -> None:
    """The Structs changed how answers are built, not what they say."""
    record, tasks = records()
    view = answer(views.workflow_view(record, tasks, {}))
    assert view["created_at"] == "2026-01-02T03:04:05.678901+00:00"
    assert view["counts"] == {
        "completed": 2,
        "retrying": 1,
        "waiting": 1,
        "awaiting_approval": 1,
        "cancelling": 1,
    }
    # of every task counted, fan-out children and compensations included (2 of 6), where it
    # was of the definition's tasks (2 of 3; a fan-out of many children went over 100)
    assert view["progress"] == 33
    assert [t["task_id"].split(".", 1)[1] for t in view["tasks"]] == [
        "a",
        "b",
        "c",
        "c[0]",
        "c[1]",
        "a[undo]",
    ]
    assert (view["mode"], view["plan_id"], view["submitted_by"]) == ("apply", "ff" * 16, "alice")
    assert view["approval"] == {"approvers": ["bob"], "timeout_seconds": 60.0}
    assert view["approval_deadline"] == "2026-01-02T03:04:05.678901+00:00"
    assert view["approvals"] == [
        {"decision": "approved", "by": "bob", "at": "2026-01-02T03:04:05.678901Z"},
        {
            "decision": "rejected",
            "by": "carol",
            "at": "2026-01-02T03:04:05.678901Z",
            "task_id": "c[1]",
        },
    ]
    child = view["tasks"][3]
    assert (child["parent"], child["args"], child["waiting_for"]) == (
        "c",
        {"host": "h1"},
        "key host-1 (held by x.a)",
    )
    assert (view["tasks"][2]["children"], view["tasks"][5]["compensates"]) == (2, "a")
    assert view["tasks"][5]["handbacks"] == 1 and view["tasks"][5]["note"] == "x"
    assert view["duration_seconds"] is None and view["error"] is None
    task = view["tasks"][0]
    assert task["attempts"] == [
        {
            "attempt": 1,
            "executor_id": "host-1-abc",
            "started_at": "2026-01-02T03:04:05.678901Z",
            "finished_at": "2026-01-02T03:04:05.678901Z",
            "outcome": "completed",
            "exit_code": 0,
        }
    ]
    assert task["duration_seconds"] == 2.0 and task["next_attempt_at"] is None
    assert "tasks" not in answer(views.workflow_view(record, tasks, {}, include_tasks=False))
    pending = answer(views.pending_view(WF, WorkflowDefinition(name="p", tasks=[spec()]), NOW))
    assert set(pending) == {
        "workflow_id",
        "name",
        "status",
        "tasks_total",
        "created_at",
        "started_at",
        "finished_at",
        "trace_id",
        "counts",
        "progress",
        "tasks",
    }
    assert pending["tasks"] == [
        {
            "id": "a",
            "task_id": f"{WF}.a",
            "action": "builtin.noop",
            "args": {},
            "status": "pending",
            "attempt": 0,
            "progress": 0,
            "depends_on": [],
        }
    ]


def test_an_error_echoing_a_lone_surrogate_is_still_json() -> None:
    from services.gateway.responses import Error, ErrorBody

    body = Error(error=ErrorBody(code="bad_request", message="unknown field `\udc80`"))
    assert answer(body)["error"]["message"] == "unknown field `\udc80`"


def test_an_integral_float_is_an_integer_as_json_schema_says() -> None:
    assert from_builtins({"progress": 14.0}, ProgressBody).progress == 14
    with pytest.raises(msgspec.ValidationError):
        from_builtins({"progress": 14.5}, ProgressBody)
    with pytest.raises(msgspec.ValidationError):
        from_builtins({"progress": "14"}, ProgressBody)
    definition = definition_from_data(
        {
            "name": "n",
            "priority": 2.0,
            "tasks": [
                {
                    "id": "a",
                    "action": "builtin.sleep",
                    "retries": 1.0,
                    "priority": -3.0,
                    "args": {"seconds": 1.0},
                    "timeout_seconds": 5,
                }
            ],
        }
    )
    task = definition.tasks[0]
    assert (definition.priority, task.retries, task.priority) == (2, 1, -3)
    assert isinstance(task.priority, int) and isinstance(task.args["seconds"], float)
    params = from_builtins({"infra": "x", "params": {"retries": 3.0}}, ShortcutBody).params
    assert msgspec.to_builtins(params) == {"retries": 3}


async def test_the_served_document_is_this_gateways_and_405_names_the_methods() -> None:
    config = msgspec.structs.replace(load_config(environ={}), gateway=gateway())
    client = TestClient(TestServer(create_app(config, load_registry())))
    await client.start_server()
    try:
        response = await client.get("/openapi.json")
        assert response.status == 200
        assert await response.json() == json.loads(json.dumps(openapi_document(gateway(), ACTIONS)))
        response = await client.request("TRACE", "/openapi.json")
        assert response.status == 405
        assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD"}
        assert (await response.json())["error"]["code"] == "method_not_allowed"
    finally:
        await client.close()


def test_named_priorities_one_mapping_in_the_schema_and_the_parser(
    document: dict[str, Any],
) -> None:
    from shared.errors import DefinitionError
    from shared.priority import PRIORITY_NAMES, parse_priority

    schemas = document["components"]["schemas"]
    for schema in (
        schemas["WorkflowDefinition"]["properties"]["priority"],
        schemas["TaskSpec"]["properties"]["priority"],
        schemas["ShortcutBody"]["properties"]["priority"],
        schemas["ShortcutParams"]["properties"]["priority"],
    ):
        check = jsonschema.Draft202012Validator(schema)
        for name, number in PRIORITY_NAMES.items():
            for spelling in (name, name.upper(), name.capitalize()):
                assert check.is_valid(spelling) and parse_priority(spelling) == number
        for bad in ("urgent", "", "High ", 1001, 1.5, True):
            assert not check.is_valid(bad), bad
            with pytest.raises(DefinitionError):
                parse_priority(bad)
    assert [parse_priority(n) for n in ("Low", "Normal", "High", "Critical")] == [-10, 0, 10, 100]
    assert parse_priority(7.0) == 7 and parse_priority(-1000) == -1000
    definition = definition_from_data(
        {
            "name": "n",
            "priority": "HIGH",
            "tasks": [{"id": "a", "action": "x.y", "priority": "low"}],
        }
    )
    assert (definition.priority, definition.tasks[0].priority) == (10, -10)


def test_shortcut_bodies_in_the_document_and_unknown_keys(document: dict[str, Any]) -> None:
    from services.gateway.bodies import ApproveBody, RejectBody, unknown_keys

    paths = document["paths"]
    for path, kind in (
        ("/workflows/servers/create", "server_create"),
        ("/workflows/taskserv/create", "taskserv_create"),
        ("/workflows/cluster/create", "cluster_create"),
    ):
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["allOf"][1]["properties"]["type"] == {"const": kind}
    body = document["components"]["schemas"]["ShortcutBody"]
    assert body["anyOf"] == [{"required": ["infra"]}, {"required": ["infra_name"]}]
    assert body["additionalProperties"] is False
    assert document["components"]["schemas"]["ShortcutParams"]["additionalProperties"] is False
    raw = {"infra": "w", "zone": 1, "params": {"plan": "large", "retries": 1, "bogus": 1}}
    assert unknown_keys(raw, ShortcutBody) == ["zone", "params.plan", "params.bogus"]
    assert unknown_keys({"progress": 1, "status": "x", "percent": 2}, ProgressBody) == ["percent"]
    assert unknown_keys({"comment": "", "by": "x"}, ApproveBody) == ["by"]
    assert unknown_keys({"reason": "r", "task": None}, RejectBody) == []
    assert (
        unknown_keys([1, 2], ShortcutBody) == [] and unknown_keys({"params": 5}, ShortcutBody) == []
    )
