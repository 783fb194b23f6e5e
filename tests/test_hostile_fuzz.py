"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis over
hypothesis), against a real gateway, scheduler and executor on a real NATS server.

Every operation of ``GET /openapi.json`` gets generated requests, valid and invalid (positive
and negative modes), bounded by ``max_examples`` so the whole run stays well under a minute.
Every answer must be one the document declares (status code, content type, body schema), and
never a 5xx; a request that hangs fails on the client's timeout. Afterwards the services are
alive and a normal workflow still completes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .support import Stack, running_stack

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 25  # per operation and mode: 16 operations x 2 modes x 25 requests
REQUEST_TIMEOUT_S = 30
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
SENT: Counter[str] = Counter()


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("fuzz"), executors=1) as stack:
        yield stack


def fuzz_operation(operation: Any, mode: GenerationMode, base_url: str) -> list[str]:
    """Run ``MAX_EXAMPLES`` generated requests against one operation; return the failures."""
    failures: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,  # no .hypothesis/ directory in the work tree
        phases=[Phase.explicit, Phase.generate],  # report what was found, do not shrink
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        SENT[f"{mode.value} {case.method} {case.path}"] += 1
        try:
            case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=REQUEST_TIMEOUT_S)
        except Exception as exc:  # every failure of every operation, not only the first
            failures.append(f"{mode.value} {case.method} {case.formatted_path}: {exc}"[:3000])

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
        assert mode is GenerationMode.NEGATIVE, operation.label
    return failures


def test_api_conforms_to_its_openapi_document(fuzz_stack: Stack) -> None:
    base = fuzz_stack.http.base
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    documented = {f"{m.upper()} {p}" for p, ms in schema.raw_schema["paths"].items() for m in ms}
    # schemathesis leaves out the document's own URL; it takes no input anyway
    assert {op.label for op in operations} == documented - {"GET /openapi.json"}
    assert len(documented) == 15, documented  # every route of the gateway
    failures: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failures += fuzz_operation(operation, mode, base)
    print(f"\nfuzz requests {sum(SENT.values())} over {len(operations)} operations")
    assert not failures, "\n\n".join(failures[:20]) + f"\n({len(failures)} failures)"


def test_real_answers_match_the_document(fuzz_stack: Stack) -> None:
    """Generated ids rarely exist: check the 2xx and 409 answers about real workflows too."""
    http = fuzz_stack.http
    tasks = [
        {"id": "ok", "action": "builtin.noop"},
        {"id": "bad", "action": "builtin.fail", "args": {"message": "on purpose"}},
        {"id": "after", "action": "builtin.noop", "depends_on": ["bad"]},
    ]
    status, accepted = http.post(
        "/workflows",
        {"name": "real", "tasks": tasks, "on_failure": "continue"},
        headers={"Idempotency-Key": "fuzz-real"},
    )
    assert status == 202, accepted
    wf_id = accepted["workflow_id"]
    assert http.wait_workflow(wf_id)["status"] == "failed"
    status, running = http.post(
        "/workflows",
        {
            "name": "holder",
            "tasks": [{"id": "hold", "action": "builtin.sleep", "args": {"seconds": 60}}],
        },
    )
    assert status == 202, running
    holder = running["workflow_id"]
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
                "headers": {"Idempotency-Key": "fuzz-real"},
            },
        ),
        ("/workflows/{id}", "GET", {"path_parameters": {"id": wf_id}}),
        ("/workflows/{id}", "GET", {"path_parameters": {"id": wf_id}, "query": {"tasks": False}}),
        ("/workflows/{id}/events", "GET", {"path_parameters": {"id": wf_id}}),
        ("/workflows/{id}/cancel", "POST", {"path_parameters": {"id": wf_id}}),  # 409
        ("/workflows/{id}/retry", "POST", {"path_parameters": {"id": wf_id}}),
        ("/workflows/{id}/retry", "POST", {"path_parameters": {"id": wf_id}}),  # 409 by now?
        ("/tasks/{id}", "GET", {"path_parameters": {"id": f"{wf_id}.bad"}}),
        ("/tasks/{id}/logs", "GET", {"path_parameters": {"id": f"{wf_id}.bad"}}),
        (
            "/tasks/{id}/progress",
            "POST",
            {"path_parameters": {"id": f"{wf_id}.ok"}, "body": {"progress": 5}},
        ),  # 409: finished
        (
            "/tasks/{id}/progress",
            "POST",
            {"path_parameters": {"id": f"{holder}.hold"}, "body": {"progress": 5, "message": "hi"}},
        ),
        ("/workflows/{id}/cancel", "POST", {"path_parameters": {"id": holder}}),
        ("/workflows/servers/create", "POST", {"body": {"infra": "nope"}}),  # 422
    ]
    statuses = []
    for path, method, kwargs in calls:
        if "body" in kwargs:
            kwargs["media_type"] = "application/json"
        case = schema[path][method].Case(**kwargs)
        response = case.call_and_validate(base_url=http.base, checks=CHECKS, timeout=60)
        statuses.append(response.status_code)
    assert 200 in statuses and 202 in statuses and 409 in statuses and 422 in statuses, statuses


def test_services_survive_the_fuzzing(fuzz_stack: Stack) -> None:
    for service in fuzz_stack.services:
        assert service.alive, f"{service.name} died:\n{service.log()[-3000:]}"
    status, accepted = fuzz_stack.http.post(
        "/workflows", {"name": "after-fuzz", "tasks": [{"id": "a", "action": "builtin.noop"}]}
    )
    assert status == 202, accepted
    assert fuzz_stack.http.wait_workflow(accepted["workflow_id"])["status"] == "completed"
    for service in fuzz_stack.services:
        assert "Traceback" not in service.log(), f"{service.name}:\n{service.log()[-5000:]}"
