"""An OTLP/HTTP receiver for tests: real HTTP, real protobuf payloads, decoded and kept.

Trace exports are kept as received and decoded when :attr:`Receiver.spans` is read, not while
the services export: the benchmark's traced run shares its two cores with this receiver, and
decoding every span into a dict in Python as it arrived was the receiver's work, not the
system's (docs/performance.md). A real collector decodes in its own process."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _decode_spans(body: bytes) -> list[dict[str, Any]]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    {
                        "service": resource.get("service.name"),
                        "resource": resource,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_id": span.parent_span_id.hex() or None,
                        "name": span.name,
                        "kind": span.kind,
                        "attributes": {a.key: _value(a.value) for a in span.attributes},
                        "events": [
                            {
                                "name": e.name,
                                "attributes": {a.key: _value(a.value) for a in e.attributes},
                            }
                            for e in span.events
                        ],
                        "links": [link.span_id.hex() for link in span.links],
                        "status": span.status.code,
                        "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano,
                    }
                )
    return spans


class Receiver:
    """Collects spans (as dicts) and metric names from every service that exports to it."""

    def __init__(self) -> None:
        self._spans: list[dict[str, Any]] = []
        self._decoded = 0  # exports of raw_traces decoded into _spans
        self.raw_traces: list[bytes] = []  # every export as received (decompressed)
        self.metrics: dict[str, set[str]] = {}
        self.refusals: list[int] = []  # HTTP statuses to answer the next exports with
        self.posts = 0  # exports received, refused ones included
        self.lock = threading.RLock()  # held by tests around reads of spans
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    receiver.posts += 1
                    refusal = receiver.refusals.pop(0) if receiver.refusals else None
                if refusal is not None:
                    self.send_response(refusal)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    receiver._traces(body)
                    reply = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    receiver._metrics(body)
                    reply = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _traces(self, body: bytes) -> None:
        with self.lock:
            self.raw_traces.append(body)

    @property
    def spans(self) -> list[dict[str, Any]]:
        """Every span received so far, as dicts (a copy)."""
        with self.lock:
            for body in self.raw_traces[self._decoded :]:
                self._spans.extend(_decode_spans(body))
            self._decoded = len(self.raw_traces)
            return list(self._spans)

    def _metrics(self, body: bytes) -> None:
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        with self.lock:
            for resource_metrics in request.resource_metrics:
                service = next(
                    (
                        _value(a.value)
                        for a in resource_metrics.resource.attributes
                        if a.key == "service.name"
                    ),
                    "?",
                )
                for scope in resource_metrics.scope_metrics:
                    for metric in scope.metrics:
                        self.metrics.setdefault(metric.name, set()).add(str(service))

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["trace_id"] == trace_id]

    def jaeger_document(self, trace_id: str) -> dict[str, Any]:
        """The trace in the shape of Jaeger's query API (``GET /api/traces/{id}``)."""
        spans = self.trace(trace_id)
        services = sorted({str(s["service"]) for s in spans})
        pid = {name: f"p{i}" for i, name in enumerate(services)}
        return {
            "data": [
                {
                    "traceID": trace_id,
                    "processes": {pid[name]: {"serviceName": name} for name in services},
                    "spans": [
                        {
                            "traceID": trace_id,
                            "spanID": s["span_id"],
                            "operationName": s["name"],
                            "references": [{"refType": "CHILD_OF", "spanID": s["parent_id"]}]
                            if s["parent_id"]
                            else [],
                            "startTime": s["start"] // 1000,
                            "duration": (s["end"] - s["start"]) // 1000,
                            "processID": pid[str(s["service"])],
                        }
                        for s in spans
                    ],
                }
            ]
        }

    def serve_jaeger_api(self) -> tuple[str, Callable[[], None]]:
        """A stand-in for Jaeger's query API serving what this receiver got; (url, stop)."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                trace_id = self.path.rsplit("/", 1)[-1]
                body = json.dumps(receiver.jaeger_document(trace_id)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()

        def stop() -> None:
            server.shutdown()
            server.server_close()

        return f"http://127.0.0.1:{server.server_address[1]}", stop
