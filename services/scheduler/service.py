"""The scheduler service: the engine fed from JetStream, its effects written back.

One active scheduler at a time (:mod:`.lease`). While active it runs one step loop: it takes
the inputs that are waiting (commands, executor reports, retry timers, capacity changes; up to
``[scheduler] report_batch``), applies each to the engine (:mod:`engine`), lets the engine
dispatch into free capacity, and writes the step's effects in one ordered flush (:mod:`.flush`)
before acknowledging the inputs. The engine's memory is rebuilt from checkpoints when the
scheduler takes over, or when a step could not be written (:mod:`.recovery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from core.registry import Registry
from engine import Engine, Timer, Verdict
from engine.bindings import claims_for, compensation_for, timeout_for
from shared import subjects
from shared.bus import LEASE_TTL_S, TRANSIENT, Bus
from shared.config import Config
from shared.errors import ProvisioningError
from shared.messages import (
    TERMINAL_WORKFLOW,
    ApproveWorkflow,
    CancelWorkflow,
    Command,
    RejectWorkflow,
    Report,
    RetryWorkflow,
    SubmitWorkflow,
    TaskStarted,
    decode_command,
)
from shared.metrics import Metrics
from shared.pull import Puller
from shared.store import Store
from shared.streams import Streams
from shared.tracing import (
    hot_span,
    message_span,
    span_context_of,
    trace_id_hex,
    tracing_enabled,
)

from .capacity import read_slots, watch_capacity
from .flush import COUNTS_INTERVAL_S, TRACER_NAME, Flusher
from .inputs import (
    POISON_DELIVERIES,
    Later,
    Poison,
    fetch_loop,
    poisonous,
    read_command,
    read_reports,
)
from .lease import Lease
from .recovery import Recovery

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer(TRACER_NAME)

LEASE_RENEW_S = 1.5
# links of one step's report span to the executions that sent its reports: each costs about as
# much as a small span; past this many a step's span names the count only
MAX_LINKS = 8
_Input = tuple[str, Any]


def _now() -> datetime:
    return datetime.now(UTC)


def _trace_id_from(headers: dict[str, str]) -> str | None:
    parts = headers.get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 else None


class Scheduler:
    def __init__(self, config: Config, bus: Bus, registry: Registry) -> None:
        self.config = config
        self.bus = bus
        self.store = Store(bus)
        self.streams = Streams(bus)
        self.engine = Engine(
            timeout_for=timeout_for(registry, config),
            headroom=config.scheduler.dispatch_headroom,
            claims_for=claims_for(registry, config),
            max_fanout=config.scheduler.max_fanout,
            compensation_for=compensation_for(registry),
        )
        self.metrics = Metrics("scheduler")
        self.flusher = Flusher(bus, self.store, self.metrics)
        self.recovery = Recovery(
            self.engine,
            self.store,
            self.streams,
            self.flusher,
            batch=config.scheduler.recovery_batch,
        )
        self._inbox: asyncio.Queue[_Input] = asyncio.Queue(maxsize=10_000)
        self._acks: list[Msg] = []  # inputs of the current step, acked once it is written
        self._timers: dict[Timer, asyncio.TimerHandle] = {}
        self._waiters: set[asyncio.Task[None]] = set()
        self._stale = False  # memory could not be rebuilt from checkpoints; retry at next step
        self._counts_due = False  # a step is coming to write the counts the flusher deferred
        # for the step's spans: when it began, and per workflow its trace context and the
        # trace contexts of the reports applied to it
        self._step_began_ns = 0
        self._step_reports: dict[str, tuple[str | None, list[tuple[Report, dict[str, str]]]]] = {}
        self._lease: Lease | None = None
        self.processed = 0
        self.id = f"{socket.gethostname()}-{os.getpid()}"
        self.metrics.gauge(
            "provisioning.queue.depth",
            "Tasks ready but not dispatched, and dispatched but not finished, per pool",
            self._queue_depth,
        )

    def _queue_depth(self) -> list[tuple[float, dict[str, str]]]:
        out: list[tuple[float, dict[str, str]]] = []
        for pool in self.engine.pools():
            out.append((float(self.engine.ready_count(pool)), {"pool": pool, "state": "ready"}))
            busy = float(self.engine.inflight.get(pool, 0))
            out.append((busy, {"pool": pool, "state": "in_flight"}))
        return out

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Wait for the lease (one active scheduler), recover, then process inputs until ``stop``
        is set; then hand back unprocessed input.

        A scheduler that loses its lease (NATS unreachable for longer than the lease, or a
        paused process that finds another scheduler active) stops writing, drops its memory and
        stands by again in the same process: with no supervisor to restart it, a lone scheduler
        must take its lease back by itself once NATS returns."""
        while not stop.is_set():
            lease = Lease(self.store, self.id, ttl_s=LEASE_TTL_S, renew_s=LEASE_RENEW_S)
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
            self._inbox = asyncio.Queue(maxsize=10_000)
            self._stale = False
            self._lease = None

    def _forget(self) -> None:
        """Drop everything an active period kept in memory (rebuilt from checkpoints if this
        scheduler becomes active again)."""
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self.engine.forget()
        self.flusher.forget()
        self._acks = []

    async def _run_active(self, stop: asyncio.Event, lease: Lease) -> bool:
        await self._take_over_consumers()
        self.engine.set_capacity(await read_slots(self.store))
        await self._recover()
        commands = await Puller(
            self.bus.nc, subjects.STREAM_COMMANDS, subjects.CONSUMER_COMMANDS
        ).start()
        reports = await Puller(
            self.bus.nc, subjects.STREAM_REPORTS, subjects.CONSUMER_REPORTS
        ).start()
        # the loops end when ``halt`` is set, even if a cancellation is lost (asyncio.wait_for
        # in nats-py's fetch can swallow one): a scheduler that lost its lease must not go on
        # taking reports from the one that holds it
        halt = asyncio.Event()
        batch = self.config.scheduler.report_batch
        check = self.bus.ensure_scheduler_consumers
        tasks = [
            asyncio.create_task(
                fetch_loop(
                    commands, "command", self._inbox.put, halt, batch=batch, check_consumers=check
                ),
                name="fetch-commands",
            ),
            asyncio.create_task(
                fetch_loop(
                    reports, "report", self._inbox.put, halt, batch=batch, check_consumers=check
                ),
                name="fetch-reports",
            ),
            asyncio.create_task(
                watch_capacity(self.store, lambda: self.engine.slots, self._capacity_changed, halt),
                name="capacity",
            ),
        ]
        engine = asyncio.create_task(self._step_loop(), name="engine")
        log.info("scheduler running: %d active workflows recovered", len(self.engine.workflows))
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
            await sub.stop()
        # let the engine finish the step in hand, then hand back what is queued
        await self._inbox.put(("stop", None))
        await engine
        while not self._inbox.empty():
            _, item = self._inbox.get_nowait()
            if isinstance(item, Msg):
                with contextlib.suppress(nats.errors.Error):
                    await item.nak()
        for handle in self._timers.values():
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

    async def _capacity_changed(self, slots: dict[str, int]) -> None:
        await self._inbox.put(("capacity", slots))

    # -- the step loop --------------------------------------------------------------------------

    async def _step_loop(self) -> None:
        limit = max(1, self.config.scheduler.report_batch)
        while True:
            items = [await self._inbox.get()]
            self._step_began_ns = time.time_ns()
            if self._stale:
                await self._reload_all()
            while len(items) < limit and not self._inbox.empty():
                items.append(self._inbox.get_nowait())
            stopping = False
            for kind, item in items:
                if kind == "stop":
                    stopping = True
                    break
                await self._apply(kind, item)
                self.processed += 1
            await self._step_done()
            if stopping:
                return

    async def _apply(self, kind: str, item: Any) -> None:
        """Apply one input to the engine; its effects join the current step."""
        try:
            if kind == "command":
                await self._on_command(item)
            elif kind == "report":
                await self._on_report(item)
            elif kind == "timer":
                self.engine.timer_due(item, _now())
            elif kind == "capacity":
                self.engine.set_capacity(item)
            elif kind == "tick":
                self.engine.tick(_now())
        except Poison as exc:
            stored = await self.bus.dead_letter("scheduler", item, exc.message)
            with contextlib.suppress(nats.errors.Error):
                await (item.term() if stored else item.nak(delay=5))
            return
        except Later as exc:
            log.info("%s; handing it back for later", exc.message)
            with contextlib.suppress(nats.errors.Error):
                await item.nak(delay=0.5)
            return
        except Exception as exc:
            msg = item if isinstance(item, Msg) else None
            poison = msg is not None and poisonous(exc, msg.metadata.num_delivered or 1)
            if isinstance(exc, (*TRANSIENT, ProvisioningError)):  # NATS away: no traceback
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
            self._acks.append(item)

    async def _step_done(self) -> None:
        """Dispatch into free capacity, then write the step to JetStream."""
        try:
            if self._lease is not None and not self._lease.valid:
                raise ProvisioningError("the scheduler lease is not held; not writing")
            self.engine.pump(_now())
            effects = self.engine.take()
            acks, self._acks = self._acks, []
            self._arm_timers(effects.timers)
            self._arm_wakeups(effects.wakeups)
            if effects or acks or self.flusher.deferred:
                try:
                    await self.flusher.flush(effects, acks, active=len(self.engine.workflows))
                except BaseException:
                    self._acks = acks  # handed back by the abort
                    raise
            self._trace_reports()
            if self.flusher.deferred and not self._counts_due:
                # counts not written yet: a step of their own writes them if no input comes
                self._counts_due = True
                asyncio.get_running_loop().call_later(COUNTS_INTERVAL_S, self._counts_wakeup)
        except Exception as exc:
            if isinstance(exc, ProvisioningError | nats.errors.Error | nats.js.errors.Error):
                log.warning("cannot write checkpoints now (%s); reloading", exc)
            else:
                log.exception("scheduler failed to write checkpoints; reloading")
            await self._abort(None)

    async def _abort(self, msg: Msg | None) -> None:
        """Drop the unwritten step: hand its inputs back, rebuild memory from checkpoints."""
        acks, self._acks = self._acks, []
        self._step_reports = {}
        for m in [*acks, *([msg] if msg is not None else [])]:
            with contextlib.suppress(nats.errors.Error):
                await m.nak(delay=1)
        await self._reload_all()

    def _trace_reports(self) -> None:
        """The spans of the reports applied in the step now written: one per workflow, not
        one per report (the spans cost more than the reports). A workflow's only report of the
        step is a child of the execution that sent it; several are one span in the workflow's
        trace, linked to each execution."""
        reports, self._step_reports = self._step_reports, {}
        for wf_id, (parent, applied) in reports.items():
            single = applied[0] if len(applied) == 1 else None
            with hot_span(
                TRACER_NAME,
                "scheduler.report",
                subjects.STREAM_SUBJECTS[subjects.STREAM_REPORTS],
                kind=SpanKind.CONSUMER,
                headers=single[1] if single else {"traceparent": parent or ""},
                start_ns=self._step_began_ns,
                links=[]
                if single
                else [Link(span_context_of(c)) for _, c in applied[:MAX_LINKS] if c],
                attributes={
                    "messaging.batch.message_count": len(applied),
                    "workflow.id": wf_id,
                    **(
                        {
                            "task.id": single[0].task_id,
                            "task.attempt": single[0].attempt,
                            "task.report": type(single[0]).__name__,
                        }
                        if single
                        else {}
                    ),
                },
            ):
                pass  # the step is written: the span only says so

    def _arm_timers(self, timers: list[Timer]) -> None:
        loop = asyncio.get_running_loop()
        now = _now()
        for timer in timers:
            delay = max(0.0, (timer.at - now).total_seconds())
            if (old := self._timers.pop(timer, None)) is not None:
                old.cancel()
            self._timers[timer] = loop.call_later(delay, self._timer_due, timer)

    def _arm_wakeups(self, wakeups: list[datetime]) -> None:
        """Rate windows opening: a ``tick`` input then (one per distinct moment)."""
        loop = asyncio.get_running_loop()
        now = _now()
        for at in sorted(set(wakeups)):
            delay = max(0.0, (at - now).total_seconds())
            loop.call_later(delay, self._queue_input, ("tick", None))

    def _queue_input(self, item: _Input) -> None:
        # never put_nowait: a full inbox must delay the input, not lose it
        waiter = asyncio.get_running_loop().create_task(self._inbox.put(item))
        self._waiters.add(waiter)
        waiter.add_done_callback(self._waiters.discard)

    def _counts_wakeup(self) -> None:
        self._counts_due = False
        self._queue_input(("counts", None))  # nothing to apply: the step writes the counts

    def _timer_due(self, timer: Timer) -> None:
        self._timers.pop(timer, None)
        self._queue_input(("timer", timer))

    # -- recovery -------------------------------------------------------------------------------

    async def _recover(self) -> None:
        await self.recovery.load_all()
        await self._step_done()

    async def _reload_all(self) -> None:
        """Drop memory and rebuild it from checkpoints (after a step could not be written)."""
        self._forget()
        if self._lease is not None and not self._lease.valid:
            self._stale = True  # not active (any more): recovering would write without a lease
            return
        try:
            await self.recovery.load_all()
            self.engine.pump(_now())
            effects = self.engine.take()
            self._arm_timers(effects.timers)
            self._arm_wakeups(effects.wakeups)
            await self.flusher.flush(effects, [], active=len(self.engine.workflows))
        except Exception as exc:
            if isinstance(exc, ProvisioningError | nats.errors.Error | nats.js.errors.Error):
                log.warning("reload from checkpoints failed (%r); retrying at the next input", exc)
            else:
                log.exception("reload from checkpoints failed; will retry at the next input")
            self._forget()
            self._stale = True
        else:
            self._stale = False

    # -- commands -------------------------------------------------------------------------------

    async def _on_command(self, msg: Msg) -> None:
        command: Command = read_command(msg.subject, msg.data, self.config)
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
            case ApproveWorkflow():
                if self.engine.get(command.workflow_id) is None:
                    await self.recovery.load(command.workflow_id)
                if self.engine.approve(
                    command.workflow_id, command.by, command.task_id, command.comment, _now()
                ):
                    log.info("workflow %s approved by %s", command.workflow_id, command.by)
            case RejectWorkflow():
                if self.engine.get(command.workflow_id) is None:
                    await self.recovery.load(command.workflow_id)
                if self.engine.reject(
                    command.workflow_id, command.by, command.reason, command.task_id, _now()
                ):
                    log.info("workflow %s rejected by %s", command.workflow_id, command.by)

    async def _on_submit(self, cmd: SubmitWorkflow, headers: dict[str, str]) -> None:
        wf_id = cmd.workflow_id
        if self.engine.get(wf_id) is not None or await self.store.workflow(wf_id) is not None:
            log.info("workflow %s already accepted; ignoring the repeat", wf_id)
            return
        # A cancel sent while the submission waited is behind it in the queue: apply it with
        # the submission, so that nothing of the workflow is dispatched.
        cancelled = None
        if (pending := await self.streams.pending_command("cancel", wf_id)) is not None:
            try:
                cancel = decode_command(pending)
            except ProvisioningError:
                cancel = None
            if isinstance(cancel, CancelWorkflow):
                cancelled = cancel.reason
        self.engine.accept(
            cmd,
            _now(),
            trace_id=trace_id_hex() or _trace_id_from(headers),
            traceparent=headers.get("traceparent"),
            cancelled=cancelled,
        )

    async def _on_cancel(self, cmd: CancelWorkflow) -> None:
        wf_id = cmd.workflow_id
        state = self.engine.get(wf_id) or await self.recovery.load(wf_id)
        if state is None or state.record.status in TERMINAL_WORKFLOW:
            # arrived ahead of what it cancels (a submission or retry handed back for a
            # moment): apply it after that, not never
            if await self.streams.submission_waits(wf_id):
                raise Later(f"cancel of {wf_id} arrived before its submission")
            if await self.streams.pending_command("retry", wf_id) is not None:
                raise Later(f"cancel of {wf_id} arrived before its retry")
            return
        if self.engine.cancel(wf_id, cmd.reason, _now()):
            log.info("cancelling workflow %s: %s", wf_id, cmd.reason)

    async def _on_retry(self, cmd: RetryWorkflow) -> None:
        wf_id = cmd.workflow_id
        loaded = None
        revisions: tuple[int, dict[str, int]] = (0, {})
        if self.engine.get(wf_id) is None:
            found = await self.store.workflow(wf_id)
            if found is None:
                return
            record, revision = found
            if record.runs == cmd.runs and record.status in ("failed", "cancelled"):
                tasks = await self.store.tasks(wf_id)
                loaded = (record, {k: v[0] for k, v in tasks.items()})
                revisions = (revision, {k: v[1] for k, v in tasks.items()})
        if self.engine.retry(wf_id, cmd.runs, _now(), loaded=loaded):
            state = self.engine.get(wf_id)
            assert state is not None
            if loaded is not None:
                self.flusher.remember(state, *revisions)
            log.info("retrying workflow %s (run %d)", wf_id, state.record.runs)
        else:
            log.info("retry of %s (after run %d) ignored", wf_id, cmd.runs)

    # -- reports --------------------------------------------------------------------------------

    async def _on_report(self, msg: Msg) -> None:
        """One report, or an executor's batch of them: each applied on its own, in order, and
        fenced by its own attempt and delivery."""
        for report, context in read_reports(msg.subject, msg.data, msg.headers):
            await self._apply_report(report, msg.subject, context)

    async def _apply_report(self, report: Report, subject: str, context: dict[str, str]) -> None:
        if self.engine.get(report.workflow_id) is None:
            await self.recovery.load(report.workflow_id)
        verdict = self.engine.report(report, _now())
        if tracing_enabled():
            state = self.engine.get(report.workflow_id)
            parent = state.record.traceparent if state is not None else None
            carrier = {"traceparent": context["traceparent"]} if "traceparent" in context else {}
            self._step_reports.setdefault(report.workflow_id, (parent, []))[1].append(
                (report, carrier)
            )
        if verdict is Verdict.FENCED:
            log.warning(
                "fenced a late report from %s for %s.%s (delivery %d)",
                report.executor_id,
                report.workflow_id,
                report.task_id,
                report.delivery,
            )
        elif verdict is not Verdict.APPLIED:  # normal after a restart: reports come again
            log.debug(
                "%s %s report for %s.%s attempt %d ignored",
                verdict,
                "started" if isinstance(report, TaskStarted) else "finished",
                report.workflow_id,
                report.task_id,
                report.attempt,
            )
