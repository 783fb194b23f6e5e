"""The scheduler service.

Inputs (commands, executor reports, retry timers, capacity changes) are processed by a single
engine loop, so the in-memory state of a workflow is never mutated concurrently. The engine
takes the inputs that are waiting (up to ``report_batch``), applies them in memory, then writes
what changed to JetStream KV in one pipelined step (:class:`Batch`): checkpoints first (with a
revision check), then events and the dispatches the checkpoints allow, and only then acks the
inputs. A crash anywhere in between means the inputs are redelivered and re-applied, never that a
dispatch is ahead of its checkpoint. Commands are applied one at a time, with the step before
them and their own step flushed around them.

On start the scheduler rebuilds its memory from those checkpoints and repairs what a crash left
half-done. Ready tasks wait in a priority heap per pool and are dispatched only into free
executor capacity, so a higher-priority task always goes before a lower-priority one. Finished
workflows are evicted from memory as soon as their end is checkpointed.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import socket
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from core.registry import Registry
from shared import subjects
from shared.bus import LEASE_TTL_S, Bus
from shared.config import Config
from shared.errors import DefinitionError, ProvisioningError
from shared.ids import NAME_RE, is_workflow_id
from shared.messages import (
    TERMINAL_WORKFLOW,
    AttemptRecord,
    CancelWorkflow,
    DecodeError,
    Report,
    RetryWorkflow,
    SubmitWorkflow,
    TaskDispatch,
    TaskEvent,
    TaskFinished,
    TaskRecord,
    TaskStarted,
    WorkflowEvent,
    WorkflowRecord,
    decode_command,
    decode_report,
    encode,
)
from shared.metrics import Metrics
from shared.store import Store
from shared.tracing import context_from, headers_with_context, message_span, trace_id_hex
from shared.workflow import validate_definition

from .batch import Batch
from .lease import Lease
from .state import WorkflowState

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer("provisioning.scheduler")

WRITE_CHUNK = 512
LEASE_RENEW_S = 1.5
POISON_DELIVERIES = 5  # a command or report that crashed the engine this often is dead-lettered
_TRANSIENT = (ProvisioningError, nats.errors.Error, nats.js.errors.Error, TimeoutError)
# Failures that are not the input's fault: NATS out of reach or electing a leader, or a
# checkpoint changed under us (another scheduler took over). However often an input meets
# them, it is retried, never dead-lettered: a long election must not lose an accepted workflow.
_NOT_THE_INPUT = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.FlushTimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.TimeoutError,
    nats.js.errors.KeyWrongLastSequenceError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    ConnectionError,
    TimeoutError,
)
_Input = tuple[str, Any]


def _now() -> datetime:
    return datetime.now(UTC)


def _poisonous(exc: BaseException, deliveries: int) -> bool:
    """Whether an input whose processing failed with ``exc`` on its ``deliveries``-th delivery
    is to be dead-lettered rather than retried."""
    return deliveries >= POISON_DELIVERIES and not isinstance(exc, _NOT_THE_INPUT)


class _Poison(Exception):
    """An input no service could have sent: dead-lettered at once, never retried."""


class _AnyAction:
    """Actions are checked by the gateway against its registry and refused by executors that do
    not know them; the scheduler checks a submission's shape only."""

    def __contains__(self, action: object) -> bool:
        return True


def _not_a_command(subject: str, command: Any, config: Config) -> str | None:
    """Why a decoded command cannot come from a gateway, or None: an id that is not a workflow
    id, a subject that does not match it, or a definition the gateway would have refused (a
    cycle, an unknown dependency, ...), which would otherwise never reach an end state."""
    kind: dict[type, str] = {
        SubmitWorkflow: "submit",
        CancelWorkflow: "cancel",
        RetryWorkflow: "retry",
    }
    if not is_workflow_id(command.workflow_id):
        return f"not a command: workflow id {command.workflow_id[:80]!r}"
    if subject != subjects.command_subject(kind[type(command)], command.workflow_id):
        return "not a command: the subject does not match the workflow"
    if isinstance(command, SubmitWorkflow):
        try:
            validate_definition(
                command.definition, _AnyAction(), max_tasks=config.gateway.max_tasks_per_workflow
            )
        except DefinitionError as exc:
            return f"invalid definition: {exc.message}"
    return None


class Scheduler:
    def __init__(self, config: Config, bus: Bus, registry: Registry) -> None:
        self.config = config
        self.bus = bus
        self.store = Store(bus)
        self.registry = registry
        self._active: dict[str, WorkflowState] = {}
        self._ready: dict[str, list[tuple[int, int, str, str]]] = defaultdict(list)
        self._seq = itertools.count()
        self._inflight: dict[str, int] = defaultdict(int)
        self._slots: dict[str, int] = {}
        self._inbox: asyncio.Queue[_Input] = asyncio.Queue(maxsize=10_000)
        self._timers: set[asyncio.TimerHandle] = set()
        self._waiters: set[asyncio.Task[None]] = set()
        self._batch = Batch()
        self._stale = False  # memory could not be rebuilt from checkpoints; retry at next step
        self._lease: Lease | None = None
        self.processed = 0
        self.id = f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = Metrics("scheduler")
        self.metrics.gauge(
            "provisioning.queue.depth",
            "Tasks ready but not dispatched, and dispatched but not finished, per pool",
            self._queue_depth,
        )

    def _queue_depth(self) -> list[tuple[float, dict[str, str]]]:
        pools = set(self._ready) | set(self._inflight)
        ready = [(float(len(self._ready.get(p, ()))), {"pool": p, "state": "ready"}) for p in pools]
        busy = [(float(self._inflight.get(p, 0)), {"pool": p, "state": "in_flight"}) for p in pools]
        return ready + busy

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Wait for the lease (one active scheduler), recover, then process inputs until ``stop``
        is set; then hand back unprocessed input.

        A scheduler that loses its lease (NATS unreachable for longer than the lease, or a
        paused process that finds another scheduler active) stops writing, drops its memory and
        stands by again in the same process: with no supervisor to restart it, a lone scheduler
        must take its lease back by itself once NATS returns."""
        while not stop.is_set():
            lease = Lease(self.bus.kv.leases, self.id, ttl_s=LEASE_TTL_S, renew_s=LEASE_RENEW_S)
            if not await lease.acquire(stop):
                break
            self._lease = lease
            try:
                held = await self._run_active(stop, lease)
            except (ProvisioningError, nats.errors.Error, nats.js.errors.Error) as exc:
                log.warning("cannot take over (%s); standing by again", exc or type(exc).__name__)
                held = False
            finally:
                await lease.release()
            if held:
                break
            log.warning("lost the scheduler lease: memory dropped; standing by again")
            self._forget()

    def _forget(self) -> None:
        """Drop everything an active period kept in memory (rebuilt from checkpoints if this
        scheduler becomes active again)."""
        self._drop_memory()
        self._inbox = asyncio.Queue(maxsize=10_000)
        self._stale = False
        self._lease = None

    async def _run_active(self, stop: asyncio.Event, lease: Lease) -> bool:
        await self._take_over_consumers()
        await self._read_capacity()
        await self._recover()
        commands = await self.bus.js.pull_subscribe_bind(
            subjects.CONSUMER_COMMANDS, stream=subjects.STREAM_COMMANDS
        )
        reports = await self.bus.js.pull_subscribe_bind(
            subjects.CONSUMER_REPORTS, stream=subjects.STREAM_REPORTS
        )
        # the loops end when ``halt`` is set, even if a cancellation is lost (asyncio.wait_for
        # in nats-py's fetch can swallow one): a scheduler that lost its lease must not go on
        # taking reports from the one that holds it
        halt = asyncio.Event()
        tasks = [
            asyncio.create_task(self._fetch_loop(commands, "command", halt), name="fetch-commands"),
            asyncio.create_task(self._fetch_loop(reports, "report", halt), name="fetch-reports"),
            asyncio.create_task(self._capacity_loop(halt), name="capacity"),
        ]
        engine = asyncio.create_task(self._engine_loop(), name="engine")
        log.info("scheduler running: %d active workflows recovered", len(self._active))
        stopping = asyncio.create_task(stop.wait())
        lost = asyncio.create_task(lease.lost.wait())
        await asyncio.wait({stopping, lost}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        lost.cancel()
        log.info("scheduler stopping%s", " (lease lost)" if lease.lost.is_set() else "")
        halt.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sub in (commands, reports):
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        # let the engine finish the input in hand, then hand back what is queued
        await self._inbox.put(("stop", None))
        await engine
        while not self._inbox.empty():
            _, item = self._inbox.get_nowait()
            if isinstance(item, Msg):
                with contextlib.suppress(nats.errors.Error):
                    await item.nak()
        for handle in self._timers:
            handle.cancel()
        for waiter in list(self._waiters):
            waiter.cancel()
        return not lease.lost.is_set()

    async def _take_over_consumers(self) -> None:
        """Start the scheduler's consumers afresh. A scheduler that was killed leaves what it had
        fetched but not acked to be redelivered only after the ack wait (a minute); on these work
        queues everything still stored is unprocessed, so a new consumer gets it all at once."""
        for durable, stream in (
            (subjects.CONSUMER_COMMANDS, subjects.STREAM_COMMANDS),
            (subjects.CONSUMER_REPORTS, subjects.STREAM_REPORTS),
        ):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.bus.js.delete_consumer(stream, durable)
        # creates them again, as everywhere else; one try: if NATS does not answer, the caller
        # stands by again (and still sees its stop event) rather than waiting here
        await self.bus.bootstrap(retry_for_s=0)

    async def _fetch_loop(self, sub: Any, kind: str, stop: asyncio.Event) -> None:
        batch = self.config.scheduler.report_batch
        backoff, errors = 0.1, 0
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except TimeoutError:  # nothing to do (nats' TimeoutError is a TimeoutError too)
                continue
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                # ServiceUnavailable while a consumer leader moves (a NATS node died), but also
                # when the consumer is gone: after a few failures make sure it exists.
                errors += 1
                log.warning("fetching %ss failed: %s; retrying", kind, exc or type(exc).__name__)
                if errors % 5 == 0:
                    try:
                        await self.bus.ensure_scheduler_consumers()
                    except (nats.errors.Error, nats.js.errors.Error) as check:
                        log.debug("consumer check failed: %s", check or type(check).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff, errors = 0.1, 0
            for msg in msgs:
                await self._inbox.put((kind, msg))

    async def _engine_loop(self) -> None:
        limit = max(1, self.config.scheduler.report_batch)
        while True:
            items = [await self._inbox.get()]
            if self._stale:
                await self._reload_all()
            while len(items) < limit and not self._inbox.empty():
                items.append(self._inbox.get_nowait())
            for kind, item in items:
                if kind == "stop":
                    await self._step_done()
                    return
                if kind == "command":  # commands run alone, between flushed steps
                    await self._step_done()
                    await self._apply(kind, item)
                    await self._step_done()
                else:
                    await self._apply(kind, item)
                self.processed += 1
            await self._step_done()

    async def _apply(self, kind: str, item: Any) -> None:
        """Apply one input to memory; its effects join the current batch."""
        try:
            if kind == "command":
                await self._on_command_msg(item)
            elif kind == "report":
                await self._on_report_msg(item)
            elif kind == "timer":
                await self._on_retry_due(*item)
        except (_Poison, DecodeError) as exc:
            reason = str(exc) if isinstance(exc, _Poison) else f"undecodable: {exc}"
            stored = await self.bus.dead_letter("scheduler", item, reason)
            with contextlib.suppress(nats.errors.Error):
                await (item.term() if stored else item.nak(delay=5))
            return
        except Exception as exc:
            msg = item if isinstance(item, Msg) else None
            poison = msg is not None and _poisonous(exc, msg.metadata.num_delivered or 1)
            if isinstance(exc, _TRANSIENT):  # NATS away for a moment: no traceback
                log.warning("cannot process a %s now (%r); will retry", kind, exc)
            else:
                log.exception("scheduler failed to process a %s", kind)
            if msg is not None and poison:
                await self.bus.dead_letter(
                    "scheduler", msg, f"failed {POISON_DELIVERIES} times: {exc!r}"
                )
                with contextlib.suppress(nats.errors.Error):
                    await msg.term()
                msg = None
            await self._abort(msg)
            return
        if isinstance(item, Msg):
            self._batch.msgs.append(item)

    async def _step_done(self) -> None:
        """Dispatch into free capacity, then apply the batch to JetStream."""
        try:
            if self._lease is not None and not self._lease.valid:
                raise ProvisioningError("the scheduler lease is not held; not writing")
            await self._pump()
            await self._flush()
        except Exception as exc:
            if isinstance(exc, ProvisioningError | nats.errors.Error | nats.js.errors.Error):
                log.warning("cannot write checkpoints now (%s); reloading", exc)
            else:
                log.exception("scheduler failed to write checkpoints; reloading")
            await self._abort(None)

    async def _abort(self, msg: Msg | None) -> None:
        """Drop the unwritten batch: hand its inputs back, rebuild memory from checkpoints."""
        batch, self._batch = self._batch, Batch()
        for m in [*batch.msgs, *([msg] if msg is not None else [])]:
            with contextlib.suppress(nats.errors.Error):
                await m.nak(delay=1)
        await self._reload_all()

    # -- capacity -------------------------------------------------------------------------------

    async def _capacity_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(1.0)
            before = dict(self._slots)
            try:
                await self._read_capacity()
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                log.debug("cannot read executor heartbeats: %s", exc)
                continue
            if self._slots != before:
                log.info("executor capacity now %s", self._slots)
                await self._inbox.put(("tick", None))

    async def _read_capacity(self) -> None:
        slots: dict[str, int] = defaultdict(int)
        now = time.time()
        for beat in await self.store.executors():
            if beat.draining or now - beat.at.timestamp() > 3 * beat.interval_seconds:
                continue
            slots[beat.pool] += beat.max_concurrent_tasks
        self._slots = dict(slots)

    def _capacity(self, pool: str) -> int:
        slots = self._slots.get(pool, 0)
        return int(slots * (1 + self.config.scheduler.dispatch_headroom))

    # -- checkpoints ----------------------------------------------------------------------------

    def _save_task(self, state: WorkflowState, task_id: str) -> None:
        """Checkpoint a task with the batch (one write however often it changes in a step)."""
        self._batch.tasks[(state.id, task_id)] = state

    def _save_workflow(self, state: WorkflowState) -> None:
        self._batch.workflows[state.id] = state

    def _emit(self, event: WorkflowEvent | TaskEvent) -> None:
        """Published once the step's checkpoints are written."""
        self._batch.events.append(event)

    def _kill(self, state: WorkflowState, task_id: str) -> None:
        """Ask executors to stop a running task, once its cancel_requested is checkpointed."""
        self._batch.kills[state.id].append(task_id)

    async def _flush(self) -> None:
        """Apply the batch: task checkpoints; workflow checkpoints with the dispatches and kills
        they allow; events; ends of workflows; then acks."""
        batch = self._batch
        if not batch:
            return
        kv = self.bus.kv
        writes = list(batch.tasks.items())
        # bus.write: again while a bucket elects a leader (a NATS node died), rather than
        # abort a batch half written (its events would then never be sent)
        for start in range(0, len(writes), WRITE_CHUNK):
            chunk = writes[start : start + WRITE_CHUNK]
            revisions = await asyncio.gather(
                *(
                    self.bus.write(
                        kv.tasks.update,
                        f"{wf_id}.{task_id}",
                        encode(state.tasks[task_id]),
                        last=state.revisions[task_id],
                    )
                    for (wf_id, task_id), state in chunk
                )
            )
            for ((_, task_id), state), revision in zip(chunk, revisions, strict=True):
                state.revisions[task_id] = revision
        batch.tasks.clear()
        # The task checkpoints are written: what they allow (dispatches, kills) goes out together
        # with the workflow records, one round trip instead of two on the path of every task.
        await asyncio.gather(self._write_workflows(), self._send_work())
        # Events last: a client that sees a workflow's end event finds its final record.
        # Acknowledged publishes: in a NATS cluster, events sent while PROV_EVENTS elects a
        # leader would otherwise be lost (and an SSE stream would wait for its end forever).
        await self.bus.publish_all(
            [(subjects.event_subject(e.workflow_id), encode(e)) for e in batch.events]
        )
        batch.events.clear()
        for wf_id, state in batch.finished.items():
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                await kv.active.delete(wf_id)
            if self._active.get(wf_id) is state:
                del self._active[wf_id]
            record = state.record
            log.info(
                "workflow %s %s: %d tasks in %.3fs; %d workflows active",
                wf_id,
                record.status,
                len(record.task_ids),
                ((record.finished_at or record.created_at) - record.created_at).total_seconds(),
                len(self._active),
            )
        batch.finished.clear()
        for msg in batch.msgs:
            with contextlib.suppress(nats.errors.Error):
                await msg.ack()
        batch.msgs.clear()

    async def _write_workflows(self) -> None:
        batch = self._batch
        states = list(batch.workflows.values())
        batch.workflows.clear()
        for state in states:
            state.record.counts = {k: n for k, n in sorted(state.counts.items()) if n}
        revisions = await asyncio.gather(
            *(
                self.bus.write(
                    self.bus.kv.workflows.update, s.id, encode(s.record), last=s.revision
                )
                for s in states
            )
        )
        for state, revision in zip(states, revisions, strict=True):
            state.revision = revision

    async def _send_work(self) -> None:
        """Kill requests and dispatches of the batch (their task checkpoints are written)."""
        batch = self._batch
        for wf_id, task_ids in batch.kills.items():
            await self.bus.nc.publish(subjects.cancel_subject(wf_id), encode(task_ids))
        batch.kills.clear()
        dispatches, batch.dispatches = batch.dispatches, []
        for start in range(0, len(dispatches), WRITE_CHUNK):
            await asyncio.gather(
                *(
                    self._publish_dispatch(state, task_id)
                    for state, task_id in dispatches[start : start + WRITE_CHUNK]
                )
            )

    def _set_status(self, state: WorkflowState, task_id: str, status: str) -> None:
        old = state.set_status(task_id, status)
        pool = state.tasks[task_id].spec.pool
        busy = ("queued", "running")
        if old in busy and status not in busy:
            self._inflight[pool] -= 1
        elif old not in busy and status in busy:
            self._inflight[pool] += 1
        if old != status:
            self._save_workflow(state)  # its counts changed
            self.metrics.tasks.add(1, {"status": status, "pool": pool})
            if status == "retrying":
                self.metrics.retries.add(1, {"pool": pool})

    def _push_ready(self, state: WorkflowState, task_id: str) -> None:
        pool = state.tasks[task_id].spec.pool
        item = (-state.priority(task_id), next(self._seq), state.id, task_id)
        heapq.heappush(self._ready[pool], item)

    # -- commands -------------------------------------------------------------------------------

    async def _on_command_msg(self, msg: Msg) -> None:
        try:
            command = decode_command(msg.data)
        except (DecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise _Poison(f"undecodable: {exc}") from None
        if (problem := _not_a_command(msg.subject, command, self.config)) is not None:
            raise _Poison(problem)
        match command:
            case SubmitWorkflow():
                with message_span(
                    tracer,
                    "scheduler.accept",
                    msg.subject,
                    kind=SpanKind.CONSUMER,
                    headers=msg.headers,
                    attributes={"workflow.id": command.workflow_id},
                ):
                    await self._on_submit(command, msg.headers or {})
            case CancelWorkflow():
                await self._on_cancel(command)
            case RetryWorkflow():
                await self._on_retry(command)

    async def _on_submit(self, cmd: SubmitWorkflow, headers: dict[str, str]) -> None:
        wf_id = cmd.workflow_id
        if wf_id in self._active or await self.store.workflow(wf_id) is not None:
            log.info("workflow %s already accepted; ignoring the repeat", wf_id)
            return
        definition = cmd.definition
        tasks = {t.id: TaskRecord(workflow_id=wf_id, spec=t) for t in definition.tasks}
        revisions: dict[str, int] = {}
        items = list(tasks.items())
        for start in range(0, len(items), WRITE_CHUNK):
            chunk = items[start : start + WRITE_CHUNK]
            revs = await asyncio.gather(
                *(self.bus.kv.tasks.put(f"{wf_id}.{tid}", encode(rec)) for tid, rec in chunk)
            )
            revisions.update((tid, rev) for (tid, _), rev in zip(chunk, revs, strict=True))
        await self.bus.kv.active.put(wf_id, b"")
        record = WorkflowRecord(
            id=wf_id,
            name=definition.name,
            status="queued",
            created_at=cmd.submitted_at,
            task_ids=[t.id for t in definition.tasks],
            priority=definition.priority,
            on_failure=definition.on_failure,
            description=definition.description,
            source=cmd.source,
            idempotency_key=cmd.idempotency_key,
            trace_id=trace_id_hex() or _trace_id_from(headers),
            traceparent=headers.get("traceparent"),
            counts={"pending": len(tasks)},  # summaries never need to read the tasks
        )
        try:
            revision = await self.bus.kv.workflows.create(wf_id, encode(record))
        except nats.js.errors.KeyWrongLastSequenceError:
            log.info("workflow %s already accepted; ignoring the repeat", wf_id)
            return
        state = WorkflowState(record, revision, tasks, revisions)
        self._active[wf_id] = state
        self._emit(WorkflowEvent(wf_id, "queued", _now(), f"{len(tasks)} tasks"))
        for task_id in state.ready():
            self._push_ready(state, task_id)
        log.info("accepted workflow %s %r with %d tasks", wf_id, record.name, len(tasks))

    async def _on_cancel(self, cmd: CancelWorkflow) -> None:
        state = await self._state(cmd.workflow_id)
        if state is None or state.record.cancel_requested:
            return
        state.record.cancel_requested = True
        self._save_workflow(state)
        self._cancel_unstarted(state, cmd.reason)
        self._finish_if_done(state)
        log.info("cancelling workflow %s: %s", state.id, cmd.reason)

    def _cancel_unstarted(
        self, state: WorkflowState, reason: str, *, stop_running: bool = True
    ) -> None:
        """Cancel what has not started; with ``stop_running``, ask executors to stop the rest."""
        now = _now()
        for task_id in state.record.task_ids:
            task = state.tasks[task_id]
            if task.status in ("pending", "retrying", "queued"):
                if task.status == "queued":  # an executor may be starting it right now
                    task.cancel_requested = True
                self._set_status(state, task_id, "cancelled")
                task.error, task.reason, task.finished_at = reason, "cancelled", now
                task.next_attempt_at = None
                self._save_task(state, task_id)
                self._emit(TaskEvent(state.id, task_id, "cancelled", now, attempt=task.attempt))
            elif stop_running and task.status == "running" and not task.cancel_requested:
                task.cancel_requested = True
                self._save_task(state, task_id)
                self._kill(state, task_id)

    async def _on_retry(self, cmd: RetryWorkflow) -> None:
        found = await self.store.workflow(cmd.workflow_id)
        if found is None:
            return
        record, revision = found
        if record.runs != cmd.runs or record.status not in ("failed", "cancelled"):
            log.info(
                "retry of %s ignored (status %s, run %d)", record.id, record.status, record.runs
            )
            return
        tasks = await self.store.tasks(record.id)
        state = WorkflowState(
            record,
            revision,
            {k: v[0] for k, v in tasks.items()},
            {k: v[1] for k, v in tasks.items()},
        )
        for task_id in record.task_ids:
            task = state.tasks[task_id]
            if task.status in ("failed", "cancelled", "skipped"):
                state.set_status(task_id, "pending")
                task.attempts_before_run = task.attempt  # a fresh retry budget in this run
                task.cancel_requested = False
                task.error = task.reason = None
                task.exit_code = None
                task.finished_at = None
                self._save_task(state, task_id)
        record.runs += 1
        record.status = "queued"
        record.cancel_requested = False
        record.error = None
        record.finished_at = None
        await self.bus.kv.active.put(record.id, b"")
        self._save_workflow(state)
        self._active[record.id] = state
        self._emit(WorkflowEvent(record.id, "queued", _now(), f"retry (run {record.runs})"))
        for task_id in state.ready():
            self._push_ready(state, task_id)
        log.info("retrying workflow %s (run %d)", record.id, record.runs)

    # -- reports --------------------------------------------------------------------------------

    async def _on_report_msg(self, msg: Msg) -> None:
        try:
            report = decode_report(msg.data)
        except (DecodeError, RecursionError) as exc:
            raise _Poison(f"undecodable: {exc}") from None
        if not (is_workflow_id(report.workflow_id) and NAME_RE.match(report.task_id)) or (
            msg.subject != subjects.report_subject(report.workflow_id, report.task_id)
        ):
            raise _Poison("not a report: its ids are not ids or do not match its subject")
        with message_span(
            tracer,
            "scheduler.report",
            msg.subject,
            kind=SpanKind.CONSUMER,
            headers=msg.headers,
            attributes={
                "workflow.id": report.workflow_id,
                "task.id": report.task_id,
                "task.attempt": report.attempt,
                "task.report": "started" if isinstance(report, TaskStarted) else "finished",
            },
        ):
            await self._apply_report(report)

    async def _apply_report(self, report: Report) -> None:
        state = await self._state(report.workflow_id)
        if state is None or report.task_id not in state.tasks:
            log.info(
                "report for finished or unknown task %s.%s", report.workflow_id, report.task_id
            )
            if state is None and isinstance(report, TaskStarted):  # started once all was over
                found = await self.store.task(report.workflow_id, report.task_id)
                if found and found[0].attempt == report.attempt and found[0].cancel_requested:
                    self._batch.kills[report.workflow_id].append(report.task_id)
            return
        task = state.tasks[report.task_id]
        current = report.attempt == task.attempt
        if isinstance(report, TaskStarted):
            # a redelivered start (scheduler restarted) or a start after the task was cancelled
            applies = current and (
                task.status == "queued"
                or (task.status == "running" and report.delivery > task.delivery)
            )
            if current and task.status == "cancelled" and task.cancel_requested:
                log.info(
                    "%s.%s started after it was cancelled; stopping it", state.id, report.task_id
                )
                self._kill(state, report.task_id)
        else:
            applies = current and task.status in ("queued", "running")
        if not applies:  # normal after a restart: reports applied but not acked come again
            log.debug(
                "stale report for %s.%s attempt %d (now attempt %d, %s); ignored",
                state.id,
                report.task_id,
                report.attempt,
                task.attempt,
                task.status,
            )
            return
        if report.delivery < task.delivery:
            log.warning(
                "fenced a late report from %s for %s.%s (delivery %d < %d)",
                report.executor_id,
                state.id,
                report.task_id,
                report.delivery,
                task.delivery,
            )
            return
        match report:
            case TaskStarted():
                await self._on_started(state, report)
            case TaskFinished():
                await self._on_finished(state, report)

    async def _on_started(self, state: WorkflowState, rep: TaskStarted) -> None:
        task = state.tasks[rep.task_id]
        if task.queued_at is not None:
            latency = (rep.started_at - task.queued_at).total_seconds()
            self.metrics.dispatch_latency.record(max(0.0, latency), {"pool": task.spec.pool})
        self._set_status(state, rep.task_id, "running")
        task.delivery = rep.delivery
        task.executor_id = rep.executor_id
        task.started_at = rep.started_at
        if task.attempts:
            task.attempts[-1].executor_id = rep.executor_id
            task.attempts[-1].started_at = rep.started_at
        self._save_task(state, rep.task_id)
        self._emit(
            TaskEvent(
                state.id,
                rep.task_id,
                "running",
                _now(),
                attempt=rep.attempt,
                executor_id=rep.executor_id,
            )
        )
        if state.record.status == "queued":
            state.record.status = "running"
            state.record.started_at = state.record.started_at or _now()
            self._save_workflow(state)
            self._emit(WorkflowEvent(state.id, "running", _now()))
        if task.cancel_requested:
            self._kill(state, rep.task_id)

    async def _on_finished(self, state: WorkflowState, rep: TaskFinished) -> None:
        task_id = rep.task_id
        task = state.tasks[task_id]
        task.delivery = rep.delivery
        task.executor_id = rep.executor_id
        task.started_at = task.started_at or rep.started_at
        task.finished_at = rep.finished_at
        task.exit_code = rep.exit_code
        task.output = rep.output
        task.error = rep.error
        task.reason = rep.reason
        if task.attempts:
            a = task.attempts[-1]
            a.executor_id, a.started_at, a.finished_at = (
                rep.executor_id,
                rep.started_at,
                rep.finished_at,
            )
            a.outcome, a.exit_code, a.reason, a.error = (
                rep.outcome,
                rep.exit_code,
                rep.reason,
                rep.error,
            )
        can_retry = (
            rep.outcome == "failed"
            and rep.retryable
            and rep.reason not in ("cancelled", "refused")
            and task.attempt - task.attempts_before_run <= task.spec.retries
            and not task.cancel_requested
            and not state.record.cancel_requested
        )
        if rep.outcome == "completed":
            status = "completed"
        elif can_retry:
            status = "retrying"
        else:
            status = "cancelled" if rep.outcome == "cancelled" else "failed"
        self._set_status(state, task_id, status)
        event = TaskEvent(
            state.id,
            task_id,
            status,
            _now(),
            attempt=rep.attempt,
            executor_id=rep.executor_id,
            error=rep.error,
            reason=rep.reason,
        )
        if status == "retrying":
            delay = task.spec.backoff.delay(task.attempt - task.attempts_before_run)
            task.next_attempt_at = datetime.fromtimestamp(time.time() + delay, UTC)
            self._save_task(state, task_id)
            self._emit(event)
            self._schedule_retry(state.id, task_id, task.attempt, delay)
            return
        self._save_task(state, task_id)
        self._emit(event)
        if status == "completed":
            for child in state.dependents.get(task_id, ()):
                if state.is_ready(child) and not state.record.cancel_requested:
                    self._push_ready(state, child)
        else:
            self._skip_dependents(state, task_id)
            if status == "failed" and state.record.on_failure == "stop":
                self._cancel_unstarted(
                    state, f"stopped: task {task_id!r} failed", stop_running=False
                )
        self._finish_if_done(state)

    def _skip_dependents(self, state: WorkflowState, task_id: str) -> None:
        now = _now()
        for child in state.descendants(task_id):
            task = state.tasks[child]
            if task.status in ("pending", "retrying"):
                self._set_status(state, child, "skipped")
                task.reason = "dependency_failed"
                task.error = f"dependency {task_id!r} did not complete"
                task.finished_at = now
                self._save_task(state, child)
                self._emit(TaskEvent(state.id, child, "skipped", now, reason="dependency_failed"))

    def _schedule_retry(self, wf_id: str, task_id: str, attempt: int, delay: float) -> None:
        loop = asyncio.get_running_loop()

        def due() -> None:
            self._timers.discard(handle)
            # never put_nowait: a full inbox must delay the retry, not lose it
            waiter = loop.create_task(self._inbox.put(("timer", (wf_id, task_id, attempt))))
            self._waiters.add(waiter)
            waiter.add_done_callback(self._waiters.discard)

        handle = loop.call_later(max(0.0, delay), due)
        self._timers.add(handle)

    async def _on_retry_due(self, wf_id: str, task_id: str, attempt: int) -> None:
        state = self._active.get(wf_id)
        if state is None:
            return
        task = state.tasks[task_id]
        if task.status != "retrying" or task.attempt != attempt:
            return
        self._set_status(state, task_id, "pending")
        task.next_attempt_at = None
        self._save_task(state, task_id)
        if state.is_ready(task_id):
            self._push_ready(state, task_id)

    # -- dispatch -------------------------------------------------------------------------------

    async def _pump(self) -> None:
        for pool, heap in self._ready.items():
            capacity = self._capacity(pool)
            while heap and self._inflight[pool] < capacity:
                _, _, wf_id, task_id = heapq.heappop(heap)
                state = self._active.get(wf_id)
                if state is None or state.record.cancel_requested or not state.is_ready(task_id):
                    continue
                self._dispatch(state, task_id)

    def _timeout_for(self, task: TaskRecord) -> float:
        if task.spec.timeout_seconds is not None:
            return task.spec.timeout_seconds
        if task.spec.action in self.registry:
            action = self.registry.get(task.spec.action)
            if action.timeout_seconds:
                return action.timeout_seconds
        return self.config.executor.task_timeout_seconds

    def _dispatch(self, state: WorkflowState, task_id: str) -> None:
        task = state.tasks[task_id]
        task.attempt += 1
        task.delivery = 0
        task.queued_at = _now()
        task.started_at = task.finished_at = None
        task.attempts.append(AttemptRecord(attempt=task.attempt))
        del task.attempts[:-20]
        self._set_status(state, task_id, "queued")
        self._save_task(state, task_id)  # the batch writes checkpoints first, then dispatches
        self._batch.dispatches.append((state, task_id))
        self._emit(TaskEvent(state.id, task_id, "queued", _now(), attempt=task.attempt))

    async def _publish_dispatch(self, state: WorkflowState, task_id: str) -> None:
        task = state.tasks[task_id]
        dispatch = TaskDispatch(
            workflow_id=state.id,
            task_id=task_id,
            attempt=task.attempt,
            action=task.spec.action,
            args=task.spec.args,
            timeout_seconds=self._timeout_for(task),
            pool=task.spec.pool,
            dispatched_at=_now(),
        )
        subject = subjects.dispatch_subject(task.spec.pool, state.id, task_id)
        parent = context_from(
            {"traceparent": state.record.traceparent} if state.record.traceparent else {}
        )
        with message_span(
            tracer,
            f"dispatch {task_id}",
            subject,
            kind=SpanKind.PRODUCER,
            context=parent,
            attributes={
                "workflow.id": state.id,
                "task.id": task_id,
                "task.attempt": task.attempt,
                "task.action": task.spec.action,
            },
        ):
            await self.bus.publish(
                subject,
                encode(dispatch),
                msg_id=f"{state.id}.{task_id}.{task.attempt}",
                headers=headers_with_context(),
            )

    # -- completion -----------------------------------------------------------------------------

    def _finish_if_done(self, state: WorkflowState) -> None:
        """End the workflow when every task has; it leaves memory once that is checkpointed."""
        if not state.all_terminal() or state.record.status in TERMINAL_WORKFLOW:
            return
        status = state.final_status()
        record = state.record
        record.status = status  # type: ignore[assignment]
        record.finished_at = _now()
        failed = [t for t in record.task_ids if state.tasks[t].status == "failed"]
        record.error = f"failed tasks: {', '.join(failed[:10])}" if failed else None
        self._save_workflow(state)
        self._emit(WorkflowEvent(record.id, status, _now(), record.error or ""))
        self._batch.finished[record.id] = state

    # -- recovery -------------------------------------------------------------------------------

    async def _state(self, wf_id: str) -> WorkflowState | None:
        state = self._active.get(wf_id)
        if state is not None:
            return state
        return await self._load(wf_id)

    async def _load(self, wf_id: str) -> WorkflowState | None:
        found = await self.store.workflow(wf_id)
        if found is None:
            return None
        record, revision = found
        if record.status in TERMINAL_WORKFLOW:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                await self.bus.kv.active.delete(wf_id)
            return None
        tasks = await self.store.tasks(wf_id)
        state = WorkflowState(
            record,
            revision,
            {k: v[0] for k, v in tasks.items()},
            {k: v[1] for k, v in tasks.items()},
        )
        self._active[wf_id] = state
        await self._repair(state)
        return state

    async def _repair(self, state: WorkflowState) -> None:
        """Bring a workflow loaded from checkpoints back into motion."""
        now = time.time()
        for task_id in state.record.task_ids:
            task = state.tasks[task_id]
            if task.status in ("queued", "running"):
                self._inflight[task.spec.pool] += 1
                if not await self._dispatch_outstanding(state, task_id):
                    log.info(
                        "re-publishing dispatch of %s.%s attempt %d",
                        state.id,
                        task_id,
                        task.attempt,
                    )
                    await self._publish_dispatch(state, task_id)
                if task.cancel_requested:
                    self._kill(state, task_id)
            elif task.status == "retrying":
                due = task.next_attempt_at.timestamp() if task.next_attempt_at else now
                self._schedule_retry(state.id, task_id, task.attempt, due - now)
            elif state.is_ready(task_id) and not state.record.cancel_requested:
                self._push_ready(state, task_id)
        self._finish_if_done(state)

    async def _dispatch_outstanding(self, state: WorkflowState, task_id: str) -> bool:
        """Whether the task's current attempt is still in the dispatch queue, or its report is
        waiting for us. Checked in this order: an executor publishes its report before it acks."""
        task = state.tasks[task_id]
        for stream, subject in (
            (
                subjects.STREAM_DISPATCH,
                subjects.dispatch_subject(task.spec.pool, state.id, task_id),
            ),
            (subjects.STREAM_REPORTS, subjects.report_subject(state.id, task_id)),
        ):
            try:
                await self.bus.js.get_last_msg(stream, subject)
                return True
            except nats.js.errors.NotFoundError:
                continue
        return False

    async def _recover(self) -> None:
        ids = await self.store.active_ids()
        for wf_id in ids:
            if wf_id not in self._active:
                await self._load(wf_id)
        await self._pump()
        await self._flush()

    def _drop_memory(self) -> None:
        """Forget workflows, ready heaps, in-flight counts, retry timers and the unwritten batch."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        self._active.clear()
        self._ready.clear()
        self._inflight.clear()
        self._batch = Batch()

    async def _reload_all(self) -> None:
        """Drop memory and rebuild it from checkpoints (after an unexpected failure)."""
        self._drop_memory()
        if self._lease is not None and not self._lease.valid:
            self._stale = True  # not active (any more): recovering would write without a lease
            return
        try:
            await self._recover()
        except Exception as exc:
            if isinstance(exc, ProvisioningError | nats.errors.Error | nats.js.errors.Error):
                log.warning("reload from checkpoints failed (%r); retrying at the next input", exc)
            else:
                log.exception("reload from checkpoints failed; will retry at the next input")
            self._batch = Batch()
            self._stale = True
        else:
            self._stale = False


def _trace_id_from(headers: dict[str, str]) -> str | None:
    parts = headers.get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 else None
