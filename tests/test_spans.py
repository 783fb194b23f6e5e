"""Light spans (shared.spans) against the SDK's own: the same span for the same inputs, the same
context for what runs inside, the same handling of sampling and exceptions. In-process: an SDK
provider of the test's own (not the global one) with an in-memory exporter."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from shared import tracing
from shared.spans import MAX_EVENTS, LightSpan, LightTracer, light_spans_apply

SCOPE = "provisioning.executor"
ATTRIBUTES = {"workflow.id": "wf1", "task.id": "t1", "task.attempt": 2, "task.delivery": 1}


class Pair:
    """The SDK's tracer and a light tracer, both ending into one in-memory exporter."""

    def __init__(self) -> None:
        self.memory = InMemorySpanExporter()
        processor = SimpleSpanProcessor(self.memory)
        self.provider = TracerProvider(resource=Resource.create({"service.name": "test"}))
        self.provider.add_span_processor(processor)
        self.sdk = self.provider.get_tracer(SCOPE)
        self.light = LightTracer(processor, self.provider.resource, InstrumentationScope(SCOPE, ""))

    def spans(self) -> list[ReadableSpan]:
        return list(self.memory.get_finished_spans())

    def parent_headers(self, sampled: bool = True) -> dict[str, str]:
        with self.sdk.start_as_current_span("dispatch", kind=SpanKind.PRODUCER):
            headers = tracing.headers_with_context({"Nats-Msg-Id": "x"})
        if not sampled:
            headers["traceparent"] = headers["traceparent"][:-2] + "00"
        return headers

    def light_span(self, headers: dict[str, str] | None) -> LightSpan:
        return self.light.start(
            "execute t1",
            tracing.span_context_of(headers),
            SpanKind.CONSUMER,
            {"messaging.system": "nats", **ATTRIBUTES},
        )


@pytest.fixture
def pair() -> Iterator[Pair]:
    pair = Pair()
    yield pair
    pair.provider.shutdown()


def _fields(span: ReadableSpan) -> dict[str, Any]:
    """What a span says, but for its own id and times."""
    return {
        "name": span.name,
        "kind": span.kind,
        "trace_id": span.context.trace_id,
        "flags": span.context.trace_flags,
        "parent": span.parent.span_id if span.parent else None,
        "parent_remote": span.parent.is_remote if span.parent else None,
        "attributes": dict(span.attributes or {}),
        "events": [(e.name, dict(e.attributes or {})) for e in span.events],
        "status": (span.status.status_code, span.status.description),
        "resource": span.resource.attributes,
        "scope": span.instrumentation_scope,
        "links": [(link.context, dict(link.attributes or {})) for link in span.links],
        "start": span.start_time,
    }


def test_a_light_span_is_the_span_the_sdk_makes(pair: Pair) -> None:
    headers = pair.parent_headers()
    linked = tracing.span_context_of(pair.parent_headers())
    attributes = {
        "messaging.system": "nats",
        "messaging.destination.name": "prov.dispatch",
        "messaging.operation.type": "process",
        **ATTRIBUTES,
    }

    def use(span: trace.Span) -> None:
        span.add_event("progress", {"progress.percent": 40})
        span.set_attribute("task.outcome", "failed")
        span.set_status(Status(StatusCode.ERROR, "boom"))

    with pair.sdk.start_as_current_span(
        "execute t1",
        context=tracing.context_from(headers),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        links=[Link(linked)],
        start_time=1_000,
    ) as span:
        use(span)
    with pair.light.start(
        "execute t1",
        tracing.span_context_of(headers),
        SpanKind.CONSUMER,
        attributes,
        links=[Link(linked)],
        start_ns=1_000,
    ) as light:
        use(light)
    _, _, sdk_span, light_span = pair.spans()
    assert _fields(light_span) == _fields(sdk_span)
    assert light_span.context.span_id not in (0, sdk_span.context.span_id)
    assert light_span.start_time == 1_000 and light_span.end_time
    assert light_span.start_time <= light_span.end_time
    assert [link.context for link in light_span.links] == [linked]
    # and the exporter encodes it as it encodes the SDK's (one resource, one scope)
    request = encode_spans([sdk_span, light_span])
    (resource_spans,) = request.resource_spans
    (scope_spans,) = resource_spans.scope_spans
    assert [s.name for s in scope_spans.spans] == ["execute t1", "execute t1"]
    assert scope_spans.spans[1].parent_span_id == scope_spans.spans[0].parent_span_id


def test_what_runs_inside_sees_the_light_span_as_its_parent(pair: Pair) -> None:
    headers = pair.parent_headers()
    before = trace.get_current_span()
    with pair.light_span(headers) as light:
        ctx = light.get_span_context()
        assert trace.get_current_span().get_span_context() == ctx
        assert tracing.current_traceparent() == (
            f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
        )
        assert tracing.headers_with_context()["traceparent"] == tracing.current_traceparent()
        with pair.sdk.start_as_current_span("subprocess nu"):
            pass
    assert trace.get_current_span() is before
    _, child, recorded = pair.spans()
    assert child.parent is not None and child.parent.span_id == recorded.context.span_id
    assert child.context.trace_id == recorded.context.trace_id


def test_a_parent_not_sampled_gives_a_span_not_recorded_but_propagated(pair: Pair) -> None:
    headers = pair.parent_headers(sampled=False)
    with pair.light_span(headers) as light:
        assert not light.is_recording()
        light.set_attribute("task.outcome", "completed")
        traceparent = tracing.current_traceparent()
    assert traceparent is not None and not int(traceparent[-2:], 16) & 1
    assert traceparent.split("-")[1] == headers["traceparent"].split("-")[1]
    assert [s.name for s in pair.spans()] == ["dispatch"]  # only the parent, by the SDK


def test_without_a_parent_a_new_trace(pair: Pair) -> None:
    with pair.light_span(None) as light:
        assert light.is_recording()
    (span,) = pair.spans()
    assert span.parent is None and span.context.trace_id != 0
    assert span.context.trace_flags.sampled
    with pair.light_span({"traceparent": "00-not-a-traceparent-01"}):
        pass
    assert pair.spans()[1].parent is None


def test_an_exception_is_recorded_and_sets_the_status(pair: Pair) -> None:
    with pytest.raises(ValueError, match="bad input"), pair.light_span(None):
        raise ValueError("bad input")
    (span,) = pair.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ValueError: bad input"
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"
    assert "bad input" in str(event.attributes["exception.stacktrace"])


def test_a_cancellation_ends_the_span_without_an_error(pair: Pair) -> None:
    with pytest.raises(asyncio.CancelledError), pair.light_span(None):
        raise asyncio.CancelledError
    (span,) = pair.spans()
    assert span.status.status_code is StatusCode.UNSET and not span.events


def test_status_and_end_follow_the_sdk(pair: Pair) -> None:
    with pair.light_span(None) as light:
        light.set_status(StatusCode.OK)
        light.set_status(Status(StatusCode.ERROR, "late"))  # OK is final
        light.set_status(StatusCode.UNSET)
        light.update_name("renamed")
        light.add_link(trace.INVALID_SPAN_CONTEXT)  # no link, as with the SDK
        light.add_link(light.get_span_context(), {"why": "test"})
    light.end()  # twice: once exported
    light.set_attribute("after", "end")
    (span,) = pair.spans()
    assert span.name == "renamed" and span.status.status_code is StatusCode.OK
    assert [dict(link.attributes or {}) for link in span.links] == [{"why": "test"}]
    assert "after" not in (span.attributes or {})


def test_a_chatty_task_keeps_the_newest_events_as_the_sdk_does(pair: Pair) -> None:
    for tracer in ("sdk", "light"):
        with (
            pair.sdk.start_as_current_span("execute t1")
            if tracer == "sdk"
            else pair.light_span(None)
        ) as span:
            for percent in range(MAX_EVENTS + 50):
                span.add_event("progress", {"progress.percent": percent})
    sdk_span, light_span = pair.spans()
    kept = [e.attributes["progress.percent"] for e in light_span.events if e.attributes]
    assert kept == list(range(50, MAX_EVENTS + 50))
    assert [e.attributes for e in sdk_span.events] == [e.attributes for e in light_span.events]


@pytest.mark.parametrize(
    ("environ", "applies"),
    [
        ({}, True),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}, True),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}, False),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, False),
        ({"OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "16"}, False),
        ({"OTEL_ATTRIBUTE_COUNT_LIMIT": "4"}, False),
        ({"OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_SDK_DISABLED": "false"}, True),
        ({"OTEL_SPAN_EVENT_COUNT_LIMIT": "1000"}, False),
    ],
)
def test_light_spans_only_where_the_sdk_would_make_the_same(
    environ: dict[str, str], applies: bool
) -> None:
    assert light_spans_apply(environ) is applies


def test_hot_span_falls_back_to_the_sdk(monkeypatch: pytest.MonkeyPatch, pair: Pair) -> None:
    kind = SpanKind.CONSUMER
    monkeypatch.setattr(tracing, "_light", None)
    with tracing.hot_span(SCOPE, "execute t1", "s", kind=kind, attributes={}, headers=None) as span:
        assert not isinstance(span, LightSpan)
    monkeypatch.setattr(tracing, "_light", (pair.light.processor, pair.light.resource))
    monkeypatch.setattr(tracing, "_light_tracers", {})
    with tracing.hot_span(SCOPE, "execute t1", "s", kind=kind, attributes={}, headers=None) as span:
        assert isinstance(span, LightSpan)
    (recorded,) = pair.spans()
    assert recorded.instrumentation_scope == InstrumentationScope(SCOPE, "")
    assert dict(recorded.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.destination.name": "s",
        "messaging.operation.type": "process",
    }
