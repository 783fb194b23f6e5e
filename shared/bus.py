"""The message bus: one NATS connection with JetStream, streams and buckets bootstrapped here.

Everything the services share lives in JetStream: work queues (commands, dispatch, reports),
histories (events, logs, dead letters) and key-value buckets (checkpoints, progress, heartbeats).
:meth:`Bus.bootstrap` creates them idempotently; every service calls it at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import secrets
import ssl
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar

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
from .acks import Acks, Outcome
from .auth import redact_url
from .config import NatsConfig
from .directget import DirectGets, Found, Read
from .errors import BusUnavailable, ProvisioningError, QueueFull
from .jetstream import (
    ERR_NO_PLACEMENT,
    ERR_QUEUE_FULL,
    ERR_STREAM_IN_USE,
    HDR_DLQ_AT,
    HDR_DLQ_ERROR,
    HDR_DLQ_SOURCE,
    HDR_DLQ_SUBJECT,
    HDR_DLQ_TRUNCATED,
    HDR_MSG_ID,
)

__all__ = ["NOT_STORED", "TRANSIENT", "Bus", "KVBuckets"]

T = TypeVar("T")

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 120.0
CONSUMER_ACK_WAIT_S = 60.0
# A publish retries transient failures this long: a replicated stream whose leader died is
# without one for NATS' Raft election timeout (4 to 9 s), more on a loaded machine.
PUBLISH_RETRY_S = 20.0
LEASE_TTL_S = 6.0  # a scheduler lease not renewed for this long expires (standby takes over)
_DLQ_HEADROOM = 4096  # bytes kept for a dead letter's headers within NATS's max payload
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The one definition of a transient bus error: NATS out of reach for a moment, reconnecting, or
# a stream or consumer without a leader (an election after a node died). Never the fault of
# the message in hand; the operation may be tried again (publishes carry a message id, so a
# retry cannot duplicate).
TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionReconnectingError,
    nats.errors.FlushTimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.TimeoutError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    BusUnavailable,
    ConnectionError,
    TimeoutError,
)
# A write that failed with one of these stored nothing: even a compare-and-swap can be resent.
NOT_STORED: tuple[type[BaseException], ...] = (
    nats.js.errors.NoStreamResponseError,
    nats.errors.NoRespondersError,
)


def _last_of(subjects_: list[str]) -> dict[str, Any]:
    return {"multi_last": subjects_, "batch": len(subjects_)}


def _by_subject(found: list[Found]) -> dict[str, tuple[int, dict[str, str], bytes]]:
    return {subject: (seq, headers, data) for seq, subject, headers, data in found}


class KVBuckets:
    """Handles on the key-value buckets, bound after bootstrap."""

    workflows: KeyValue
    tasks: KeyValue
    active: KeyValue
    progress: KeyValue
    executors: KeyValue
    leases: KeyValue
    keys: KeyValue


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
        self._acks: Acks | None = None
        self._gets: DirectGets | None = None
        self.kv = KVBuckets()
        self._drained = False
        self.ready = False  # connected and bootstrapped (set by the service)
        self._dead_letters: Counter | None = None
        self._msg_ids = (f"{name}.{secrets.token_hex(6)}.{n}" for n in itertools.count())

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
    def acks(self) -> Acks:
        """Acknowledged publishes many at a time (:mod:`shared.acks`)."""
        if self._acks is None:
            raise BusUnavailable("not connected to NATS")
        return self._acks

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
                url = redact_url(self.config.url)  # credentials in the URL stay out of logs
                if deadline is not None and loop.time() + delay > deadline:
                    raise BusUnavailable(f"cannot reach NATS at {url}: {exc}", url=url) from None
                log.warning("NATS at %s not reachable (%s); retrying", url, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        # Once connected, reconnect forever: services ride out NATS restarts.
        nc.options["max_reconnect_attempts"] = -1
        self._nc = nc
        self._js = nc.jetstream(timeout=5)
        self._acks = await Acks(nc).start()
        self._gets = await DirectGets(nc).start()
        log.info(
            "connected to NATS at %s as %s",
            redact_url(nc.connected_url.geturl()) if nc.connected_url else "?",
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
            *(
                StreamConfig(name=name, subjects=[subjects.STREAM_SUBJECTS[name]], **queue)
                for name in (subjects.STREAM_COMMANDS, subjects.STREAM_DISPATCH)
            ),
            # executors read what is still waiting for the scheduler in one batched direct
            # get (shared/streams.py: pending_reports)
            StreamConfig(
                name=subjects.STREAM_REPORTS,
                subjects=[subjects.STREAM_SUBJECTS[subjects.STREAM_REPORTS]],
                allow_direct=True,
                **queue,
            ),
            StreamConfig(
                name=subjects.STREAM_EVENTS,
                subjects=[subjects.STREAM_SUBJECTS[subjects.STREAM_EVENTS]],
                max_bytes=cfg.logs_max_bytes,
                duplicate_window=DUPLICATE_WINDOW_S,
                **history,
            ),
            StreamConfig(
                name=subjects.STREAM_LOGS,
                subjects=[subjects.STREAM_SUBJECTS[subjects.STREAM_LOGS]],
                max_bytes=cfg.logs_max_bytes,
                **history,
            ),
            StreamConfig(
                name=subjects.STREAM_DLQ,
                subjects=[subjects.STREAM_SUBJECTS[subjects.STREAM_DLQ]],
                max_bytes=cfg.logs_max_bytes,
                **history,
            ),
        ]

    def _buckets(self) -> list[tuple[str, str, KeyValueConfig]]:
        cfg = self.config
        # Reads as direct gets (the raw message; no JSON and base64 answer of the API): an
        # executor's checkpoint read per task cost half as much on both ends. Only with one
        # replica: any replica answers a direct get, and a lagging one would hand a fence an
        # older checkpoint.
        common: dict[str, Any] = {
            "storage": StorageType.FILE,
            "replicas": cfg.replicas,
            "direct": cfg.replicas == 1,
        }
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
            (
                "keys",
                subjects.BUCKET_KEYS,
                KeyValueConfig(bucket=subjects.BUCKET_KEYS, history=1, **common),
            ),
        ]

    async def bootstrap(self, *, retry_for_s: float | None = None) -> None:
        """Create streams, the scheduler's consumers and the KV buckets; safe to run anywhere.

        In a cluster JetStream may not answer yet (no meta leader, or fewer servers up than
        ``replicas``): transient errors are retried with backoff for ``retry_for_s`` seconds
        (``None``: until it works), as every step is idempotent.
        """
        loop = asyncio.get_running_loop()
        deadline = None if retry_for_s is None else loop.time() + retry_for_s
        delay = 0.5
        while True:
            try:
                await self._bootstrap_once()
                return
            except nats.js.errors.APIError as exc:
                if not isinstance(exc, TRANSIENT) and exc.err_code not in ERR_NO_PLACEMENT:
                    raise
                error: BaseException = exc
            except TRANSIENT as exc:
                error = exc
            if deadline is not None and loop.time() + delay > deadline:
                raise BusUnavailable(f"JetStream not ready: {error!r}") from None
            log.warning("JetStream not ready (%r); retrying in %.1fs", error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _bootstrap_once(self) -> None:
        jsm = self.js
        for stream in self._streams():
            try:
                await jsm.add_stream(stream)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != ERR_STREAM_IN_USE:
                    raise
                await jsm.update_stream(stream)
                log.info("updated stream %s to the current configuration", stream.name)
        await self.ensure_scheduler_consumers()
        for attr, bucket, kv_config in self._buckets():
            try:
                kv = await jsm.create_key_value(kv_config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != ERR_STREAM_IN_USE:
                    raise
                await self._update_bucket(kv_config)
                kv = await jsm.key_value(bucket)
            setattr(self.kv, attr, kv)
        if self.config.replicas > 1:
            await self._wait_for_leaders()

    async def _wait_for_leaders(self, timeout_s: float = 30.0) -> None:
        """Replicated streams take a moment to elect a leader once created; until then every
        publish fails with "no response from stream". Return once each has one."""
        names = [s.name for s in self._streams()] + [f"KV_{b}" for _, b, _ in self._buckets()]
        deadline = asyncio.get_running_loop().time() + timeout_s
        for name in names:
            while True:
                assert name is not None
                info = await self.js.stream_info(name)
                if info.cluster is None or info.cluster.leader:
                    break
                if asyncio.get_running_loop().time() > deadline:
                    raise nats.errors.TimeoutError  # retried by bootstrap
                await asyncio.sleep(0.2)

    async def _update_bucket(self, config: KeyValueConfig) -> None:
        """Apply what may change on a live bucket (replicas, TTL, direct gets) to its backing
        stream."""
        info = await self.js.stream_info(f"KV_{config.bucket}")
        current = info.config
        wanted_age = config.ttl or current.max_age
        direct = bool(config.direct)
        if (
            current.num_replicas == config.replicas
            and current.max_age == wanted_age
            and bool(current.allow_direct) == direct
        ):
            log.warning("bucket %s exists with another configuration; using it", config.bucket)
            return
        current.num_replicas = config.replicas
        current.max_age = wanted_age
        current.allow_direct = direct
        await self.js.update_stream(current)
        log.info(
            "updated bucket %s: replicas=%d, direct gets %s",
            config.bucket,
            config.replicas,
            "on" if direct else "off",
        )

    async def ensure_scheduler_consumers(self) -> None:
        """The scheduler's durable consumers (commands, reports), created unless they exist."""
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

    async def _ensure_consumer(self, stream: str, config: ConsumerConfig) -> None:
        """Create a durable consumer unless it exists (never silently reconfigure a live one)."""
        assert config.durable_name
        try:
            await self.js.consumer_info(stream, config.durable_name)
        except nats.js.errors.NotFoundError:
            await self.js.add_consumer(stream, config)
            log.info("created consumer %s of %s", config.durable_name, stream)

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
        retry_for_s: float = PUBLISH_RETRY_S,
    ) -> PubAck:
        """Publish to a stream and wait for its ack, retrying transient failures for up to
        ``retry_for_s`` (long enough for a stream whose leader died to elect another).

        A retry reuses ``msg_id`` (``Nats-Msg-Id``), so it can never duplicate the message.
        """
        hdrs = dict(headers or {})
        if msg_id:
            hdrs[HDR_MSG_ID] = msg_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_for_s
        delay = 0.1
        while True:
            try:
                return await self.js.publish(
                    subject, data, timeout=timeout_s, headers=dict(hdrs) if hdrs else None
                )
            except nats.js.errors.APIError as exc:
                if exc.err_code in ERR_QUEUE_FULL:
                    raise QueueFull(f"queue full: {exc.description}", subject=subject) from None
                if loop.time() + delay > deadline or not isinstance(exc, TRANSIENT):
                    raise BusUnavailable(f"publish to {subject} failed: {exc}") from None
            except nats.errors.ConnectionClosedError:
                raise BusUnavailable("NATS connection closed") from None
            except TRANSIENT as exc:
                if loop.time() + delay > deadline:
                    raise BusUnavailable(f"publish to {subject} failed: {exc!r}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def write(
        self,
        write: Callable[..., Awaitable[T]],
        *args: Any,
        retry_for_s: float = PUBLISH_RETRY_S,
        **kwargs: Any,
    ) -> T:
        """``await write(*args, **kwargs)`` (a KV ``put``, ``update``, ``delete``...), again while
        the stream has no leader. "No response from stream" means nothing was stored, so even a
        compare-and-swap ``update`` can be sent again; any other error (a timeout included: the
        write may have happened) is raised at once, as is the last one after ``retry_for_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_for_s
        delay = 0.1
        while True:
            try:
                return await write(*args, **kwargs)
            except NOT_STORED:
                if loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def publish_many(
        self,
        messages: list[tuple[str, bytes, str | None, dict[str, str] | None]],
        *,
        timeout_s: float = 5.0,
    ) -> list[int]:
        """Publish ``(subject, data, msg_id, headers)`` messages to streams and wait until
        every one is stored; their stream sequences, in order.

        They are pipelined (sent at once, in order, one deadline for all: :mod:`shared.acks`);
        any that failed is sent again, one at a time and in order, with :meth:`publish`'s
        retries, so the order holds unless a stream loses its leader between two of them.
        Give each a message id when a retry must not store it twice. Raises what
        :meth:`publish` raises."""
        sent = [
            (subject, data, {**(headers or {}), HDR_MSG_ID: mid} if mid else headers)
            for subject, data, mid, headers in messages
        ]
        outcomes: list[Outcome] = await self.acks.publish(sent, timeout_s=timeout_s)
        seqs = []
        for (subject, data, mid, headers), outcome in zip(messages, outcomes, strict=True):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, nats.js.errors.APIError) and outcome.err_code in ERR_QUEUE_FULL:
                raise QueueFull(f"queue full: {outcome.description}", subject=subject)
            if isinstance(outcome, BaseException):
                ack = await self.publish(
                    subject, data, msg_id=mid, headers=headers, timeout_s=timeout_s
                )
                outcome = ack.seq
            seqs.append(outcome)
        return seqs

    async def publish_all(
        self,
        messages: list[tuple[str, bytes]],
        *,
        msg_ids: list[str | None] | None = None,
        timeout_s: float = 5.0,
        chunk: int = 256,
    ) -> None:
        """Publish ``(subject, data)`` messages to streams and wait until every one is stored
        (:meth:`publish_many`, ``chunk`` at a time). Each carries a message id of its own
        (``msg_ids[i]`` when given, else a fresh one): a retry of one that was in fact stored
        is not stored twice, nor is a message published again under the same id within the
        duplicate window."""
        ids = msg_ids or []
        for start in range(0, len(messages), chunk):
            await self.publish_many(
                [
                    (subject, data, (ids[i] if i < len(ids) else None) or next(self._msg_ids), None)
                    for i, (subject, data) in enumerate(
                        messages[start : start + chunk], start=start
                    )
                ],
                timeout_s=timeout_s,
            )

    @property
    def gets(self) -> DirectGets:
        """Batched direct gets, several in one round trip (:mod:`shared.directget`)."""
        if self._gets is None:
            raise BusUnavailable("not connected to NATS")
        return self._gets

    async def read_stream(
        self, stream: str, subject_filter: str, *, page: int = 256, timeout_s: float = 5.0
    ) -> list[tuple[int, bytes]]:
        """Every message of ``stream`` on ``subject_filter``, in order, as ``(sequence, data)``.

        One batched direct get per ``page`` messages (nats-server 2.11+; the stream allows
        direct gets) instead of a request per message. On a work-queue stream that is what is
        still waiting for its consumer. Any replica may answer a direct get, and a lagging one
        can miss what was stored in the last moments: with replicas, the stream's leader is
        asked instead, one message per request."""
        if self.config.replicas > 1:
            return await self._read_from_leader(stream, subject_filter)
        return await self._read_pages(stream, subject_filter, page, timeout_s)

    async def _read_pages(
        self,
        stream: str,
        subject_filter: str,
        page: int,
        timeout_s: float,
        read: Read | None = None,
    ) -> list[tuple[int, bytes]]:
        """The pages of :meth:`read_stream`, from ``read`` (its first) when it was made."""
        out: list[tuple[int, bytes]] = []
        while True:
            if read is None:
                seq = out[-1][0] + 1 if out else 1
                request = {"seq": seq, "next_by_subj": subject_filter, "batch": page}
                (read,) = await self.gets.read([(stream, request)], timeout_s=timeout_s)
            out.extend((s, data) for s, _, _, data in read.found)
            if not read.left or not read.found:
                return out
            read = None

    async def read_last(
        self, stream: str, subjects_: list[str], *, timeout_s: float = 5.0
    ) -> dict[str, tuple[int, dict[str, str], bytes]]:
        """The last message of each of ``subjects_`` that has one, as ``{subject: (sequence,
        headers, data)}``: one batched direct get (nats-server 2.11+) for all of them. Only
        with one replica (see :meth:`read_stream`); raises ``BusUnavailable`` with more."""
        if self.config.replicas > 1:
            raise BusUnavailable("batched last-message reads need direct gets (one replica)")
        if not subjects_:
            return {}
        (read,) = await self.gets.read([(stream, _last_of(subjects_))], timeout_s=timeout_s)
        return _by_subject(read.found)

    async def read_stream_then_last(
        self,
        stream: str,
        subject_filter: str,
        last_stream: str,
        last_subjects: list[str],
        *,
        page: int = 256,
        timeout_s: float = 5.0,
    ) -> tuple[list[tuple[int, bytes]], dict[str, tuple[int, dict[str, str], bytes]]]:
        """:meth:`read_stream`, then :meth:`read_last`, the second read served after the
        whole of the first: one round trip when the first fits in a ``page``
        (:mod:`shared.directget` says why the server keeps their order). When it does not,
        the rest of it is read, then the last messages again (their first answer may be older
        than the end of the first read). One replica only, as :meth:`read_last`."""
        if self.config.replicas > 1:
            raise BusUnavailable("batched last-message reads need direct gets (one replica)")
        requests = [(stream, {"seq": 1, "next_by_subj": subject_filter, "batch": page})]
        if last_subjects:
            requests.append((last_stream, _last_of(last_subjects)))
        reads = await self.gets.read(requests, timeout_s=timeout_s)
        first = reads[0]
        last = _by_subject(reads[1].found) if last_subjects else {}
        if first.left and first.found:
            queue = await self._read_pages(stream, subject_filter, page, timeout_s, first)
            return queue, await self.read_last(last_stream, last_subjects, timeout_s=timeout_s)
        return [(s, data) for s, _, _, data in first.found], last

    async def _read_from_leader(self, stream: str, subject_filter: str) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        seq = 1
        while True:
            try:
                msg = await self.js.get_msg(stream, seq=seq, subject=subject_filter, next=True)
            except nats.js.errors.NotFoundError:
                return out
            if msg.seq is None:
                return out
            out.append((msg.seq, msg.data or b""))
            seq = msg.seq + 1

    async def dead_letter(
        self, source: str, msg: Msg, error: str, *, msg_id: str | None = None
    ) -> bool:
        """Copy an unprocessable message, with why, into the dead-letter stream; never raises.

        Returns whether the copy is stored. A message too big to copy whole beside its headers
        (it arrived just under NATS's max payload) is cut, and ``Prov-Dlq-Truncated`` says how
        big it was. ``msg_id`` deduplicates copies made by several consumers of one message.
        """
        reason = _CONTROL.sub(" ", error[:1000]).encode("ascii", "backslashreplace").decode()
        headers = {
            HDR_DLQ_SOURCE: source,
            HDR_DLQ_SUBJECT: msg.subject,
            HDR_DLQ_ERROR: reason,
            HDR_DLQ_AT: datetime.now(UTC).isoformat(),
        }
        data = msg.data or b""
        room = (self._nc.max_payload if self._nc is not None else 1 << 20) - _DLQ_HEADROOM
        if len(data) > room:
            headers[HDR_DLQ_TRUNCATED] = str(len(data))
            data = data[: max(0, room)]
        try:
            await self.publish(subjects.dlq_subject(source), data, headers=headers, msg_id=msg_id)
        except (ProvisioningError, nats.errors.Error, nats.js.errors.Error) as exc:
            log.error("could not dead-letter a message from %s (%s): %s", msg.subject, error, exc)
            return False
        log.error("dead-lettered a message from %s: %s", msg.subject, error)
        if self._dead_letters is None:
            self._dead_letters = metrics.get_meter("provisioning.bus").create_counter(
                "provisioning.dead_letters", unit="{message}", description="Dead-lettered messages"
            )
        self._dead_letters.add(1, {"source": source})
        return True
