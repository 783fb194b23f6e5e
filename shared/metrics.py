"""OpenTelemetry metrics for operators, exported over OTLP like the traces.

Instruments (all prefixed ``provisioning.``):

- ``tasks`` (counter, by ``status``, ``pool``): task transitions, as the scheduler records them;
- ``task.retries`` (counter, by ``pool``): attempts scheduled again after a failure;
- ``task.dispatch_latency`` (histogram, s): from ``queued`` to ``running``;
- ``task.duration`` (histogram, s, by ``action``, ``outcome``): one attempt on an executor;
- ``dead_letters`` (counter, by ``source``): messages copied to the dead-letter stream (the bus);
- ``queue.depth`` (gauge, by ``pool``, ``state`` = ready|in_flight): the scheduler's backlog;
- ``executor.slots_in_use`` / ``executor.slots`` (gauges): per executor.

Without an exporter the API's no-op meter is used: instruments cost next to nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from .config import TracingConfig

__all__ = ["Metrics", "setup_metrics", "shutdown_metrics"]

log = logging.getLogger(__name__)
_provider: MeterProvider | None = None
Gauge = Callable[[], Iterable[tuple[float, dict[str, str]]]]


def _exporter(config: TracingConfig) -> MetricExporter | None:
    if config.exporter == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        return GrpcExporter(endpoint=config.endpoint or None)
    if config.exporter == "otlp-http":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        endpoint = config.endpoint.rstrip("/")
        if endpoint and not endpoint.endswith("/v1/metrics"):
            endpoint += "/v1/metrics"
        return OTLPMetricExporter(endpoint=endpoint or None)
    return None


def setup_metrics(resource: Resource, config: TracingConfig, *, interval_s: float = 10.0) -> None:
    """Install a meter provider exporting every ``interval_s`` when an OTLP exporter is set."""
    global _provider
    exporter = _exporter(config) if config.enabled else None
    if exporter is None:
        return
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=interval_s * 1000)
    _provider = MeterProvider(resource=resource, metric_readers=[reader])
    metrics.set_meter_provider(_provider)


def shutdown_metrics() -> None:
    if _provider is not None:
        _provider.shutdown()


class Metrics:
    """The instruments of one service. Create it after :func:`setup_metrics`."""

    def __init__(self, service: str) -> None:
        meter = metrics.get_meter(f"provisioning.{service}")
        self._meter = meter
        self.tasks = meter.create_counter(
            "provisioning.tasks", unit="{transition}", description="Task transitions by status"
        )
        self.retries = meter.create_counter(
            "provisioning.task.retries", unit="{retry}", description="Attempts scheduled again"
        )
        self.dispatch_latency = meter.create_histogram(
            "provisioning.task.dispatch_latency", unit="s", description="Queued to running"
        )
        self.task_duration = meter.create_histogram(
            "provisioning.task.duration", unit="s", description="One attempt on an executor"
        )

    def gauge(self, name: str, description: str, read: Gauge, unit: str = "1") -> None:
        """Register an observable gauge whose values come from ``read()`` at export time."""

        def callback(_: CallbackOptions) -> Iterable[Observation]:
            try:
                return [Observation(value, attributes) for value, attributes in read()]
            except Exception:  # a metric must never break the service
                log.debug("gauge %s failed", name, exc_info=True)
                return []

        self._meter.create_observable_gauge(name, [callback], unit=unit, description=description)
