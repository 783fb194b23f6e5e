"""The workflow engine as a specification: every transition and fencing rule, in process.

No NATS, no processes: inputs go in as calls, effects come out as data, and each test reads
as one rule of docs/workflows.md.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from engine import Effects, Engine, Verdict
from engine.engine import CANCELLED_NOTE, STOPPED_NOTE
from shared.ids import new_workflow_id
from shared.messages import (
    SubmitWorkflow,
    TaskFinished,
    TaskHandedBack,
    TaskRecord,
    TaskStarted,
    WorkflowDefinition,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Run:
    """One workflow driven through an engine, with the effects of each input kept."""

    def __init__(self, tasks: list[dict[str, Any]], slots: int = 10, **definition: Any) -> None:
        self.engine = Engine(timeout_for=lambda spec: spec.timeout_seconds or 60.0)
        self.engine.set_capacity({"default": slots})
        body = {"name": "spec", "tasks": tasks, **definition}
        self.definition = msgspec.convert(body, WorkflowDefinition)
        self.wf = new_workflow_id()
        self.now = T0
        self.log: list[Effects] = []

    def accept(self, *, cancelled: str | None = None) -> Effects:
        command = SubmitWorkflow(self.wf, self.definition, self.now)
        self.engine.accept(command, self.now, cancelled=cancelled)
        return self.step()

    def step(self) -> Effects:
        self.engine.pump(self.now)
        effects = self.engine.take()
        self.log.append(effects)
        return effects

    def task(self, task_id: str) -> TaskRecord:
        state = self.engine.get(self.wf) or self.log[-1].ended[self.wf]
        return state.tasks[task_id]

    @property
    def record(self) -> Any:
        state = self.engine.get(self.wf) or next(
            e.ended[self.wf] for e in reversed(self.log) if self.wf in e.ended
        )
        return state.record

    def started(self, task_id: str, *, delivery: int = 1, attempt: int | None = None) -> Verdict:
        attempt = attempt or self.task(task_id).attempt
        report = TaskStarted(self.wf, task_id, attempt, delivery, "ex-1", self.now)
        return self.engine.report(report, self.now)

    def finished(
        self,
        task_id: str,
        outcome: str = "completed",
        *,
        delivery: int = 1,
        attempt: int | None = None,
        reason: str | None = None,
        retryable: bool = True,
        output: Any = None,
    ) -> Verdict:
        attempt = attempt or self.task(task_id).attempt
        report = TaskFinished(
            workflow_id=self.wf,
            task_id=task_id,
            attempt=attempt,
            delivery=delivery,
            executor_id="ex-1",
            outcome=outcome,  # type: ignore[arg-type]
            started_at=self.now,
            finished_at=self.now,
            reason=reason or ("error" if outcome == "failed" else None),  # type: ignore[arg-type]
            error="boom" if outcome == "failed" else None,
            output=output,
            retryable=retryable,
        )
        return self.engine.report(report, self.now)

    def run(self, task_id: str, outcome: str = "completed", **kw: Any) -> Effects:
        """Start and finish one task's current attempt, then end the step."""
        assert self.started(task_id) is Verdict.APPLIED
        assert self.finished(task_id, outcome, **kw) is Verdict.APPLIED
        return self.step()

    def retry(self, runs: int) -> bool:
        """A retry of the ended run, from its checkpoints (as the scheduler loads them)."""
        record = self.record
        state = self.engine.get(self.wf) or next(
            e.ended[self.wf] for e in reversed(self.log) if self.wf in e.ended
        )
        return self.engine.retry(self.wf, runs, self.now, loaded=(record, dict(state.tasks)))

    def statuses(self) -> dict[str, str]:
        return {t: self.task(t).status for t in self.record.task_ids}


def noop(task_id: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"id": task_id, "action": "builtin.noop", "depends_on": list(deps), **extra}


def dispatched(effects: Effects) -> list[str]:
    return [d.message.task_id for d in effects.dispatches]


# -- readiness, priority and capacity --------------------------------------------------------------


def test_only_tasks_whose_dependencies_completed_are_dispatched() -> None:
    run = Run([noop("a"), noop("b", "a"), noop("c", "a", "b")])
    assert dispatched(run.accept()) == ["a"]
    assert dispatched(run.run("a")) == ["b"]
    assert dispatched(run.run("b")) == ["c"]
    effects = run.run("c")
    assert run.record.status == "completed" and run.wf in effects.ended


def test_higher_priority_goes_first_when_capacity_is_short() -> None:
    run = Run([noop("low", priority=1), noop("high", priority=9), noop("mid", priority=5)], slots=1)
    assert dispatched(run.accept()) == ["high"]
    assert dispatched(run.run("high")) == ["mid"]
    assert dispatched(run.run("mid")) == ["low"]


def test_nothing_is_dispatched_beyond_capacity_until_it_grows() -> None:
    run = Run([noop(f"t{i}") for i in range(5)], slots=2)
    assert len(run.accept().dispatches) == 2
    run.engine.set_capacity({"default": 4})
    assert len(run.step().dispatches) == 2
    assert run.engine.inflight["default"] == 4


def test_a_dispatch_is_checkpointed_with_its_new_attempt() -> None:
    run = Run([noop("a", timeout_seconds=7)])
    effects = run.accept()
    message = effects.dispatches[0].message
    assert (message.attempt, message.timeout_seconds, message.action) == (1, 7, "builtin.noop")
    assert run.task("a").status == "queued" and run.task("a").attempt == 1
    assert run.wf in effects.created  # a new workflow: its records are written whole
    assert effects.created[run.wf].record.counts == {"queued": 1}


# -- fencing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "prepare", "report", "verdict"),
    [
        ("another attempt", "started", {"attempt": 2}, Verdict.STALE),
        ("duplicate start", "started", {"kind": "started", "delivery": 1}, Verdict.STALE),
        ("older delivery's start", "started@2", {"kind": "started", "delivery": 1}, Verdict.FENCED),
        ("older delivery's result", "started@2", {"delivery": 1}, Verdict.FENCED),
        ("result after the end", "completed", {}, Verdict.STALE),
        ("unknown task", "started", {"task": "nope"}, Verdict.UNKNOWN),
    ],
)
def test_reports_are_fenced_by_attempt_and_delivery(
    case: str, prepare: str, report: dict[str, Any], verdict: Verdict
) -> None:
    run = Run([noop("a"), noop("b")])
    run.accept()
    delivery = 2 if prepare.endswith("@2") else 1
    run.started("a", delivery=delivery)
    if prepare == "completed":
        run.finished("a")
    run.step()
    before = run.task("a").status
    task = report.get("task", "a")
    attempt = report.get("attempt", 1)
    if report.get("kind") == "started":
        got = run.engine.report(
            TaskStarted(run.wf, task, attempt, report["delivery"], "ex-2", run.now), run.now
        )
    else:
        got = run.engine.report(
            TaskFinished(
                workflow_id=run.wf,
                task_id=task,
                attempt=attempt,
                delivery=report.get("delivery", delivery),
                executor_id="ex-2",
                outcome="failed",
                started_at=run.now,
                finished_at=run.now,
            ),
            run.now,
        )
    assert got is verdict, case
    assert run.task("a").status == before  # a fenced report changes nothing
    assert not run.step().tasks


def test_a_later_delivery_takes_a_running_task_over() -> None:
    run = Run([noop("a")])
    run.accept()
    run.started("a", delivery=1)
    assert run.started("a", delivery=2) is Verdict.APPLIED
    assert run.task("a").delivery == 2
    assert run.finished("a", delivery=1) is Verdict.FENCED
    assert run.finished("a", delivery=2) is Verdict.APPLIED


def test_reports_for_an_unknown_workflow_are_unknown() -> None:
    run = Run([noop("a")])
    other = TaskStarted(new_workflow_id(), "a", 1, 1, "ex", run.now)
    assert run.engine.report(other, run.now) is Verdict.UNKNOWN


# -- retries ---------------------------------------------------------------------------------------


def test_a_failed_attempt_is_retried_after_its_backoff_while_retries_last() -> None:
    backoff = {"initial_seconds": 2, "multiplier": 3, "max_seconds": 100}
    run = Run([noop("a", retries=2, backoff=backoff)])
    run.accept()
    effects = run.run("a", "failed")
    assert run.task("a").status == "retrying"
    assert [(t.task_id, t.attempt, t.at) for t in effects.timers] == [("a", 1, at(2))]
    run.engine.retry_due(run.wf, "a", 1, at(2))
    run.now = at(2)
    assert dispatched(run.step()) == ["a"] and run.task("a").attempt == 2
    effects = run.run("a", "failed")
    assert effects.timers[0].at == at(2 + 6)  # 2 * 3 ** 1
    run.engine.retry_due(run.wf, "a", 2, at(8))
    run.step()
    run.run("a", "failed")
    assert run.task("a").status == "failed" and run.task("a").attempt == 3
    assert run.record.status == "failed"


@pytest.mark.parametrize(
    ("reason", "retryable"), [("refused", True), ("cancelled", True), ("max_deliveries", False)]
)
def test_refusals_cancellations_and_exhausted_deliveries_are_not_retried(
    reason: str, retryable: bool
) -> None:
    run = Run([noop("a", retries=5)])
    run.accept()
    run.run("a", "failed", reason=reason, retryable=retryable)
    assert run.task("a").status == "failed" and run.task("a").attempt == 1


def test_a_stale_retry_timer_changes_nothing() -> None:
    run = Run([noop("a", retries=1)])
    run.accept()
    run.run("a", "failed")
    run.engine.retry_due(run.wf, "a", 7, run.now)  # not the current attempt
    assert run.task("a").status == "retrying"


# -- failure policies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("stop", {"a": "completed", "b": "failed", "c": "cancelled"}),
        ("continue", {"a": "completed", "b": "failed", "c": "completed"}),
    ],
)
def test_a_failure_stops_or_lets_the_rest_go_on(policy: str, expected: dict[str, str]) -> None:
    """The issue's example: a runs, b fails, c waits for a."""
    run = Run([noop("a"), noop("b"), noop("c", "a")], on_failure=policy)
    run.accept()
    run.started("a")
    run.run("b", "failed")
    assert run.task("a").status == "running"  # a stop lets running tasks finish
    run.finished("a")
    if policy == "continue":
        assert dispatched(run.step()) == ["c"]
        run.run("c")
    else:
        run.step()
        assert "stopped" in (run.task("c").error or "")
    assert run.statuses() == expected
    assert run.record.status == "failed"


def test_the_tasks_behind_a_failure_are_skipped() -> None:
    run = Run([noop("a"), noop("b", "a"), noop("c", "b"), noop("d")], on_failure="continue")
    run.accept()
    run.run("a", "failed")
    run.run("d")
    assert run.statuses() == {"a": "failed", "b": "skipped", "c": "skipped", "d": "completed"}
    assert run.task("c").reason == "dependency_failed"


def test_a_stop_asks_dispatched_tasks_not_to_start_but_lets_a_started_one_finish() -> None:
    run = Run([noop("a"), noop("b"), noop("c")], on_failure="stop")
    run.accept()
    effects = run.run("a", "failed")
    assert run.task("b").status == run.task("c").status == "cancelling"
    assert run.task("b").cancel_requested and not effects.kills  # no kill: a stop lets run
    run.started("b")  # it had started after all
    assert run.task("b").status == "running" and not run.task("b").cancel_requested
    run.finished("b")
    run.finished("c", "cancelled", reason="cancelled")  # the executor never started it
    run.step()
    assert run.statuses() == {"a": "failed", "b": "completed", "c": "cancelled"}
    assert run.task("b").note == STOPPED_NOTE
    assert run.record.status == "failed"


def test_no_retry_starts_once_a_run_is_stopped() -> None:
    run = Run([noop("a"), noop("b", retries=3)], on_failure="stop")
    run.accept()
    run.started("b")
    run.run("a", "failed")
    run.finished("b", "failed")
    run.step()
    assert run.task("b").status == "failed" and run.task("b").attempt == 1


# -- cancellation ----------------------------------------------------------------------------------


def test_cancel_ends_what_did_not_start_and_asks_executors_about_the_rest() -> None:
    run = Run([noop("queued"), noop("running"), noop("later", "running")], slots=10)
    run.accept()
    run.started("running")
    run.step()
    assert run.engine.cancel(run.wf, "by request", run.now)
    effects = run.step()
    assert run.statuses() == {"queued": "cancelling", "running": "cancelling", "later": "cancelled"}
    assert sorted(effects.kills[run.wf]) == ["queued", "running"]
    assert run.record.status == "running" and run.record.cancel_requested
    assert not run.engine.cancel(run.wf, "again", run.now)  # one cancel is enough


def test_a_task_that_finished_after_the_cancel_is_completed_with_a_note() -> None:
    """What the API says ran is what ran: a retry must not run it again."""
    run = Run([noop("done-anyway"), noop("stopped"), noop("never-started")])
    run.accept()
    run.started("done-anyway")
    run.started("stopped")
    run.engine.cancel(run.wf, "by request", run.now)
    run.step()
    run.finished("done-anyway", output={"ip": "10.0.0.1"})
    run.finished("stopped", "cancelled", reason="cancelled")
    run.finished("never-started", "cancelled", reason="cancelled")
    effects = run.step()
    assert run.statuses() == {
        "done-anyway": "completed",
        "stopped": "cancelled",
        "never-started": "cancelled",
    }
    assert run.task("done-anyway").note == CANCELLED_NOTE
    assert run.task("done-anyway").output == {"ip": "10.0.0.1"}
    assert run.record.status == "cancelled" and run.wf in effects.ended
    # a retry re-runs the cancelled tasks only
    assert run.retry(1)
    assert sorted(dispatched(run.step())) == ["never-started", "stopped"]
    assert run.task("done-anyway").status == "completed"


def test_a_cancel_waiting_behind_the_submission_dispatches_nothing() -> None:
    run = Run([noop("a"), noop("b", "a")])
    effects = run.accept(cancelled="cancelled before it was taken")
    assert not effects.dispatches
    assert run.statuses() == {"a": "cancelled", "b": "cancelled"}
    assert run.record.status == "cancelled" and run.wf in effects.ended


def test_a_started_report_for_a_cancelling_task_sends_the_kill_again() -> None:
    run = Run([noop("a")])
    run.accept()
    run.engine.cancel(run.wf, "by request", run.now)
    run.step()
    run.started("a")  # it started before the kill reached the executor
    effects = run.step()
    assert run.task("a").status == "cancelling" and effects.kills[run.wf] == ["a"]


# -- hand-backs ------------------------------------------------------------------------------------


def test_a_graceful_hand_back_requeues_the_attempt_without_failing_it() -> None:
    run = Run([noop("a")])
    run.accept()
    run.started("a", delivery=1)
    back = TaskHandedBack(run.wf, "a", 1, 1, "ex-1", run.now)
    assert run.engine.report(back, run.now) is Verdict.APPLIED
    assert run.task("a").status == "queued" and run.task("a").handbacks == 1
    assert run.engine.report(back, run.now) is Verdict.STALE  # counted once
    assert run.started("a", delivery=2) is Verdict.APPLIED
    assert run.finished("a", delivery=2) is Verdict.APPLIED
    run.step()
    assert run.task("a").status == "completed" and run.task("a").attempt == 1


# -- retry of a finished run -----------------------------------------------------------------------


def test_retry_reruns_failed_cancelled_and_skipped_tasks_with_a_fresh_budget() -> None:
    run = Run([noop("ok"), noop("bad", retries=1), noop("after", "bad")], on_failure="continue")
    run.accept()
    run.run("ok")
    run.run("bad", "failed")
    run.engine.retry_due(run.wf, "bad", 1, run.now)
    run.step()
    run.run("bad", "failed")
    assert run.statuses() == {"ok": "completed", "bad": "failed", "after": "skipped"}
    assert not run.retry(5)  # not the run it follows: ignored
    assert run.retry(1)
    assert dispatched(run.step()) == ["bad"]
    assert run.record.runs == 2 and run.record.status == "queued"
    run.run("bad", "failed")  # attempt 3, but the first of this run: it has its retry again
    assert run.task("bad").status == "retrying"


def test_retry_of_a_workflow_that_has_not_ended_is_ignored() -> None:
    run = Run([noop("a")])
    run.accept()
    assert not run.engine.retry(run.wf, 1, run.now)


# -- recovery from checkpoints ---------------------------------------------------------------------


def test_adopted_workflows_resume_where_their_checkpoints_stopped() -> None:
    run = Run([noop("busy"), noop("backoff", retries=1), noop("ready"), noop("after", "busy")])
    run.accept()
    run.started("busy")
    run.started("backoff")
    run.finished("backoff", "failed")
    run.step()
    state = run.engine.get(run.wf)
    assert state is not None
    # a new engine, as after a scheduler restart, from copies of the checkpoints
    record = msgspec.convert(msgspec.to_builtins(state.record), type(state.record))
    tasks = {k: msgspec.convert(msgspec.to_builtins(v), TaskRecord) for k, v in state.tasks.items()}
    tasks["ready"].status = "pending"  # dispatched in memory, never checkpointed
    tasks["ready"].attempt = 0
    fresh = Engine(timeout_for=lambda spec: 60.0)
    fresh.set_capacity({"default": 10})
    busy = fresh.adopt(record, tasks, run.now)
    assert busy == ["busy"]  # the driver checks its dispatch is still out there
    fresh.pump(run.now)
    effects = fresh.take()
    assert [d.message.task_id for d in effects.dispatches] == ["ready"]
    assert [(t.task_id, t.attempt) for t in effects.timers] == [("backoff", 1)]
    fresh.redispatch(run.wf, "busy", run.now)
    again = fresh.take().dispatches[0].message
    assert (again.task_id, again.attempt) == ("busy", 1)  # same attempt, same message id


def test_an_adopted_workflow_whose_tasks_all_ended_is_finished() -> None:
    run = Run([noop("a")])
    run.accept()
    state = run.engine.get(run.wf)
    assert state is not None
    state.tasks["a"].status = "completed"
    fresh = Engine(timeout_for=lambda spec: 60.0)
    fresh.adopt(state.record, {"a": state.tasks["a"]}, run.now)
    effects = fresh.take()
    assert effects.ended[run.wf].record.status == "completed"


# -- records ---------------------------------------------------------------------------------------


def test_the_workflow_record_carries_its_counts_per_status() -> None:
    run = Run([noop("a"), noop("b"), noop("c", "a")], on_failure="continue")
    run.accept()
    effects = run.run("a")
    assert effects.workflows[run.wf].record.counts == {"completed": 1, "queued": 2}
    run.run("b", "failed")
    assert run.record.counts == {"completed": 1, "failed": 1, "queued": 1}


def test_the_first_start_makes_the_workflow_running() -> None:
    run = Run([noop("a")])
    run.accept()
    assert run.record.status == "queued"
    run.started("a")
    effects = run.step()
    assert run.record.status == "running" and run.record.started_at == run.now
    assert [e.status for e in effects.events] == ["running", "running"]


# -- ends told again after a crash -----------------------------------------------------------------


def _ends(effects: Effects) -> dict[str, str]:
    """Message id of every end event of a step: ``{id: "<task or workflow> <status>"}``."""
    return {
        mid: f"{getattr(e, 'task_id', e.workflow_id)} {e.status}"
        for e, mid in zip(effects.events, effects.event_ids, strict=True)
        if mid is not None
    }


def test_ends_replayed_from_checkpoints_carry_the_ids_they_were_first_told_with() -> None:
    """A scheduler that dies between a step's checkpoints and its events: its successor tells
    the recent ends again from the checkpoints, under the ids of the first telling (JetStream
    stores each id once), and nothing but ends."""
    run = Run([noop("a"), noop("b", "a")])
    run.accept()
    first = _ends(run.run("a"))
    assert list(first.values()) == ["a completed"]
    told = {**first, **_ends(run.run("b"))}
    assert sorted(told.values()) == [f"{run.wf} completed", "a completed", "b completed"]

    state = run.log[-1].ended[run.wf]
    fresh = Engine(timeout_for=lambda spec: 60.0)
    fresh.replay_ends(state.record, state.tasks, since=run.now - timedelta(seconds=60))
    replayed = fresh.take()
    assert _ends(replayed) == told
    assert run.wf in replayed.ended  # ended again, after its events
    # nothing older than the window is told again
    fresh.replay_ends(state.record, state.tasks, since=run.now + timedelta(seconds=1))
    assert not fresh.take().events


def test_a_task_run_again_ends_under_a_new_id() -> None:
    """A retried workflow runs a failed task again: its new end is a new event, not a repeat
    of the first one that deduplication would drop."""
    run = Run([noop("a", retries=0)], on_failure="continue")
    run.accept()
    first = _ends(run.run("a", "failed"))
    run.now = at(10)
    assert run.retry(1)
    run.step()
    second = _ends(run.run("a", "completed"))
    assert "a failed" in first.values() and "a completed" in second.values()
    assert not set(first) & set(second)
