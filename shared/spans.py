"""Spans on the hot path, recorded without the SDK's per-span machinery.

A task's execution span is made once per task on every executor. Through the OpenTelemetry
SDK's tracer it costs ~40 µs of the executor's event loop (sampler, id generator, attribute
validation, a lock per change, the span processors, a copy into a ``ReadableSpan`` at its end)
before its export; :class:`LightSpan` records the same span in ~10 µs (docs/performance.md).
It keeps the span's data in plain fields, makes its context current as a non-recording span
(so ``traceparent`` injection and the SDK's own child spans see it as their parent) and, when
it ends, hands one ``ReadableSpan`` to the service's span processor: batching, the exporter
and its retries are the SDK's, unchanged.

It is used only where it gives the span the SDK would give: the default sampler (parent
based, always on), no span limits set, the SDK enabled (:func:`light_spans_apply`); otherwise
``shared.tracing.hot_span`` uses the SDK's tracer. Its attributes are set by this code
(ids, counts, names), never taken from a task.
"""

from __future__ import annotations

import logging
import os
import random
import time
import traceback
from collections import deque
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import Attributes, AttributeValue

__all__ = ["MAX_EVENTS", "LightSpan", "LightTracer", "light_spans_apply"]

log = logging.getLogger(__name__)
# the SDK's span limits: set, they could shorten what the SDK records but not a light span
_LIMITS = (
    "OTEL_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_SPAN_EVENT_COUNT_LIMIT",
    "OTEL_SPAN_LINK_COUNT_LIMIT",
)
# the SDK's default limit of events per span: a task's progress lines are events
MAX_EVENTS = 128


def light_spans_apply(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the SDK, as configured by ``environ``, makes the spans :class:`LightSpan` makes:
    the SDK enabled, the default sampler (``parentbased_always_on``), no span limits set."""
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler not in ("", "parentbased_always_on"):
        return False
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return not any(environ.get(name) for name in _LIMITS)


def _says_something(context: SpanContext, attributes: Attributes) -> bool:
    """The SDK's test of a link worth keeping: to a span, or with attributes or a state."""
    return bool(context.is_valid or attributes or context.trace_state)


class LightTracer:
    """Makes :class:`LightSpan` s for one instrumentation scope, ending into ``processor``."""

    def __init__(
        self, processor: SpanProcessor, resource: Resource, scope: InstrumentationScope
    ) -> None:
        self.processor = processor
        self.resource = resource
        self.scope = scope

    def start(
        self,
        name: str,
        parent: SpanContext,
        kind: SpanKind,
        attributes: dict[str, AttributeValue],
        *,
        links: Sequence[Link] = (),
        start_ns: int | None = None,
    ) -> LightSpan:
        """A span, child of ``parent`` (a new trace when it is not valid)."""
        return LightSpan(
            self,
            name,
            parent if parent.is_valid else None,
            kind,
            attributes,
            links=links,
            start_ns=start_ns,
        )


class LightSpan(trace.Span):
    """One span, recorded in plain fields; a context manager that makes it current.

    Like the SDK's ``start_as_current_span``: an exception leaving the ``with`` block is
    recorded as an ``exception`` event and sets the status to ERROR; the span ends on exit.
    A parent that is not sampled gives a span that is not recorded but still propagated."""

    def __init__(
        self,
        tracer: LightTracer,
        name: str,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, AttributeValue],
        *,
        links: Sequence[Link] = (),
        start_ns: int | None = None,
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._parent = parent
        self._kind = kind
        self._attributes: dict[str, AttributeValue] = dict(attributes)
        # as the SDK's default limit: the newest events kept
        self._events: deque[Event] = deque(maxlen=MAX_EVENTS)
        self._status = Status(StatusCode.UNSET)
        self._recording = parent is None or parent.trace_flags.sampled
        span_id = random.getrandbits(64) or 1
        trace_id = parent.trace_id if parent is not None else random.getrandbits(128) or 1
        flags = TraceFlags.SAMPLED if self._recording else TraceFlags.DEFAULT
        # the W3C level 2 flag, as the SDK sets it: a new trace id is random, a parent says
        if parent is None or parent.trace_flags.random_trace_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        self._context = SpanContext(
            trace_id,
            span_id,
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=parent.trace_state if parent is not None else None,
        )
        # as the SDK: a link to no span is kept only when it says something
        self._links = [link for link in links if _says_something(link.context, link.attributes)]
        self._start = start_ns or time.time_ns()
        self._end: int | None = None
        self._token: object | None = None

    # the context manager: current while the block runs, ended after it
    def __enter__(self) -> LightSpan:
        current = trace.set_span_in_context(trace.NonRecordingSpan(self._context))
        self._token = otel_context.attach(current)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None
        if isinstance(exc, Exception):  # as the SDK's use_span: not a cancellation or an exit
            self.record_exception(exc)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        self.end()

    # the API's Span
    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._recording and self._end is None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self.is_recording():
            self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if self.is_recording():
            self._attributes.update(attributes)

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self.is_recording():
            self._events.append(Event(name, attributes, timestamp or time.time_ns()))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if self.is_recording() and _says_something(context, attributes):
            self._links.append(Link(context, attributes))

    def update_name(self, name: str) -> None:
        if self.is_recording():
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if not self.is_recording():
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        # as the SDK: OK is final, and UNSET never replaces a status
        if self._status.status_code is StatusCode.OK or status.status_code is StatusCode.UNSET:
            return
        self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        kind = type(exception)
        module = kind.__module__
        fields: dict[str, Any] = {
            "exception.type": f"{module}.{kind.__qualname__}"
            if module and module != "builtins"
            else kind.__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        fields.update(attributes or {})
        self.add_event("exception", fields, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end is not None:
            return
        self._end = end_time or time.time_ns()
        if not self._recording:
            return
        tracer = self._tracer
        tracer.processor.on_end(
            ReadableSpan(
                name=self._name,
                context=self._context,
                parent=self._parent,
                resource=tracer.resource,
                attributes=self._attributes,
                events=tuple(self._events),
                links=tuple(self._links),
                kind=self._kind,
                status=self._status,
                start_time=self._start,
                end_time=self._end,
                instrumentation_scope=tracer.scope,
            )
        )
