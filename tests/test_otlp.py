"""The hand-written OTLP encoder (shared.otlp) against the SDK's, and its exporter against a real
OTLP/HTTP receiver: what it sends, what it retries, when it gives up."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from shared.otlp import OtlpHttpSpanExporter, encode_request, exporter_applies
from shared.spans import LightTracer
from testkit.otlp import Receiver
from testkit.processes import free_port

REMOTE = SpanContext(
    0x0AF7651916CD43DD8448EB211C80319C,
    0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(1),
    trace_state=TraceState([("vendor", "a1"), ("other", "b2")]),
)


def _spans() -> list[ReadableSpan]:
    """Spans of every shape the services make, and then some: every attribute type, events,
    links, statuses, remote and local parents, a trace state, two resources, three scopes."""
    memory = InMemorySpanExporter()
    processor = SimpleSpanProcessor(memory)
    providers = [
        TracerProvider(resource=Resource.create({"service.name": name, "n": 3, "ok": True}))
        for name in ("provisioning-executor", "provisioning-scheduler")
    ]
    for provider in providers:
        provider.add_span_processor(processor)
    executor = providers[0].get_tracer("provisioning.executor")
    versioned = providers[0].get_tracer(
        "lib", "1.2.3", schema_url="https://opentelemetry.io/schemas/1.21.0", attributes={"k": 1}
    )
    scheduler = providers[1].get_tracer("provisioning.scheduler")
    remote = set_span_in_context(NonRecordingSpan(REMOTE))
    with executor.start_as_current_span(
        "execute t1",
        context=remote,
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "nats",
            "task.attempt": 2,
            "negative": -7,
            "big": 2**62,
            "ratio": 0.25,
            "flag": False,
            "empty": "",
            "unicode": "héllo ☃",
            "strings": ("a", "b"),
            "ints": [1, -2, 3],
            "floats": (1.5, -0.0),
            "bools": (True, False),
            "nothing": (),
        },
    ) as span:
        span.add_event("progress", {"progress.percent": 40, "progress.message": "half"})
        span.add_event("bare")
        with executor.start_as_current_span("subprocess nu") as child:
            child.set_status(Status(StatusCode.ERROR, "exit 3"))
        span.set_status(StatusCode.OK)
    with versioned.start_as_current_span("versioned", kind=SpanKind.CLIENT):
        pass
    for kind in (SpanKind.INTERNAL, SpanKind.SERVER, SpanKind.PRODUCER):
        with scheduler.start_as_current_span(
            f"scheduler {kind.name}",
            kind=kind,
            links=[Link(REMOTE, {"link.n": 1}), Link(span.get_span_context())],
        ) as s:
            s.set_status(Status(StatusCode.ERROR, "boom"))
    # a resource equal to the executor's but another object: grouped with it, as by the SDK
    twin = TracerProvider(resource=Resource.create(dict(providers[0].resource.attributes)))
    twin.add_span_processor(processor)
    with twin.get_tracer("provisioning.executor").start_as_current_span("twin"):
        pass
    light = LightTracer(processor, providers[0].resource, InstrumentationScope("light", ""))
    with light.start("light", REMOTE, SpanKind.CONSUMER, {"task.id": "t2"}) as lspan:
        lspan.add_event("progress", {"progress.percent": 100})
    return list(memory.get_finished_spans())


def test_the_encoding_parses_as_the_sdks() -> None:
    spans = _spans()
    assert len(spans) == 8
    ours = ExportTraceServiceRequest.FromString(encode_request(spans))
    assert ours == encode_spans(spans)
    assert len(ours.resource_spans) == 2
    assert sum(len(r.scope_spans) for r in ours.resource_spans) == 4
    # and span by span, in case a batch holds one span alone
    for span in spans:
        assert ExportTraceServiceRequest.FromString(encode_request([span])) == encode_spans([span])


def test_an_attribute_that_cannot_be_encoded_is_left_out_as_the_sdk_does() -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("t").start_as_current_span("s") as span:
        span.set_attribute("fine", 1)
    (recorded,) = memory.get_finished_spans()
    odd = ReadableSpan(
        "s",
        recorded.context,
        resource=recorded.resource,
        attributes={"fine": 1, "huge": 2**64, "object": object()},  # type: ignore[dict-item]
    )
    request = ExportTraceServiceRequest.FromString(encode_request([odd]))
    (span,) = request.resource_spans[0].scope_spans[0].spans
    assert [a.key for a in span.attributes] == ["fine"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as receiver:
        yield receiver


def test_the_exporter_delivers_to_a_real_receiver(receiver: Receiver) -> None:
    exporter = OtlpHttpSpanExporter(f"{receiver.endpoint}/v1/traces", timeout_s=5)
    spans = _spans()
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    assert exporter.export(spans[:1]) is SpanExportResult.SUCCESS  # a new connection
    exporter.shutdown()
    received = receiver.spans
    # grouped by resource and scope, as the SDK's exporter groups them
    assert sorted(s["name"] for s in received) == sorted([s.name for s in spans] + [spans[0].name])
    light = next(s for s in received if s["name"] == "light")
    assert light["parent_id"] == f"{REMOTE.span_id:016x}"
    assert light["events"] == [{"name": "progress", "attributes": {"progress.percent": 100}}]
    assert exporter.export(spans) is SpanExportResult.FAILURE  # after shutdown
    assert receiver.posts == 2


def test_the_exporter_retries_what_otlp_says_to_retry(receiver: Receiver) -> None:
    receiver.refusals = [503, 429, 502]
    exporter = OtlpHttpSpanExporter(f"{receiver.endpoint}/v1/traces", timeout_s=10)
    assert exporter.export(_spans()[:2]) is SpanExportResult.SUCCESS
    assert receiver.posts == 4 and len(receiver.spans) == 2


def test_the_exporter_drops_what_the_collector_refuses_for_good(receiver: Receiver) -> None:
    receiver.refusals = [400]
    exporter = OtlpHttpSpanExporter(f"{receiver.endpoint}/v1/traces", timeout_s=10)
    assert exporter.export(_spans()[:2]) is SpanExportResult.FAILURE
    assert receiver.posts == 1 and receiver.spans == []


class _KeepAliveThenClose(BaseHTTPRequestHandler):
    """HTTP/1.1 that promises to keep the connection, then closes it after answering: what a
    collector's idle timeout does to a kept connection between two exports."""

    protocol_version = "HTTP/1.1"
    bodies: list[bytes] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.close_connection = True  # without saying so


def test_a_kept_connection_closed_while_idle_is_opened_again_at_once() -> None:
    _KeepAliveThenClose.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KeepAliveThenClose)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        exporter = OtlpHttpSpanExporter(f"http://127.0.0.1:{port}/v1/traces", timeout_s=10)
        backoffs: list[float] = []
        wait = exporter._stopped.wait
        exporter._stopped.wait = lambda s: backoffs.append(s) or wait(s)  # type: ignore[method-assign]
        assert exporter.export(_spans()[:1]) is SpanExportResult.SUCCESS
        assert exporter.export(_spans()[:2]) is SpanExportResult.SUCCESS  # on a closed one
        assert len(_KeepAliveThenClose.bodies) == 2 and backoffs == []
    finally:
        server.shutdown()
        server.server_close()


def test_the_exporter_gives_up_within_its_timeout() -> None:
    exporter = OtlpHttpSpanExporter(f"http://127.0.0.1:{free_port()}/v1/traces", timeout_s=1.5)
    t0 = time.monotonic()
    assert exporter.export(_spans()[:1]) is SpanExportResult.FAILURE
    assert time.monotonic() - t0 < 3


def test_shutdown_ends_a_retrying_export(receiver: Receiver) -> None:
    receiver.refusals = [503] * 100
    exporter = OtlpHttpSpanExporter(f"{receiver.endpoint}/v1/traces", timeout_s=60)
    results: list[SpanExportResult] = []
    worker = threading.Thread(target=lambda: results.append(exporter.export(_spans()[:1])))
    worker.start()
    while receiver.posts < 2:  # retrying
        time.sleep(0.01)
    t0 = time.monotonic()
    exporter.shutdown()
    worker.join(10)
    assert results == [SpanExportResult.FAILURE]
    assert time.monotonic() - t0 < 5


def test_an_endpoint_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="not an http"):
        OtlpHttpSpanExporter("localhost:4318")


@pytest.mark.parametrize(
    ("environ", "applies"),
    [
        ({}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "5000"}, True),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "api-key=secret"}, False),
        ({"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "api-key=secret"}, False),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}, False),
        ({"OTEL_EXPORTER_OTLP_CERTIFICATE": "/etc/ca.pem"}, False),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://other:4318/v1/traces"}, False),
        ({"OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER": "x"}, False),
        ({"OTEL_EXPORTER_OTLP_HEADERS": ""}, True),
    ],
)
def test_the_sdks_exporter_takes_every_setting_this_one_does_not_know(
    environ: dict[str, str], applies: bool
) -> None:
    assert exporter_applies(environ) is applies
