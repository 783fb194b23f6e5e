"""One trace per workflow across the three real services and the subprocess, exported over
OTLP/HTTP to a receiver inside the test (real HTTP, the real protobuf payload decoded)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.otlp import Receiver

from .support import NatsServer, Stack, wait_until

pytestmark = pytest.mark.e2e
FIXTURES = Path(__file__).parent / "fixtures"
SERVICES = {"provisioning-gateway", "provisioning-scheduler", "provisioning-executor"}


@pytest.fixture
def traced(tmp_path: Path, nats_server: NatsServer) -> Iterator[tuple[Stack, Receiver]]:
    with Receiver() as receiver:
        stack = Stack(
            tmp_path,
            nats_server,
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_METRIC_EXPORT_INTERVAL": "1000",
                "PROVISIONING_NUSHELL_REGISTRY": str(FIXTURES / "registry.toml"),
                "PROVISIONING_NUSHELL_REGISTRY_LIB": str(FIXTURES / "nulib"),
            },
        )
        try:
            stack.start()
            yield stack, receiver
        except BaseException:
            print(stack.logs())
            raise
        finally:
            stack.stop()


def _children(spans: list[dict[str, Any]], parent: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in spans if s["parent_id"] == parent["span_id"]]


def test_one_trace_across_services_and_subprocess(traced: tuple[Stack, Receiver]) -> None:
    stack, receiver = traced
    status, accepted = stack.http.post(
        "/workflows",
        {
            "name": "traced",
            "tasks": [
                {"id": "work", "action": "probe.progress", "args": {"hold_seconds": 0.2}},
                {
                    "id": "flaky",
                    "action": "builtin.fail",
                    "args": {"message": "boom"},
                    "retries": 1,
                    "backoff": {"initial_seconds": 0.1},
                    "depends_on": ["work"],
                },
            ],
        },
    )
    assert status == 202
    view = stack.http.wait_workflow(accepted["workflow_id"])
    assert view["status"] == "failed"
    trace_id = view["trace_id"]
    assert trace_id and accepted["trace_id"] == trace_id

    def complete() -> list[dict[str, Any]] | None:
        spans = receiver.trace(trace_id)
        names = [s["name"] for s in spans]
        ids = {s["span_id"] for s in spans}
        return (
            spans
            if names.count("execute flaky") == 2
            and "subprocess probe.progress" in names
            # each service exports on its own schedule: wait for all of them, and for the
            # dispatch span of every execution (the scheduler's batch may come last)
            and {s["service"] for s in spans} >= SERVICES
            and all(s["parent_id"] in ids for s in spans if s["name"].startswith("execute "))
            else None
        )

    spans = wait_until(complete, 30, 0.5, what="spans of every service to arrive")
    assert {s["service"] for s in spans} >= SERVICES
    # every span of the workflow is in this one trace
    assert all(
        s["trace_id"] == trace_id
        for s in receiver.spans
        if s["attributes"].get("workflow.id") == view["workflow_id"]
    )

    by_id = {s["span_id"]: s for s in spans}
    submit = next(s for s in spans if s["name"] == "gateway.submit")
    assert submit["service"] == "provisioning-gateway"
    assert submit["attributes"]["messaging.system"] == "nats"
    assert submit["kind"] == 4  # PRODUCER

    accept = next(s for s in spans if s["name"] == "scheduler.accept")
    assert accept["parent_id"] == submit["span_id"] and accept["kind"] == 5  # CONSUMER

    executions = [s for s in spans if s["name"].startswith("execute ")]
    assert len(executions) == 3  # work once, flaky twice (one retry)
    for execute in executions:
        assert execute["service"] == "provisioning-executor" and execute["kind"] == 5
        dispatch = by_id[execute["parent_id"]]
        assert dispatch["service"] == "provisioning-scheduler" and dispatch["kind"] == 4
        assert dispatch["attributes"]["messaging.operation.type"] == "publish"
        assert dispatch["parent_id"] == submit["span_id"]
    attempts = sorted(
        s["attributes"]["task.attempt"] for s in executions if s["attributes"]["task.id"] == "flaky"
    )
    assert attempts == [1, 2]
    assert all(
        s["status"] == 2 for s in executions if s["attributes"]["task.id"] == "flaky"
    )  # ERROR

    work = next(s for s in executions if s["attributes"]["task.id"] == "work")
    (subprocess,) = [s for s in _children(spans, work) if s["name"] == "subprocess probe.progress"]
    progress = [e for e in work["events"] if e["name"] == "progress"]
    assert [e["attributes"]["progress.percent"] for e in progress][:1] == [10]
    # the subprocess's own HTTP call (POST progress with TRACEPARENT) joined the trace
    posted = [
        s
        for s in spans
        if s["service"] == "provisioning-gateway" and s["parent_id"] == subprocess["span_id"]
    ]
    assert posted, [s["name"] for s in spans]
    assert any(
        e["attributes"].get("progress.percent") == 42 for s in posted for e in s["events"]
    ) or any(e["attributes"].get("progress.percent") == 42 for s in spans for e in s["events"])

    # the scheduler processed each report in the context of the attempt that sent it: as a
    # child of the execution (a workflow's only report in a step), or in one span per step
    # linked to every execution that reported in it
    reports = [s for s in spans if s["name"] == "scheduler.report"]
    assert all(r["service"] == "provisioning-scheduler" and r["kind"] == 5 for r in reports)
    handled = {r["parent_id"] for r in reports} | {link for r in reports for link in r["links"]}
    assert all(e["span_id"] in handled for e in executions), (
        [(e["span_id"], e["attributes"]) for e in executions],
        [(r["parent_id"], r["links"], r["attributes"]) for r in reports],
    )
    # built-ins run inside the executor: no subprocess span for them
    flaky = [s for s in executions if s["attributes"]["task.id"] == "flaky"]
    assert not [c for s in flaky for c in _children(spans, s) if c["name"].startswith("subprocess")]


def test_metrics_are_exported(traced: tuple[Stack, Receiver]) -> None:
    stack, receiver = traced
    status, accepted = stack.http.post(
        "/workflows",
        {
            "name": "m",
            "tasks": [
                {"id": "a", "action": "builtin.noop"},
                {
                    "id": "b",
                    "action": "builtin.fail",
                    "retries": 1,
                    "backoff": {"initial_seconds": 0.1},
                },
            ],
        },
    )
    assert status == 202
    stack.http.wait_workflow(accepted["workflow_id"])
    wanted = {
        "provisioning.tasks",
        "provisioning.task.retries",
        "provisioning.task.dispatch_latency",
        "provisioning.task.duration",
        "provisioning.queue.depth",
        "provisioning.executor.slots_in_use",
    }
    wait_until(
        lambda: wanted <= set(receiver.metrics),
        30,
        0.5,
        what=f"metrics {wanted - set(receiver.metrics)}",
    )
    assert "provisioning-executor" in receiver.metrics["provisioning.task.duration"]
    assert "provisioning-scheduler" in receiver.metrics["provisioning.tasks"]


def test_cli_prints_trace_link_and_tree(traced: tuple[Stack, Receiver]) -> None:
    stack, receiver = traced
    status, accepted = stack.http.post(
        "/workflows", {"name": "t", "tasks": [{"id": "a", "action": "builtin.noop"}]}
    )
    assert status == 202
    view = stack.http.wait_workflow(accepted["workflow_id"])
    out = stack.cli("trace", view["workflow_id"])  # Jaeger's default address: nothing answers
    assert out.returncode == 0, out.stderr
    assert f"/trace/{view['trace_id']}" in out.stdout and "did not answer" in out.stdout
    status_out = stack.cli("workflow", "status", view["workflow_id"])
    assert view["trace_id"] in status_out.stdout

    wait_until(lambda: any(s["name"] == "execute a" for s in receiver.trace(view["trace_id"])), 30)
    url, stop = receiver.serve_jaeger_api()
    try:
        tree = stack.cli("trace", view["workflow_id"], env={"PROVISIONING_TRACING_JAEGER_UI": url})
    finally:
        stop()
    assert tree.returncode == 0, tree.stderr
    lines = tree.stdout.splitlines()
    submit = next(line for line in lines if "gateway.submit" in line)
    execute = next(line for line in lines if "execute a" in line)
    indent = lambda line: len(line) - len(line.lstrip())  # noqa: E731
    assert indent(execute) > indent(submit)
    assert "provisioning-executor" in execute and execute.rstrip().endswith("ms")


def test_otlp_grpc_export(tmp_path: Path, nats_server: NatsServer) -> None:
    """The same spans over OTLP/gRPC, to a real gRPC server in the test."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list[tuple[str, str]] = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # type: ignore[no-untyped-def]
            for resource_spans in request.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
                for scope in resource_spans.scope_spans:
                    received.extend((service, span.name) for span in scope.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stack = Stack(
        tmp_path,
        nats_server,
        env={
            "PROVISIONING_TRACING_EXPORTER": "otlp-grpc",
            "PROVISIONING_TRACING_ENDPOINT": f"http://127.0.0.1:{port}",
        },
    )
    try:
        stack.start()
        status, accepted = stack.http.post(
            "/workflows", {"name": "g", "tasks": [{"id": "a", "action": "builtin.noop"}]}
        )
        assert status == 202
        assert stack.http.wait_workflow(accepted["workflow_id"])["status"] == "completed"
        # each service exports on its own schedule: wait for all three
        wait_until(lambda: {s for s, _ in received} >= SERVICES, 30, 0.5, what="spans over gRPC")
        assert ("provisioning-executor", "execute a") in received
    finally:
        stack.stop()
        server.stop(None)
