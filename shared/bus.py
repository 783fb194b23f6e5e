"""The message bus: one NATS connection with JetStream, streams and buckets bootstrapped here.

Everything the services share lives in JetStream: work queues (commands, dispatch, reports),
histories (events, logs, dead letters) and key-value buckets (checkpoints, progress, heartbeats).
:meth:`Bus.bootstrap` creates them idempotently; every service calls it at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from opentelemetry import metrics
from opentelemetry.metrics import Counter

from . import subjects
from .config import NatsConfig
from .errors import BusUnavailable, QueueFull

__all__ = ["Bus", "KVBuckets"]

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 120.0
CONSUMER_ACK_WAIT_S = 60.0
LEASE_TTL_S = 6.0  # a scheduler lease not renewed for this long expires (standby takes over)
_RETRYABLE = (
    nats.js.errors.NoStreamResponseError,
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
    nats.js.errors.ServiceUnavailableError,
)


class KVBuckets:
    """Handles on the key-value buckets, bound after bootstrap."""

    workflows: KeyValue
    tasks: KeyValue
    active: KeyValue
    progress: KeyValue
    executors: KeyValue
    leases: KeyValue


class Bus:
    """A NATS connection with JetStream, as an async context manager.

    >>> async with Bus(config.nats, name="gateway") as bus:
    ...     await bus.bootstrap()
    """

    def __init__(self, config: NatsConfig, *, name: str) -> None:
        self.config = config
        self.name = name
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self.kv = KVBuckets()
        self._drained = False
        self.ready = False  # connected and bootstrapped (set by the service)
        self._dead_letters: Counter | None = None

    # -- connection -------------------------------------------------------------------------

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise BusUnavailable("not connected to NATS")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BusUnavailable("not connected to NATS")
        return self._js

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def _options(self) -> dict[str, Any]:
        cfg = self.config
        opts: dict[str, Any] = {
            "servers": [u.strip() for u in cfg.url.split(",") if u.strip()],
            "name": self.name,
            "connect_timeout": cfg.connect_timeout_seconds,
            "reconnect_time_wait": 1,
            "max_reconnect_attempts": 1,
            "ping_interval": 10,
            "max_outstanding_pings": 3,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if cfg.user:
            opts["user"], opts["password"] = cfg.user, cfg.password
        if cfg.token:
            opts["token"] = cfg.token
        if cfg.creds_file:
            opts["user_credentials"] = cfg.creds_file
        if cfg.tls_ca_file:
            opts["tls"] = ssl.create_default_context(cafile=cfg.tls_ca_file)
        return opts

    async def connect(self, *, retry_for_s: float | None = None) -> None:
        """Connect, retrying with backoff; ``retry_for_s=None`` waits for NATS forever."""
        loop = asyncio.get_running_loop()
        deadline = None if retry_for_s is None else loop.time() + retry_for_s
        delay = 0.2
        while True:
            try:
                nc = await nats.connect(**self._options())
                break
            except (nats.errors.NoServersError, OSError, nats.errors.Error) as exc:
                if deadline is not None and loop.time() + delay > deadline:
                    raise BusUnavailable(
                        f"cannot reach NATS at {self.config.url}: {exc}", url=self.config.url
                    ) from None
                log.warning("NATS at %s not reachable (%s); retrying", self.config.url, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        # Once connected, reconnect forever: services ride out NATS restarts.
        nc.options["max_reconnect_attempts"] = -1
        self._nc = nc
        self._js = nc.jetstream(timeout=5)
        log.info(
            "connected to NATS at %s as %s",
            nc.connected_url.netloc if nc.connected_url else "?",
            self.name,
        )

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS: %s", exc or type(exc).__name__)

    async def _on_disconnected(self) -> None:
        if not self._drained:
            log.warning("disconnected from NATS")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS")

    async def healthy(self, timeout_s: float = 2.0) -> tuple[bool, str]:
        """Whether NATS and JetStream answer now, with a reason when not."""
        if not self.connected:
            return False, "not connected to NATS"
        try:
            await asyncio.wait_for(self.js.account_info(), timeout_s)
        except (TimeoutError, nats.errors.Error) as exc:
            return False, f"JetStream not answering: {exc or type(exc).__name__}"
        return True, "ok"

    async def drain(self) -> None:
        """Flush and close; idempotent."""
        if self._nc is None or self._drained:
            return
        self._drained = True
        try:
            if self._nc.is_connected:
                await asyncio.wait_for(self._nc.drain(), 10)
            else:
                await self._nc.close()
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            log.warning("NATS drain incomplete: %s", exc or type(exc).__name__)
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._nc.close()

    async def __aenter__(self) -> Bus:
        if self._nc is None:
            await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.drain()

    # -- bootstrap --------------------------------------------------------------------------

    def _streams(self) -> list[StreamConfig]:
        cfg = self.config
        common: dict[str, Any] = {"storage": StorageType.FILE, "num_replicas": cfg.replicas}
        queue: dict[str, Any] = {
            **common,
            "retention": RetentionPolicy.WORK_QUEUE,
            "discard": DiscardPolicy.NEW,
            "max_msgs": cfg.queue_max_messages,
            "duplicate_window": DUPLICATE_WINDOW_S,
        }
        history: dict[str, Any] = {
            **common,
            "retention": RetentionPolicy.LIMITS,
            "discard": DiscardPolicy.OLD,
            "max_age": cfg.events_max_age_seconds,
        }
        return [
            StreamConfig(name=subjects.STREAM_COMMANDS, subjects=["prov.cmd.>"], **queue),
            StreamConfig(name=subjects.STREAM_DISPATCH, subjects=["prov.dispatch.>"], **queue),
            StreamConfig(name=subjects.STREAM_REPORTS, subjects=["prov.report.>"], **queue),
            StreamConfig(
                name=subjects.STREAM_EVENTS,
                subjects=["prov.evt.>"],
                max_bytes=cfg.logs_max_bytes,
                duplicate_window=DUPLICATE_WINDOW_S,
                **history,
            ),
            StreamConfig(
                name=subjects.STREAM_LOGS,
                subjects=["prov.log.>"],
                max_bytes=cfg.logs_max_bytes,
                **history,
            ),
            StreamConfig(
                name=subjects.STREAM_DLQ,
                subjects=["prov.dlq.>"],
                max_bytes=cfg.logs_max_bytes,
                **history,
            ),
        ]

    def _buckets(self) -> list[tuple[str, str, KeyValueConfig]]:
        cfg = self.config
        common: dict[str, Any] = {"storage": StorageType.FILE, "replicas": cfg.replicas}
        return [
            (
                "workflows",
                subjects.BUCKET_WORKFLOWS,
                KeyValueConfig(bucket=subjects.BUCKET_WORKFLOWS, history=1, **common),
            ),
            (
                "tasks",
                subjects.BUCKET_TASKS,
                KeyValueConfig(bucket=subjects.BUCKET_TASKS, history=1, **common),
            ),
            (
                "active",
                subjects.BUCKET_ACTIVE,
                KeyValueConfig(bucket=subjects.BUCKET_ACTIVE, history=1, **common),
            ),
            (
                "progress",
                subjects.BUCKET_PROGRESS,
                KeyValueConfig(
                    bucket=subjects.BUCKET_PROGRESS,
                    history=1,
                    ttl=cfg.events_max_age_seconds,
                    **common,
                ),
            ),
            (
                "executors",
                subjects.BUCKET_EXECUTORS,
                KeyValueConfig(bucket=subjects.BUCKET_EXECUTORS, history=1, ttl=60.0, **common),
            ),
            (
                "leases",
                subjects.BUCKET_LEASES,
                KeyValueConfig(bucket=subjects.BUCKET_LEASES, history=1, ttl=LEASE_TTL_S, **common),
            ),
        ]

    async def bootstrap(self) -> None:
        """Create streams, the scheduler's consumers and the KV buckets; safe to run anywhere."""
        jsm = self.js
        for stream in self._streams():
            try:
                await jsm.add_stream(stream)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:  # stream name already in use with a different config
                    raise
                await jsm.update_stream(stream)
                log.info("updated stream %s to the current configuration", stream.name)
        for durable, stream_name in (
            (subjects.CONSUMER_COMMANDS, subjects.STREAM_COMMANDS),
            (subjects.CONSUMER_REPORTS, subjects.STREAM_REPORTS),
        ):
            await self._ensure_consumer(
                stream_name,
                ConsumerConfig(
                    durable_name=durable,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=CONSUMER_ACK_WAIT_S,
                    max_deliver=-1,
                    max_ack_pending=10_000,
                ),
            )
        for attr, bucket, kv_config in self._buckets():
            try:
                kv = await jsm.create_key_value(kv_config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:
                    raise
                await self._update_bucket(kv_config)
                kv = await jsm.key_value(bucket)
            setattr(self.kv, attr, kv)

    async def _update_bucket(self, config: KeyValueConfig) -> None:
        """Apply what may change on a live bucket (replicas, TTL) to its backing stream."""
        info = await self.js.stream_info(f"KV_{config.bucket}")
        current = info.config
        wanted_age = config.ttl or current.max_age
        if current.num_replicas == config.replicas and current.max_age == wanted_age:
            log.warning("bucket %s exists with another configuration; using it", config.bucket)
            return
        current.num_replicas = config.replicas
        current.max_age = wanted_age
        await self.js.update_stream(current)
        log.info("updated bucket %s: replicas=%d", config.bucket, config.replicas)

    async def _ensure_consumer(self, stream: str, config: ConsumerConfig) -> None:
        """Create a durable consumer unless it exists (never silently reconfigure a live one)."""
        assert config.durable_name
        try:
            await self.js.consumer_info(stream, config.durable_name)
        except nats.js.errors.NotFoundError:
            await self.js.add_consumer(stream, config)

    async def ensure_pool_consumer(self, pool: str, ack_wait_s: float) -> str:
        """The shared durable consumer of one executor pool; returns its name."""
        durable = subjects.executor_consumer(pool)
        await self._ensure_consumer(
            subjects.STREAM_DISPATCH,
            ConsumerConfig(
                durable_name=durable,
                filter_subject=subjects.dispatch_filter(pool),
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ack_wait_s,
                max_deliver=-1,
                max_ack_pending=100_000,
            ),
        )
        return durable

    # -- publishing -------------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = 5.0,
        attempts: int = 6,
    ) -> PubAck:
        """Publish to a stream and wait for its ack, retrying transient failures.

        A retry reuses ``msg_id`` (``Nats-Msg-Id``), so it can never duplicate the message.
        """
        hdrs = dict(headers or {})
        if msg_id:
            hdrs["Nats-Msg-Id"] = msg_id
        delay = 0.1
        for attempt in range(1, attempts + 1):
            try:
                return await self.js.publish(
                    subject, data, timeout=timeout_s, headers=dict(hdrs) if hdrs else None
                )
            except nats.js.errors.APIError as exc:
                if exc.err_code in (10077, 10078, 10047):  # max msgs / bytes / resources
                    raise QueueFull(f"queue full: {exc.description}", subject=subject) from None
                if attempt == attempts or not isinstance(exc, _RETRYABLE):
                    raise BusUnavailable(f"publish to {subject} failed: {exc}") from None
            except _RETRYABLE as exc:
                if attempt == attempts:
                    raise BusUnavailable(f"publish to {subject} failed: {exc!r}") from None
            except nats.errors.ConnectionClosedError:
                raise BusUnavailable("NATS connection closed") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    async def dead_letter(self, source: str, msg: Msg, error: str) -> None:
        """Copy an unprocessable message, with why, into the dead-letter stream."""
        headers = {
            "Prov-Dlq-Source": source,
            "Prov-Dlq-Subject": msg.subject,
            "Prov-Dlq-Error": error[:1000].replace("\r", " ").replace("\n", " "),
            "Prov-Dlq-At": datetime.now(UTC).isoformat(),
        }
        try:
            await self.publish(subjects.dlq_subject(source), msg.data, headers=headers)
        except BusUnavailable:
            log.exception("could not dead-letter a message from %s", msg.subject)
        log.error("dead-lettered a message from %s: %s", msg.subject, error)
        if self._dead_letters is None:
            self._dead_letters = metrics.get_meter("provisioning.bus").create_counter(
                "provisioning.dead_letters", unit="{message}", description="Dead-lettered messages"
            )
        self._dead_letters.add(1, {"source": source})
