"""OpenTelemetry set-up and W3C trace-context propagation through NATS headers.

Each service calls :func:`setup_tracing` once. With tracing disabled (or no exporter) the API's
no-op tracer is used, which costs next to nothing. ``traceparent`` travels in NATS headers and
reaches task subprocesses as ``TRACEPARENT``.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import AttributeValue

from . import __version__
from .config import TracingConfig
from .metrics import setup_metrics, shutdown_metrics
from .otlp import OtlpHttpSpanExporter, exporter_applies
from .spans import LightTracer, light_spans_apply

__all__ = [
    "context_from",
    "current_traceparent",
    "headers_with_context",
    "hot_span",
    "message_span",
    "resource_for",
    "setup_tracing",
    "shutdown_tracing",
    "span_context_of",
    "trace_id_hex",
    "tracing_enabled",
]

log = logging.getLogger(__name__)
INSTANCE_ID = uuid.uuid4().hex[:12]
_provider: TracerProvider | None = None
# where light spans end (the provider's batch processor) and what they say of the service;
# None: the SDK's tracer makes every span (see shared.spans)
_light: tuple[SpanProcessor, Resource] | None = None
_light_tracers: dict[str, LightTracer] = {}
_sdk_tracers: dict[str, trace.Tracer] = {}


def _exporter(config: TracingConfig) -> SpanExporter | None:
    if config.exporter == "none":
        return None
    if config.exporter == "console":
        return ConsoleSpanExporter()
    if config.exporter == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(endpoint=config.endpoint or None)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    endpoint = config.endpoint.rstrip("/")
    if endpoint and not endpoint.endswith("/v1/traces"):
        endpoint += "/v1/traces"
    if endpoint and exporter_applies():
        return OtlpHttpSpanExporter(endpoint)
    return OTLPSpanExporter(endpoint=endpoint or None)


def resource_for(service: str) -> Resource:
    """Resource attributes: ``service.name`` (``$OTEL_SERVICE_NAME`` wins), version, instance."""
    return Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME", service),
            "service.version": __version__,
            "service.instance.id": f"{socket.gethostname()}-{os.getpid()}-{INSTANCE_ID}",
        }
    )


def setup_tracing(service: str, config: TracingConfig) -> None:
    """Install the tracer and meter providers for ``service`` (e.g. ``provisioning-gateway``)."""
    global _provider, _light
    if not config.enabled:
        return
    exporter = _exporter(config)
    resource = resource_for(service)
    setup_metrics(resource, config)
    provider = TracerProvider(resource=resource)
    processor = SpanProcessor()  # without an exporter, spans still get ids (trace_id in the API)
    if exporter is not None:
        processor = BatchSpanProcessor(exporter, schedule_delay_millis=500)
        provider.add_span_processor(processor)
        log.info("tracing to %s (%s)", config.endpoint or "default endpoint", config.exporter)
    trace.set_tracer_provider(provider)
    _provider = provider
    _light = (processor, provider.resource) if light_spans_apply() else None
    _light_tracers.clear()


def tracing_enabled() -> bool:
    """Whether this process records spans: without, code that only builds spans can skip it."""
    return _provider is not None


def span_context_of(headers: Mapping[str, str] | None) -> trace.SpanContext:
    """The span a message's trace context names (for a link to it); invalid without one."""
    return trace.get_current_span(context_from(headers)).get_span_context()


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.shutdown()
    shutdown_metrics()


def headers_with_context(
    headers: dict[str, str] | None = None, context: Context | None = None
) -> dict[str, str]:
    """A copy of ``headers`` with the current (or given) trace context injected."""
    carrier = dict(headers or {})
    propagate.inject(carrier, context=context)
    return carrier


def context_from(headers: Mapping[str, str] | None) -> Context:
    return propagate.extract({k.lower(): v for k, v in (headers or {}).items()})


def message_span(
    tracer: trace.Tracer,
    name: str,
    subject: str,
    *,
    kind: SpanKind,
    attributes: Mapping[str, AttributeValue],
    headers: Mapping[str, str] | None = None,
    context: Context | None = None,
    links: Sequence[trace.Link] = (),
    start_time: int | None = None,
) -> AbstractContextManager[trace.Span]:
    """A span for one NATS message, after the messaging semantic conventions: PRODUCER for a
    publish, CONSUMER for processing. A CONSUMER span continues the trace in ``headers``."""
    if headers is not None:
        context = context_from(headers)
    return tracer.start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes=_messaging(subject, kind, attributes),
        links=links,
        start_time=start_time,
    )


def _messaging(
    subject: str, kind: SpanKind, attributes: Mapping[str, AttributeValue]
) -> dict[str, AttributeValue]:
    return {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.type": "publish" if kind == SpanKind.PRODUCER else "process",
        **attributes,
    }


def hot_span(
    scope: str,
    name: str,
    subject: str,
    *,
    kind: SpanKind,
    attributes: Mapping[str, AttributeValue],
    headers: Mapping[str, str] | None,
    links: Sequence[trace.Link] = (),
    start_ns: int | None = None,
) -> AbstractContextManager[trace.Span]:
    """:func:`message_span` on a hot path (a task's execution, a scheduler step's dispatches
    and reports): the same span, recorded as a :class:`shared.spans.LightSpan` where that
    makes the span the SDK would (the default sampler, no span limits), by the SDK's tracer
    ``scope`` otherwise. ``headers`` carry the parent (none: a new trace)."""
    if _light is None:
        tracer = _sdk_tracers.get(scope)
        if tracer is None:  # a proxy: it follows the provider set later, if any
            tracer = _sdk_tracers[scope] = trace.get_tracer(scope)
        return message_span(
            tracer,
            name,
            subject,
            kind=kind,
            attributes=attributes,
            headers=headers or {},  # none: a new trace, not the current one
            links=links,
            start_time=start_ns,
        )
    light = _light_tracers.get(scope)
    if light is None:
        light = _light_tracers[scope] = LightTracer(*_light, InstrumentationScope(scope, ""))
    return light.start(
        name,
        span_context_of(headers),
        kind,
        _messaging(subject, kind, attributes),
        links=links,
        start_ns=start_ns,
    )


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span (what the contract carries in reports and
    hands to a task as ``TRACEPARENT``), formatted directly: the propagator's ``inject``
    costs ~5 µs, twice per task. None outside a span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def trace_id_hex(span: trace.Span | None = None) -> str | None:
    ctx = (span or trace.get_current_span()).get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None
