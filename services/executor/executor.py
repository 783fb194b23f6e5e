"""The executor service.

Many executors share one durable pull consumer per pool. Each fetches only as many task attempts
as it has free slots, reports ``started``, keeps the ack deadline alive while the task runs,
publishes ``finished`` (and waits for JetStream's ack) and only then acks the task. A crash
anywhere in between means a redelivery, never a lost task; a redelivered attempt that already
finished is recognised (KV checkpoint or pending report) and not run again. Reports made while
another is being stored go out together in one message (:mod:`.reports`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
import time
import uuid
from datetime import UTC, datetime

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from core.actions import run_action, task_environment
from core.registry import Registry
from core.runner import Runner, RunResult
from shared import __version__, subjects
from shared.auth import task_token
from shared.bus import Bus
from shared.cancellation import cancel_and_wait
from shared.config import Config
from shared.errors import MessageError, ProvisioningError
from shared.ids import NAME_RE, is_task_id, is_workflow_id
from shared.messages import (
    READS_REPORT_BATCHES,
    TERMINAL_TASK,
    ExecutorBeat,
    LogChunk,
    Progress,
    ProgressEvent,
    Report,
    TaskDispatch,
    TaskFinished,
    TaskHandedBack,
    TaskRecord,
    TaskStarted,
    decode_dispatch,
    decode_task_ids,
    encode,
)
from shared.metrics import Metrics
from shared.pull import Puller
from shared.store import Store
from shared.streams import Streams
from shared.tracing import current_traceparent, hot_span

from .reports import ReportSender

__all__ = ["Executor"]

log = logging.getLogger(__name__)
TRACER_NAME = "provisioning.executor"
tracer = trace.get_tracer(TRACER_NAME)
LOG_FLUSH_S = 0.2
LOG_FLUSH_LINES = 100
LOG_FLUSH_BYTES = 128 * 1024
FETCH_TIMEOUT_S = 1.0
EXPIRED_BEFORE_START = 0.8  # of the ack wait: a delivery this old is left to its redelivery
UNREADABLE_RETRY_S = 2.0  # a delivery whose checkpoint does not decode comes again after this


def _now() -> datetime:
    return datetime.now(UTC)


def _not_a_dispatch(subject: str, dispatch: TaskDispatch) -> str | None:
    """Why a decoded dispatch cannot come from the scheduler (ids that are not ids, or a subject
    that does not match them), or None. Such a message is dead-lettered, never run."""
    if not is_workflow_id(dispatch.workflow_id):
        return f"not a dispatch: workflow id {dispatch.workflow_id[:80]!r}"
    if not (is_task_id(dispatch.task_id) and NAME_RE.match(dispatch.pool)):
        return f"not a dispatch: task id {dispatch.task_id[:80]!r}, pool {dispatch.pool[:80]!r}"
    if subject != subjects.dispatch_subject(dispatch.pool, dispatch.workflow_id, dispatch.task_id):
        return "not a dispatch: the subject does not match the task"
    return None


class _Running:
    """One task attempt in progress on this executor."""

    def __init__(self, msg: Msg, dispatch: TaskDispatch, delivery: int) -> None:
        self.msg = msg
        self.dispatch = dispatch
        self.delivery = delivery
        self.cancel = asyncio.Event()
        self.handed_back = False  # shutting down: nak, another executor runs it
        self.superseded_by: str | None = None  # a later delivery runs elsewhere: drop this run
        # when the fetch that brought the delivery began: its ack timer started no earlier
        self.received = time.monotonic()
        self.extra: list[Msg] = []  # later deliveries of this attempt, settled with this one


class _LogSink:
    """Batches a task's output lines into LogChunks, bounded in bytes per attempt.

    Lines go out at most ``LOG_FLUSH_S`` after they were printed (a quiet task's last line
    too), in chunks of consecutive lines of one stream, each well under NATS's max payload.
    """

    def __init__(self, bus: Bus, dispatch: TaskDispatch, limit: int) -> None:
        self.bus = bus
        self.dispatch = dispatch
        self.limit = limit
        self.used = 0
        self.truncated = False
        self.pending: list[tuple[str, str]] = []
        self.pending_bytes = 0
        self.subject = subjects.log_subject(
            dispatch.workflow_id, dispatch.task_id, dispatch.attempt
        )
        self._timer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def add(self, stream: str, line: str) -> None:
        if self.truncated:
            return
        size = len(line.encode("utf-8", "replace")) + 1
        self.used += size
        if self.used > self.limit:
            self.truncated = True
            stream = "system"
            line = f"[log truncated: over {self.limit} bytes for this attempt; the rest is dropped]"
        self.pending.append((stream, line))
        self.pending_bytes += size
        if len(self.pending) >= LOG_FLUSH_LINES or self.pending_bytes >= LOG_FLUSH_BYTES:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(LOG_FLUSH_S)
        self._timer = None
        await self.flush()

    async def close(self) -> None:
        """Flush what is left; called once the task's process has ended."""
        if self._timer is not None:
            await cancel_and_wait(self._timer)
            self._timer = None
        await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            pending, self.pending, self.pending_bytes = self.pending, [], 0
            runs: list[tuple[str, list[str]]] = []
            for stream, line in pending:
                if runs and runs[-1][0] == stream:
                    runs[-1][1].append(line)
                else:
                    runs.append((stream, [line]))
            for stream, lines in runs:
                chunk = LogChunk(
                    workflow_id=self.dispatch.workflow_id,
                    task_id=self.dispatch.task_id,
                    attempt=self.dispatch.attempt,
                    stream=stream,
                    lines=lines,
                    at=_now(),
                )
                try:
                    await self.bus.nc.publish(self.subject, encode(chunk))
                except nats.errors.Error as exc:
                    log.warning("dropped %d log lines of %s: %s", len(lines), self.subject, exc)


class Executor:
    def __init__(
        self,
        config: Config,
        bus: Bus,
        registry: Registry,
        runner: Runner,
        *,
        pool: str | None = None,
        max_concurrent_tasks: int | None = None,
    ) -> None:
        self.config = config
        self.bus = bus
        self.store = Store(bus)
        self.streams = Streams(bus)
        self.registry = registry
        self.runner = runner
        self.pool = pool or config.executor.pool
        self.slots = max_concurrent_tasks or config.executor.max_concurrent_tasks
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.reports = ReportSender(bus, self.id)
        self.started_at = _now()
        self._running: dict[str, _Running] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._touches: set[asyncio.Task[None]] = set()  # keep-alives of joined deliveries
        self._slot_free = asyncio.Event()
        self._draining = False
        self.completed = 0
        self.metrics = Metrics("executor")
        self.metrics.gauge(
            "provisioning.executor.slots_in_use",
            "Task slots in use on this executor",
            lambda: [(len(self._running), {"pool": self.pool})],
        )
        self.metrics.gauge(
            "provisioning.executor.slots",
            "Task slots of this executor",
            lambda: [(self.slots, {"pool": self.pool})],
        )
        self.ack_wait_s = config.executor.ack_wait_seconds  # the pool consumer's, once known

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        if self.runner.family.adopts:  # orphans of tasks are ours to reap (core.processes)
            loop.add_signal_handler(signal.SIGCHLD, self.runner.reap_adopted)
        try:
            await self._serve(stop)
        finally:
            if self.runner.family.adopts:
                loop.remove_signal_handler(signal.SIGCHLD)
            await self.runner.kill_strays()

    async def _serve(self, stop: asyncio.Event) -> None:
        cfg = self.config.executor
        # what the tasks of dead executors of this host left behind ends before we take any
        await self.runner.clear_orphaned()
        durable = await self.bus.ensure_pool_consumer(self.pool, cfg.ack_wait_seconds)
        # The first executor of a pool created its consumer: its ack wait is the one that
        # counts, whatever this executor was configured with. Keep-alives follow it.
        info = await self.bus.js.consumer_info(subjects.STREAM_DISPATCH, durable)
        if info.config.ack_wait:
            self.ack_wait_s = float(info.config.ack_wait)
        if abs(self.ack_wait_s - cfg.ack_wait_seconds) > 0.01:
            log.warning(
                "pool %r consumer has ack_wait %gs (configured here: %gs); using %gs",
                self.pool,
                self.ack_wait_s,
                cfg.ack_wait_seconds,
                self.ack_wait_s,
            )
        sub = await Puller(self.bus.nc, subjects.STREAM_DISPATCH, durable).start()
        kill_sub = await self.bus.nc.subscribe(subjects.kill_filter(), cb=self._on_kill)
        await self._check_scheduler()
        try:  # a leader election in a NATS cluster must not stop us: the loop beats again
            await self._beat()
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("first heartbeat failed: %s; retrying", exc or type(exc).__name__)
        beats = asyncio.create_task(self._beat_loop(stop), name="heartbeat")
        log.info("executor %s serving pool %r with %d slots", self.id, self.pool, self.slots)
        fetcher = asyncio.create_task(self._fetch_loop(sub, stop), name="fetch")
        await stop.wait()
        await self._shutdown(fetcher, beats, sub)
        with contextlib.suppress(nats.errors.Error):
            await kill_sub.unsubscribe()

    async def _shutdown(
        self, fetcher: asyncio.Task[None], beats: asyncio.Task[None], sub: Puller
    ) -> None:
        """Stop fetching; let running tasks finish within the grace period; hand back the rest."""
        self._draining = True
        self._slot_free.set()
        # Let a fetch in flight return (what it brings is handed back at once) rather than
        # cancel it: a cancelled fetch strands its messages until their ack wait expires.
        _, still = await asyncio.wait({fetcher}, timeout=FETCH_TIMEOUT_S + 2)
        if still:
            await cancel_and_wait(fetcher)
        await sub.stop()
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await self._beat()
        grace = self.config.executor.shutdown_grace_seconds
        if self._workers:
            log.info("waiting up to %.0fs for %d running tasks", grace, len(self._workers))
            _, pending = await asyncio.wait(self._workers, timeout=grace)
            for running in list(self._running.values()):
                running.handed_back = True
                running.cancel.set()
            if pending:
                log.info("handing %d unfinished tasks back for redelivery", len(pending))
                await asyncio.wait(pending, timeout=self.config.executor.kill_grace_seconds + 5)
        await cancel_and_wait(beats)
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await self.store.remove_beat(self.id)

    async def _ensure_consumer(self) -> None:
        """Re-create the pool's consumer if it was deleted (it is then found again by name)."""
        try:
            await self.bus.js.consumer_info(
                subjects.STREAM_DISPATCH, subjects.executor_consumer(self.pool)
            )
        except nats.js.errors.NotFoundError:
            log.warning("the consumer of pool %r is gone; creating it again", self.pool)
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await self.bus.ensure_pool_consumer(self.pool, self.ack_wait_s)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.debug("consumer check failed: %s", exc or type(exc).__name__)

    async def _fetch_loop(self, sub: Puller, stop: asyncio.Event) -> None:
        backoff, errors = 0.1, 0
        while not (stop.is_set() or self._draining):
            free = self.slots - len(self._workers)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            fetched = time.monotonic()
            try:
                msgs = await sub.fetch(free, FETCH_TIMEOUT_S)
            except TimeoutError:  # nothing to do (nats' TimeoutError is a TimeoutError too)
                continue
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                # ServiceUnavailable while a consumer leader moves (a NATS node died), but also
                # when the consumer is gone: after a few failures make sure it exists.
                errors += 1
                log.warning("fetch failed: %s; retrying", exc or type(exc).__name__)
                if errors % 5 == 0:
                    await self._ensure_consumer()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff, errors = 0.1, 0
            if stop.is_set() or self._draining:
                for msg in msgs:
                    with contextlib.suppress(nats.errors.Error):
                        await msg.nak()  # arrived while stopping: another executor takes it
                continue
            # First what needs no read: what is not a dispatch, and a delivery of an attempt
            # that runs here. Before the reads: a run that ends after this has stored its
            # result by the time it leaves, so the reads below see it.
            received = [(msg, d) for msg in msgs if (d := await self._receive(msg)) is not None]
            if not received:
                continue
            # What the scheduler has not consumed yet, read once for the whole group, then the
            # group's checkpoints (one read where it can be made; see _fence for the order).
            # If they cannot be read, none of the group runs now: handed back, they come again.
            try:
                pending, checkpoints = await self.streams.pending_reports_then_tasks(
                    [subjects.task_key(d.workflow_id, d.task_id) for _, d in received]
                )
            except (ProvisioningError, nats.errors.Error, nats.js.errors.Error) as exc:
                log.warning(
                    "cannot read the pending reports or checkpoints (%s); handing back", exc
                )
                for msg, _ in received:
                    with contextlib.suppress(nats.errors.Error):
                        await msg.nak(delay=1)
                continue
            for msg, dispatch in received:
                worker = asyncio.create_task(
                    self._handle(msg, dispatch, fetched, pending, checkpoints)
                )
                self._workers.add(worker)
                worker.add_done_callback(self._worker_done)

    def _worker_done(self, worker: asyncio.Task[None]) -> None:
        self._workers.discard(worker)
        self._slot_free.set()
        if not worker.cancelled() and (exc := worker.exception()) is not None:
            log.error("task handler crashed: %r", exc, exc_info=exc)

    async def _beat_loop(self, stop: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(self.config.executor.heartbeat_interval_seconds)
            try:
                await self._beat()
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                log.debug("heartbeat failed: %s", exc)
            await self._check_scheduler()

    async def _check_scheduler(self) -> None:
        """Batch reports only while the active scheduler reads batches (its lease says so);
        without a lease, or when it cannot be read, keep what was decided last."""
        try:
            lease = await self.store.lease()
        except (MessageError, nats.errors.Error, nats.js.errors.Error) as exc:
            log.debug("cannot read the scheduler lease: %s", exc)
            return
        if lease is not None:
            batches = READS_REPORT_BATCHES in lease.reads
            if batches != self.reports.batches:
                log.info("reports %s", "in batches" if batches else "one by one")
            self.reports.batches = batches

    async def _beat(self) -> None:
        beat = ExecutorBeat(
            id=self.id,
            pool=self.pool,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            max_concurrent_tasks=self.slots,
            running=len(self._running),
            started_at=self.started_at,
            at=_now(),
            version=__version__,
            running_tasks=sorted(self._running)[:100],
            draining=self._draining,
            interval_seconds=self.config.executor.heartbeat_interval_seconds,
        )
        await self.store.put_beat(beat)

    async def _on_kill(self, msg: Msg) -> None:
        workflow_id = subjects.kill_workflow(msg.subject)
        try:
            task_ids = decode_task_ids(msg.data)
        except MessageError as exc:
            # every executor sees a core message: one copy in the dead-letter stream
            digest = hashlib.sha256(msg.subject.encode() + b"\0" + msg.data).hexdigest()[:40]
            await self.bus.dead_letter(
                "executor", msg, f"kill request {exc.message}", msg_id=f"kill.{digest}"
            )
            return
        for task_id in task_ids:
            running = self._running.get(subjects.task_key(workflow_id, task_id))
            if running is not None:
                log.info("cancelling %s.%s on request", workflow_id, task_id)
                running.cancel.set()

    # -- one task -------------------------------------------------------------------------------

    async def _receive(self, msg: Msg) -> TaskDispatch | None:
        """A delivery that may run (its fence comes next), or None: not a dispatch (dead-lettered)
        or an attempt that runs here already (settled with that run)."""
        try:
            dispatch = decode_dispatch(msg.data)
            problem = _not_a_dispatch(msg.subject, dispatch)
        except MessageError as exc:
            problem = f"dispatch {exc.message}"
        if problem is not None:
            with contextlib.suppress(nats.errors.Error):
                if await self.bus.dead_letter("executor", msg, problem):
                    await msg.term()
                else:
                    await msg.nak(delay=5)
            return None
        return None if self._joined_a_run(msg, dispatch) else dispatch

    def _joined_a_run(self, msg: Msg, dispatch: TaskDispatch) -> bool:
        """Whether the attempt runs here: JetStream redelivered it (its keep-alives were lost
        while NATS was away). Never a second run: this delivery is settled with the first."""
        key = subjects.task_key(dispatch.workflow_id, dispatch.task_id)
        current = self._running.get(key)
        if current is None or current.dispatch.attempt != dispatch.attempt:
            return False
        delivery = msg.metadata.num_delivered or 1
        log.info("%s attempt %d delivery %d already runs here", key, dispatch.attempt, delivery)
        current.extra.append(msg)
        self._keep_alive_soon(msg)
        return True

    def _keep_alive_soon(self, msg: Msg) -> None:
        async def touch() -> None:
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()

        task = asyncio.create_task(touch())
        self._touches.add(task)
        task.add_done_callback(self._touches.discard)

    async def _handle(
        self,
        msg: Msg,
        dispatch: TaskDispatch,
        received: float,
        pending: dict[str, Report],
        checkpoints: dict[str, tuple[TaskRecord, int]] | None,
    ) -> None:
        delivery = msg.metadata.num_delivered or 1
        key = subjects.task_key(dispatch.workflow_id, dispatch.task_id)
        log.debug("%s attempt %d delivery %d received", key, dispatch.attempt, delivery)
        if self._joined_a_run(msg, dispatch):  # began since the fetch (another of its group)
            return
        known = checkpoints.get(key) if checkpoints is not None else None
        try:
            settled = await self._fence(msg, dispatch, delivery, pending.get(key), known)
        except MessageError as exc:
            await self._unreadable_checkpoint(msg, key, delivery, exc)
            return
        if settled is None:  # deferred: delivered again later
            return
        if settled:
            await msg.ack()
            return
        running = _Running(msg, dispatch, delivery)
        running.received = received
        self._running[key] = running
        try:
            await self._execute(running)
        finally:
            self._running.pop(key, None)

    async def _unreadable_checkpoint(
        self, msg: Msg, key: str, delivery: int, exc: MessageError
    ) -> None:
        """A task whose checkpoint does not decode (written by a newer scheduler during an
        upgrade, or damaged) is not run blind: handed back to come again, and dead-lettered once
        it has come ``max_deliveries`` times."""
        problem = f"the checkpoint of {key} cannot be read: {exc.message}"
        with contextlib.suppress(nats.errors.Error):
            if delivery >= self.config.executor.max_deliveries and await self.bus.dead_letter(
                "executor", msg, problem
            ):
                await msg.term()
                return
            log.error("%s; not running it (delivery %d), handed back", problem, delivery)
            await msg.nak(delay=UNREADABLE_RETRY_S)

    async def _fence(
        self,
        msg: Msg,
        dispatch: TaskDispatch,
        delivery: int,
        report: Report | None,
        checkpoint: tuple[TaskRecord, int] | None = None,
    ) -> bool | None:
        """Fencing: settle (True) an attempt that is stale, finished, cancelled, whose result is
        on its way, or that was delivered too often without a result; defer (None: nak, it
        comes back after the ack wait) a delivery that another executor has already started;
        else run it (False).

        ``report`` is the task's last report still waiting for the scheduler (alone or in a
        batch), read for the whole fetched group before its checkpoints (``checkpoint``: read
        for the group too, or here when the group's read did not have it): the scheduler writes
        the checkpoint before it consumes the report, so a report gone by the first read is in
        the checkpoint by the second. (In the other order a result consumed between the two
        reads is missed by both, and the task runs again.)"""
        key = subjects.task_key(dispatch.workflow_id, dispatch.task_id)
        found = checkpoint or await self.store.task(dispatch.workflow_id, dispatch.task_id)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s attempt %d delivery %d: pending report %s, checkpoint %s",
                key,
                dispatch.attempt,
                delivery,
                type(report).__name__ if report else None,
                f"{found[0].status} attempt {found[0].attempt} delivery {found[0].delivery}"
                if found
                else None,
            )
        if found is None:  # the scheduler checkpoints a task before it dispatches it
            await self.bus.dead_letter("executor", msg, f"no checkpoint for task {key}")
            return True
        record, _ = found
        if record.attempt != dispatch.attempt or record.status in TERMINAL_TASK:
            log.info(
                "%s attempt %d is %s (now attempt %d); not running it",
                key,
                dispatch.attempt,
                record.status,
                record.attempt,
            )
            return True
        if (
            record.status in ("running", "cancelling")
            and record.delivery >= delivery
            and record.executor_id not in (None, self.id)
        ):
            await self._defer(msg, key, dispatch, delivery, record.executor_id)
            return None
        if record.cancel_requested:
            # cancelled before it (re)started here: it ends cancelled without running again
            now = _now()
            await self._report_finished(
                dispatch,
                delivery,
                RunResult("cancelled", reason="cancelled", error="cancelled before it started"),
                now,
                now,
            )
            return True
        if isinstance(report, TaskFinished) and report.attempt == dispatch.attempt:
            log.info("%s attempt %d already finished; not running it again", key, dispatch.attempt)
            return True
        if (
            isinstance(report, TaskStarted)
            and report.attempt == dispatch.attempt
            and report.delivery >= delivery
            and report.executor_id != self.id
        ):
            await self._defer(msg, key, dispatch, delivery, report.executor_id)
            return None
        crashes = delivery - _handbacks(record, report, dispatch.attempt)
        if crashes > self.config.executor.max_deliveries:
            log.error(
                "%s attempt %d delivered %d times without a result; failing it",
                key,
                dispatch.attempt,
                crashes,
            )
            now = _now()
            await self._report_finished(
                dispatch,
                delivery,
                RunResult(
                    "failed",
                    reason="max_deliveries",
                    error=f"delivered {crashes} times without a result (executors crashing?)",
                ),
                now,
                now,
                retryable=False,
            )
            return True
        return False

    async def _defer(
        self, msg: Msg, key: str, dispatch: TaskDispatch, delivery: int, holder: str | None
    ) -> None:
        """A delivery no later than one another executor has started: JetStream lost track of
        the first (a NATS server killed just after delivering it). Not run now; it comes back
        after the ack wait, finished by then (acked) or, as a later delivery, taken over."""
        log.warning(
            "%s attempt %d delivery %d was already started by %s; not running it twice now",
            key,
            dispatch.attempt,
            delivery,
            holder,
        )
        with contextlib.suppress(nats.errors.Error):
            await msg.nak(delay=self.ack_wait_s)

    async def _execute(self, running: _Running) -> None:
        dispatch, msg, delivery = running.dispatch, running.msg, running.delivery
        key = subjects.task_key(dispatch.workflow_id, dispatch.task_id)
        with hot_span(
            TRACER_NAME,
            f"execute {dispatch.task_id}",
            msg.subject,
            kind=SpanKind.CONSUMER,
            headers=msg.headers,
            attributes={
                "workflow.id": dispatch.workflow_id,
                "task.id": dispatch.task_id,
                "task.attempt": dispatch.attempt,
                "task.delivery": delivery,
                "task.action": dispatch.action,
                "executor.id": self.id,
            },
        ) as span:
            started = _now()
            await self.reports.send(
                TaskStarted(
                    dispatch.workflow_id,
                    dispatch.task_id,
                    dispatch.attempt,
                    delivery,
                    self.id,
                    started,
                ),
                traceparent=current_traceparent(),
            )
            if time.monotonic() - running.received > EXPIRED_BEFORE_START * self.ack_wait_s:
                # NATS was out of reach for about the ack wait before the attempt could start:
                # JetStream redelivers it (perhaps already has). Leave it to that delivery
                # rather than run it twice; unacked, it cannot be lost.
                span.set_attribute("task.expired", True)
                log.warning(
                    "%s attempt %d delivery %d waited past its ack deadline before starting; "
                    "leaving it to its redelivery",
                    key,
                    dispatch.attempt,
                    delivery,
                )
                return
            log.debug("%s attempt %d delivery %d started", key, dispatch.attempt, delivery)
            # an earlier run (a dead executor's, or one this delivery takes over) must not
            # run beside this one: end what it left on this host first (core.leftovers). A
            # built-in runs no process, nor did any earlier run of it: nothing to look for.
            if not self._builtin(dispatch.action) and await self.runner.kill_leftovers(
                key, redelivered=delivery > 1
            ):
                span.set_attribute("task.leftovers_killed", True)
            await self._bound_logs(dispatch)
            keepalive = asyncio.create_task(self._keepalive(running))
            t0 = time.monotonic()
            try:
                result = await self._run_action(running, span)
            finally:
                # a keep-alive whose cancellation was swallowed would be awaited for ever, and
                # would keep the message alive for ever: the result never reported
                await cancel_and_wait(keepalive)
            if running.handed_back and result.outcome == "cancelled":  # stopped by shutdown
                span.set_attribute("task.handed_back", True)
                await self._hand_back(running)
                return
            if running.superseded_by or (
                # a later delivery needs the ack wait to pass first: a task this short has none
                time.monotonic() - running.received > self.ack_wait_s / 2
                and await self._superseded(running)
            ):
                # The message was redelivered (we were stopped or cut off past the ack wait)
                # and a later delivery runs or ran elsewhere: it owns the result and the ack.
                span.set_attribute("task.superseded", True)
                log.warning(
                    "%s attempt %d delivery %d was taken over by %s; dropping this result (%s)",
                    key,
                    dispatch.attempt,
                    delivery,
                    running.superseded_by,
                    result.outcome,
                )
                return
            if result.outcome == "failed":
                span.set_status(Status(StatusCode.ERROR, result.error or result.reason or "failed"))
            span.set_attribute("task.outcome", result.outcome)
            await self._report_finished(dispatch, delivery, result, started, _now())
            await msg.ack()
            for extra in running.extra:
                with contextlib.suppress(nats.errors.Error):
                    await extra.ack()
            self.completed += 1
            self.metrics.task_duration.record(
                time.monotonic() - t0, {"action": dispatch.action, "outcome": result.outcome}
            )
            log.info(
                "%s attempt %d %s in %.3fs%s",
                key,
                dispatch.attempt,
                result.outcome,
                time.monotonic() - t0,
                f" ({result.error})" if result.error else "",
            )

    async def _hand_back(self, running: _Running) -> None:
        """Give an attempt stopped by this executor's shutdown back for redelivery, saying so
        first: a hand-back is not a crash and does not count toward ``max_deliveries``."""
        dispatch = running.dispatch
        key = subjects.task_key(dispatch.workflow_id, dispatch.task_id)
        report = TaskHandedBack(
            dispatch.workflow_id,
            dispatch.task_id,
            dispatch.attempt,
            running.delivery,
            self.id,
            _now(),
        )
        try:
            await self.reports.send(
                report,
                msg_id=subjects.handback_msg_id(
                    dispatch.workflow_id, dispatch.task_id, dispatch.attempt, running.delivery
                ),
            )
        except (ProvisioningError, nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("%s: could not report the hand-back (%s)", key, exc)
        log.info("%s handed back for redelivery", key)
        with contextlib.suppress(nats.errors.Error):
            for handed in (running.msg, *running.extra):
                await handed.nak()

    async def _bound_logs(self, dispatch: TaskDispatch) -> None:
        """Keep a task's stored logs bounded across attempts: the first attempt's and the
        newest ones', ``[executor] log_attempts_kept`` in all."""
        kept = self.config.executor.log_attempts_kept
        old = dispatch.attempt - kept + 1
        if old > 1:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await self.streams.purge_logs(dispatch.workflow_id, dispatch.task_id, old)

    async def _run_action(self, running: _Running, span: trace.Span) -> RunResult:
        dispatch = running.dispatch
        sink = _LogSink(self.bus, dispatch, self.config.executor.log_limit_bytes)

        async def on_progress(percent: int, message: str) -> None:
            span.add_event("progress", {"progress.percent": percent, "progress.message": message})
            await self._progress(dispatch, percent, message)

        # a built-in runs in this process: its execute span says all there is
        with (
            contextlib.nullcontext(trace.INVALID_SPAN)
            if self._builtin(dispatch.action)
            else tracer.start_as_current_span(
                f"subprocess {dispatch.action}", attributes={"process.command": dispatch.action}
            )
        ) as sub_span:
            secret = self.config.gateway.auth_token
            task_env = task_environment(
                dispatch.workflow_id,
                dispatch.task_id,
                dispatch.attempt,
                gateway_url=self.config.orchestrator.endpoint,
                traceparent=current_traceparent(),
                task_token=task_token(
                    secret, dispatch.workflow_id, dispatch.task_id, dispatch.attempt
                )
                if secret
                else None,
            )
            result = await run_action(
                self.registry,
                self.runner,
                dispatch.action,
                dispatch.args,
                allow_commands=self.config.executor.allow_commands,
                task_env=task_env,
                timeout_s=dispatch.timeout_seconds,
                cancel=running.cancel,
                on_line=sink.add,
                on_progress=on_progress,
                mode=dispatch.mode,
                expect_change=dispatch.expect_change,
            )
            await sink.close()
            sub_span.set_attribute(
                "process.exit.code", result.exit_code if result.exit_code is not None else -1
            )
            if result.outcome != "completed":
                sub_span.set_status(Status(StatusCode.ERROR, result.error or "failed"))
        return result

    def _builtin(self, action: str) -> bool:
        return action in self.registry and self.registry.get(action).kind == "builtin"

    async def _keepalive(self, running: _Running) -> None:
        """Hold the ack deadline while the task runs; notice from the checkpoint that the task
        was cancelled, moved on to another attempt, or taken over by a later delivery."""
        interval = max(0.25, self.ack_wait_s / 3)
        dispatch = running.dispatch
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(nats.errors.Error):
                for held in (running.msg, *running.extra):
                    await held.in_progress()
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                found = await self.store.task(dispatch.workflow_id, dispatch.task_id)
                if found is None:
                    continue
                record = found[0]
                if record.attempt == dispatch.attempt and record.delivery > running.delivery:
                    running.superseded_by = f"delivery {record.delivery} on {record.executor_id}"
                    log.warning(
                        "%s.%s delivery %d was taken over by %s; stopping it",
                        dispatch.workflow_id,
                        dispatch.task_id,
                        running.delivery,
                        running.superseded_by,
                    )
                    running.cancel.set()
                    return
                if record.cancel_requested or record.attempt != dispatch.attempt:
                    running.cancel.set()

    async def _superseded(self, running: _Running) -> bool:
        """Whether a later delivery of this same attempt has started (the checkpoint says so)."""
        dispatch = running.dispatch
        try:
            found = await self.store.task(dispatch.workflow_id, dispatch.task_id)
        except (nats.errors.Error, nats.js.errors.Error):
            return False  # cannot tell: report; the scheduler fences stale reports anyway
        if found is None:
            return False
        record = found[0]
        if record.attempt == dispatch.attempt and record.delivery > running.delivery:
            running.superseded_by = f"delivery {record.delivery} on {record.executor_id}"
            return True
        return False

    async def _progress(self, dispatch: TaskDispatch, percent: int, message: str) -> None:
        now = _now()
        event = ProgressEvent(
            dispatch.workflow_id, dispatch.task_id, percent, now, message, dispatch.attempt
        )
        with contextlib.suppress(nats.errors.Error):
            await self.bus.nc.publish(subjects.event_subject(dispatch.workflow_id), encode(event))
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await self.store.put_progress(
                dispatch.workflow_id,
                dispatch.task_id,
                Progress(percent=percent, at=now, message=message, attempt=dispatch.attempt),
            )

    async def _report_finished(
        self,
        dispatch: TaskDispatch,
        delivery: int,
        result: RunResult,
        started: datetime,
        finished: datetime,
        *,
        retryable: bool = True,
    ) -> None:
        report = TaskFinished(
            workflow_id=dispatch.workflow_id,
            task_id=dispatch.task_id,
            attempt=dispatch.attempt,
            delivery=delivery,
            executor_id=self.id,
            outcome=result.outcome,  # type: ignore[arg-type]
            started_at=started,
            finished_at=finished,
            exit_code=result.exit_code,
            reason=result.reason,  # type: ignore[arg-type]
            error=result.error,
            output=result.output,
            retryable=retryable,
        )
        await self.reports.send(
            report,
            msg_id=subjects.finished_msg_id(
                dispatch.workflow_id, dispatch.task_id, dispatch.attempt, delivery
            ),
            traceparent=current_traceparent(),
        )


def _handbacks(record: TaskRecord, report: object, attempt: int) -> int:
    """Graceful hand-backs of ``attempt`` so far: counted in its checkpoint, plus one reported
    but not yet applied by the scheduler."""
    count = record.handbacks if record.attempt == attempt else 0
    if (
        isinstance(report, TaskHandedBack)
        and report.attempt == attempt
        and report.delivery > record.handback_delivery
    ):
        count += 1
    return count
