"""The API against its own OpenAPI document, under a third-party contract tester: schemathesis
with every check (``--checks all``) and every phase (examples, coverage, fuzzing, stateful),
against a real gateway, scheduler and executor on a real NATS server.

Valid and invalid requests are generated for every operation from ``GET /openapi.json``; every
answer must be one the document declares (status, content type, headers, body schema), never a
5xx; invalid input must be refused and valid input accepted; undocumented methods get 405 with
``Allow``; the stateful phase follows the document's links from a submission to the workflow,
its tasks, cancel, retry, approve and reject, and from a submission to its plan and the plan's
apply. ``tests/schemathesis.toml`` says where and why an expectation
differs from schemathesis' defaults. With auth on (and ``[gateway] users``), every check runs
again with the token, and the probes without it or with a wrong one must get 401.

Then answers about real workflows (2xx, 403, 409 and 422, finished event and log streams, a
fan-out's children, plans, approvals, concurrency keys) are checked against the document with
every check too, and the services must have survived it all.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import schemathesis

from shared import subjects
from shared.messages import LogChunk, encode

from .support import VENV_BIN, Stack, publish, running_stack, wait_until

pytestmark = pytest.mark.e2e

SCHEMATHESIS = VENV_BIN / "schemathesis"
CONFIG = Path(__file__).with_name("schemathesis.toml")
PHASES = ("examples", "coverage", "fuzzing", "stateful")
# Per operation and phase: with coverage's own cases about 1,500 requests, some 15 s.
MAX_EXAMPLES = 30
MAX_EXAMPLES_AUTH = 5
TOKEN = "contract-test-token-8d1f"
USERS = '{"alice": "contract-alice-4c2e", "bob": "contract-bob-9a7d"}'


def operations(document: dict[str, Any]) -> int:
    return sum(len(item) for item in document["paths"].values())


@pytest.fixture(scope="module")
def contract_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("contract"), executors=1) as stack:
        yield stack


def run_schemathesis(
    base: str, workdir: Path, *args: str, max_examples: int
) -> subprocess.CompletedProcess[str]:
    """``schemathesis run`` with every check and phase; its cache lives in ``workdir``."""
    return subprocess.run(
        [
            str(SCHEMATHESIS),
            "--config-file",
            str(CONFIG),
            "run",
            f"{base}/openapi.json",
            "--checks",
            "all",
            "--phases",
            ",".join(PHASES),
            "--max-examples",
            str(max_examples),
            "--generation-database",
            "none",
            "--request-timeout",
            "30",
            "--workers",
            "1",
            "--continue-on-failure",
            "--no-color",
            *args,
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_passed(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-30000:]
    for phase in PHASES:  # each ran and passed (not skipped)
        assert re.search(rf"✅ +{phase}\b", output, re.IGNORECASE), output[-5000:]
    print(output[-3000:])


def test_the_api_keeps_its_openapi_contract(contract_stack: Stack, tmp_path: Path) -> None:
    result = run_schemathesis(contract_stack.http.base, tmp_path, max_examples=MAX_EXAMPLES)
    assert_passed(result)
    _, document = contract_stack.http.get("/openapi.json")
    total = operations(document) - 1  # every route but the document's own
    assert f"{total} selected / {total} total" in result.stdout, result.stdout[-3000:]


def test_the_document_says_auth_is_off(contract_stack: Stack) -> None:
    status, document = contract_stack.http.get("/openapi.json")
    assert status == 200
    assert "security" not in document and "securitySchemes" not in document["components"]
    for path in document["paths"].values():
        for operation in path.values():
            assert "401" not in operation["responses"], operation["operationId"]


def test_real_answers_match_the_document(contract_stack: Stack) -> None:
    """Generated ids rarely exist: the 2xx, 409 and 422 answers about real workflows, and
    their finished event and log streams, checked with every check too."""
    http = contract_stack.http
    tasks = [
        {"id": "ok", "action": "builtin.noop"},
        {"id": "bad", "action": "builtin.fail", "args": {"message": "on purpose"}},
        {"id": "after", "action": "builtin.noop", "depends_on": ["bad"]},
    ]
    status, accepted = http.post(
        "/workflows",
        {"name": "real", "tasks": tasks, "on_failure": "continue"},
        headers={"Idempotency-Key": "contract-real"},
    )
    assert status == 202, accepted
    wf_id = accepted["workflow_id"]
    assert http.wait_workflow(wf_id)["status"] == "failed"
    chunk = LogChunk(wf_id, "bad", 1, "stdout", ["line one", "ünïcode ✓"], datetime.now(UTC))
    publish(contract_stack, subjects.log_subject(wf_id, "bad", 1), encode(chunk))
    status, running = http.post(
        "/workflows",
        {
            "name": "holder",
            "tasks": [{"id": "hold", "action": "builtin.sleep", "args": {"seconds": 60}}],
        },
    )
    assert status == 202, running
    holder = running["workflow_id"]
    # a fan-out: children <name>[<index>] in the views, their own task ids
    status, fanned = http.post(
        "/workflows",
        {
            "name": "fan",
            "tasks": [
                {"id": "list", "action": "builtin.echo", "args": {"items": ["x", "y"]}},
                {
                    "id": "each",
                    "action": "builtin.echo",
                    "depends_on": ["list"],
                    "for_each": "${tasks.list.result.items}",
                    "args": {"item": "${item}"},
                    "concurrency": [{"key": "contract-{args.item}", "limit": 1}],
                },
            ],
        },
    )
    assert status == 202, fanned
    fan = fanned["workflow_id"]
    assert http.wait_workflow(fan)["status"] == "completed"
    # an approval gate that waits, and a plan that is ready
    status, gate = http.post(
        "/workflows",
        {
            "name": "gate",
            "approval": {"timeout_seconds": 600},
            "tasks": [{"id": "t", "action": "builtin.noop"}],
        },
    )
    assert status == 202, gate
    gated = gate["workflow_id"]
    wait_until(lambda: http.get(f"/workflows/{gated}")[1]["status"] == "awaiting_approval")
    status, planned = http.post(
        "/workflows?plan=true", {"name": "plan", "tasks": [{"id": "t", "action": "builtin.noop"}]}
    )
    assert status == 202 and planned["status"] == "planning", planned
    plan = planned["plan_id"]
    wait_until(lambda: http.get(f"/plans/{plan}")[1]["status"] == "ready")
    schema = schemathesis.openapi.from_url(f"{http.base}/openapi.json")
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("/health", "GET", {}),
        ("/executors", "GET", {}),
        ("/workflows", "GET", {"query": {"limit": 2}}),
        ("/workflows", "GET", {"query": {"status": "failed,completed", "name": "re"}}),
        (
            "/workflows",
            "POST",
            {
                "body": {"name": "again", "tasks": tasks},
                "headers": {"Idempotency-Key": "contract-real"},
            },
        ),
        ("/workflows", "POST", {"body": {"name": "float", "priority": 3.0, "tasks": tasks}}),
        ("/workflows", "POST", {"body": {"name": "cycle", "tasks": [tasks[0], tasks[0]]}}),
        ("/workflows/{id}", "GET", {"path_parameters": {"id": wf_id}}),
        ("/workflows/{id}", "GET", {"path_parameters": {"id": wf_id}, "query": {"tasks": False}}),
        ("/workflows/{id}", "GET", {"path_parameters": {"id": holder}}),
        ("/workflows/{id}/events", "GET", {"path_parameters": {"id": wf_id}}),
        ("/workflows/{id}/cancel", "POST", {"path_parameters": {"id": wf_id}}),  # 409
        ("/workflows/{id}/retry", "POST", {"path_parameters": {"id": wf_id}}),
        ("/workflows/{id}/retry", "POST", {"path_parameters": {"id": wf_id}}),  # 409 by now?
        ("/tasks/{id}", "GET", {"path_parameters": {"id": f"{wf_id}.bad"}}),
        ("/tasks/{id}/logs", "GET", {"path_parameters": {"id": f"{wf_id}.bad"}}),
        (
            "/tasks/{id}/logs",
            "GET",
            {"path_parameters": {"id": f"{wf_id}.ok"}, "query": {"follow": True}},
        ),
        (
            "/tasks/{id}/progress",
            "POST",
            {"path_parameters": {"id": f"{wf_id}.ok"}, "body": {"progress": 5}},
        ),  # 409: finished
        (
            "/tasks/{id}/progress",
            "POST",
            {"path_parameters": {"id": f"{holder}.hold"}, "body": {"progress": 14.0}},
        ),  # an integral float is an integer, as the document's JSON Schema says
        (
            "/tasks/{id}/progress",
            "POST",
            {"path_parameters": {"id": f"{holder}.hold"}, "body": {"progress": 5, "message": "hi"}},
        ),
        ("/workflows/{id}/cancel", "POST", {"path_parameters": {"id": holder}}),
        ("/workflows/servers/create", "POST", {"body": {"infra": "nope"}}),  # 422
        ("/workflows/servers/create", "POST", {"body": {"infra": "wuji"}, "query": {"plan": True}}),
        ("/workflows/{id}", "GET", {"path_parameters": {"id": fan}}),
        ("/tasks/{id}", "GET", {"path_parameters": {"id": f"{fan}.each[1]"}}),
        ("/tasks/{id}", "GET", {"path_parameters": {"id": f"{fan}.each"}}),
        (
            "/tasks/{id}/logs",
            "GET",
            {"path_parameters": {"id": f"{wf_id}.bad"}, "query": {"attempt": 1, "limit": 1}},
        ),
        ("/concurrency", "GET", {}),
        ("/plans/{id}", "GET", {"path_parameters": {"id": plan}}),
        ("/plans/{id}", "GET", {"path_parameters": {"id": wf_id}}),  # 404: not a plan
        ("/plans/{id}/apply", "POST", {"path_parameters": {"id": plan}}),
        ("/plans/{id}/apply", "POST", {"path_parameters": {"id": plan}}),  # 409: applied
        ("/plans/{id}", "GET", {"path_parameters": {"id": plan}}),  # applied_by
        ("/workflows/{id}", "GET", {"path_parameters": {"id": gated}}),
        (
            "/workflows/{id}/reject",
            "POST",
            {"path_parameters": {"id": wf_id}, "body": {"reason": "x"}},
        ),
        ("/workflows/{id}/approve", "POST", {"path_parameters": {"id": gated}, "body": {}}),
        (
            "/workflows/{id}/approve",
            "POST",
            {"path_parameters": {"id": gated}, "body": {"task": "t"}},
        ),
    ]
    statuses = []
    for path, method, kwargs in calls:
        if "body" in kwargs:
            kwargs["media_type"] = "application/json"
        case = schema[path][method].Case(**kwargs)
        response = case.call_and_validate(base_url=http.base, timeout=60)  # every check
        statuses.append(response.status_code)
    assert statuses[5] == 202 and statuses[18] == 202, statuses  # 3.0 and 14.0 taken
    assert 200 in statuses and 409 in statuses and 422 in statuses, statuses
    assert statuses[-9:] == [200, 404, 202, 409, 200, 200, 409, 202, 409], statuses
    status, logs = http.get(f"/tasks/{wf_id}.bad/logs")
    assert [line["line"] for line in logs["lines"]] == ["line one", "ünïcode ✓"], logs


def test_with_auth_on_every_route_but_health_needs_the_token(tmp_path: Path) -> None:
    env = {"PROVISIONING_GATEWAY_AUTH_TOKEN": TOKEN, "PROVISIONING_GATEWAY_USERS": USERS}
    with running_stack(tmp_path / "stack", executors=1, env=env) as stack:
        status, document = stack.http.get("/openapi.json")
        assert status == 200
        assert document["security"] == [{"bearer": []}]
        assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        for path, item in document["paths"].items():
            for operation in item.values():
                if path == "/health":
                    assert operation["security"] == [], operation
                    assert "401" not in operation["responses"]
                else:
                    assert "401" in operation["responses"], operation["operationId"]
        work = tmp_path / "schemathesis"
        work.mkdir()
        auth = f"Authorization: Bearer {TOKEN}"
        result = run_schemathesis(
            stack.http.base, work, "--header", auth, max_examples=MAX_EXAMPLES_AUTH
        )
        assert_passed(result)
        assert TOKEN not in result.stdout  # the output is sanitized
        # a gate that names its approver: 403 for another user, 202 for that one
        status, gate = stack.http.post(
            "/workflows",
            {
                "name": "gate",
                "approval": {"approvers": ["bob"]},
                "tasks": [{"id": "t", "action": "builtin.noop"}],
            },
        )
        assert status == 202, gate
        wf_id = gate["workflow_id"]
        wait_until(
            lambda: stack.http.get(f"/workflows/{wf_id}")[1]["status"] == "awaiting_approval"
        )
        schema = schemathesis.openapi.from_url(
            f"{stack.http.base}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        statuses = []
        for user in ("alice", "bob"):
            token = json.loads(USERS)[user]
            case = schema["/workflows/{id}/approve"]["POST"].Case(
                path_parameters={"id": wf_id},
                body={"comment": user},
                media_type="application/json",
                headers={"Authorization": f"Bearer {token}"},
            )
            response = case.call_and_validate(base_url=stack.http.base, timeout=60)
            statuses.append((response.status_code, response.json().get("by")))
        assert statuses == [(403, None), (202, "bob")], statuses
        view = stack.http.wait_workflow(wf_id)
        assert view["status"] == "completed" and view["submitted_by"] == "operator", view
        assert [(a["decision"], a["by"]) for a in view["approvals"]] == [("approved", "bob")]


def test_services_survive_the_contract_run(contract_stack: Stack) -> None:
    for service in contract_stack.services:
        assert service.alive, f"{service.name} died:\n{service.log()[-3000:]}"
    status, accepted = contract_stack.http.post(
        "/workflows", {"name": "after-fuzz", "tasks": [{"id": "a", "action": "builtin.noop"}]}
    )
    assert status == 202, accepted
    assert contract_stack.http.wait_workflow(accepted["workflow_id"])["status"] == "completed"
    for service in contract_stack.services:
        assert "Traceback" not in service.log(), f"{service.name}:\n{service.log()[-5000:]}"
