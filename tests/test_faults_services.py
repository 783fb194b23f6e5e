"""kill -9 of each service in the middle of workflows, then a restart: every workflow reaches its
end state with no task lost and none completed twice; a task whose executors keep dying ends
``failed`` with reason ``max_deliveries``.

The scheduler alone (killed twice) is in test_workflows_recovery.py, an executor killed with a
survivor to take over in test_executor_delivery.py, a standby scheduler in test_scheduler_ha.py;
the chaos test below kills all of them at random, many times."""

from __future__ import annotations

import random
import signal
import threading
import time
from typing import Any

import pytest

from .faults import Audit, audit_workflow, server, sleep, submit_retrying
from .support import (
    Service,
    Stack,
    nats_run,
    running_executor,
    task_of,
    task_record,
    wait_until,
)

pytestmark = pytest.mark.e2e

ACK_WAIT = {"PROVISIONING_EXECUTOR_ACK_WAIT_SECONDS": "3"}


def _completed(stack: Stack, wf_id: str, task_ids: list[str]) -> int:
    """Completed tasks of a workflow, read from the checkpoints (no gateway needed)."""
    from shared import subjects
    from shared.messages import decode_task

    async def body(nc: Any) -> int:
        kv = await nc.jetstream().key_value(subjects.BUCKET_TASKS)
        records = [decode_task((await kv.get(f"{wf_id}.{t}")).value) for t in task_ids]
        return sum(r.status == "completed" for r in records)

    return int(nats_run(stack.nats.url, body))


def _counts(stack: Stack, wf_id: str) -> dict[str, int]:
    status, view = stack.http.get(f"/workflows/{wf_id}")
    return dict(view["counts"]) if status == 200 else {}


@pytest.mark.stack(executors=2, env=ACK_WAIT)
def test_kill9_each_service_mid_workflow_then_restart(stack: Stack) -> None:
    audit = Audit()
    tasks = [sleep("long", 4)]
    for c in range(3):
        tasks += [sleep(f"c{c}-{i}", 0.6, *([f"c{c}-{i - 1}"] if i else [])) for i in range(5)]
    tasks += [
        server("srv", "kill9-1", 1.5, "c0-1"),
        sleep("join", 0, "long", "srv", *(f"c{c}-4" for c in range(3))),
    ]
    wf_id = submit_retrying(stack.http, {"name": "kill9", "tasks": tasks}, "kill9-main")
    flaky = submit_retrying(
        stack.http,
        {
            "name": "flaky",
            "tasks": [
                {
                    "id": "f",
                    "action": "builtin.fail",
                    "retries": 2,
                    "backoff": {"initial_seconds": 1, "multiplier": 1},
                }
            ],
        },
        "kill9-flaky",
    )

    # 1. the gateway: work goes on without it; it serves the same answers once back
    victim = running_executor(stack, wf_id, "long")
    stack.gateway.kill9()
    audit.fault("kill -9 gateway")
    ids = [t["id"] for t in tasks]
    done = _completed(stack, wf_id, ids)
    wait_until(
        lambda: _completed(stack, wf_id, ids) > done,
        30,
        what="tasks to complete while the gateway is down",
    )
    stack.gateway.start()
    stack.http.wait_healthy(30)

    # 2. the executor running "long": its attempt is redelivered after the ack wait
    assert task_of(stack.http, wf_id, "long")["status"] == "running"
    victim.kill9()
    audit.fault("kill -9 executor")
    victim.start()

    # 3. the scheduler, with reports, retries and dispatches in flight
    wait_until(lambda: _counts(stack, wf_id).get("completed", 0) >= 8, 60, what="8 tasks done")
    stack.scheduler.kill9()
    audit.fault("kill -9 scheduler")
    time.sleep(1)
    stack.scheduler.start()

    view = audit_workflow(stack, wf_id, audit, timeout=90)
    assert task_record(stack, wf_id, "long").delivery == 2  # the kill hit it mid-run
    srv = next(t for t in view["tasks"] if t["id"] == "srv")
    assert srv["output"]["existed"] is False  # its side effect happened once
    audit_workflow(stack, flaky, audit, status="failed", attempts={"f": 3})
    audit.report("kill9 each service")


@pytest.mark.stack(
    env={
        "PROVISIONING_EXECUTOR_ACK_WAIT_SECONDS": "3",
        "PROVISIONING_EXECUTOR_MAX_DELIVERIES": "2",
    }
)
def test_task_whose_executor_keeps_dying_fails_with_max_deliveries(stack: Stack) -> None:
    """Deterministic: the only executor is killed while it runs the task, twice (deliveries 1
    and 2); the third delivery is over the limit and the task fails for good."""
    audit = Audit()
    wf_id = submit_retrying(
        stack.http,
        {
            "name": "doomed",
            "tasks": [
                sleep("doomed", 60, retries=3),  # max_deliveries is not retried
                sleep("after", 0, "doomed"),
            ],
        },
        "doomed",
    )
    executor = stack.executors[0]
    for delivery in (1, 2):
        wait_until(
            lambda d=delivery: (
                (r := task_record(stack, wf_id, "doomed")).status == "running" and r.delivery == d
            ),
            60,
            what=f"delivery {delivery} to run",
        )
        executor.kill9()
        audit.fault("kill -9 executor")
        executor.start()

    view = audit_workflow(
        stack, wf_id, audit, status="failed", attempts={"doomed": 1, "after": 0}, timeout=60
    )
    tasks = {t["id"]: t for t in view["tasks"]}
    doomed = tasks["doomed"]
    assert doomed["status"] == "failed" and doomed["reason"] == "max_deliveries", doomed
    assert "delivered 3 times" in doomed["error"], doomed
    assert doomed["attempts"][0]["reason"] == "max_deliveries"
    assert tasks["after"]["status"] == "skipped"
    assert task_of(stack.http, wf_id, "doomed")["reason"] == "max_deliveries"
    assert f"{wf_id}.doomed attempt 1 delivered 3 times without a result; failing it" in (
        executor.log()
    )
    audit.report("max deliveries")


# -- chaos ---------------------------------------------------------------------------------------


def _shapes(n: int) -> tuple[dict[str, Any], str, dict[str, int], dict[str, str]]:
    """Workflow ``n`` of the chaos test: its definition, expected status, attempts and task
    statuses (tasks not named: completed after one attempt)."""
    kind = n % 4
    if kind == 0:
        tasks = [sleep(f"s{i}", 0.8, *([f"s{i - 1}"] if i else [])) for i in range(6)]
        return {"name": f"chain-{n}", "tasks": tasks}, "completed", {}, {}
    if kind == 1:
        fan = [sleep(f"f{i}", 2.0, "root") for i in range(8)]
        tasks = [sleep("root", 1.0), *fan, sleep("join", 0, *(f["id"] for f in fan))]
        return {"name": f"fan-{n}", "tasks": tasks}, "completed", {}, {}
    if kind == 2:
        tasks = [
            server("a", f"chaos-{n}-a", 1.5),
            server("b", f"chaos-{n}-b", 1.5, "a"),
            sleep("c", 0.5, "b"),
        ]
        return {"name": f"nu-{n}", "tasks": tasks}, "completed", {}, {}
    tasks = [
        {
            "id": "bad",
            "action": "builtin.fail",
            "retries": 2,
            "backoff": {"initial_seconds": 1.5, "multiplier": 1},
        },
        sleep("after-bad", 0, "bad"),
        sleep("x", 1.5),
        sleep("y", 1.5, "x"),
    ]
    definition = {"name": f"flaky-{n}", "on_failure": "continue", "tasks": tasks}
    attempts = {"bad": 3, "after-bad": 0}
    return definition, "failed", attempts, {"bad": "failed", "after-bad": "skipped"}


class Chaos(threading.Thread):
    """kill -9 a random service every second or few, restart it after a moment; once in the
    middle, all of them at once."""

    def __init__(self, stack: Stack, audit: Audit, seconds: float, seed: int) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.audit = audit
        self.until = time.monotonic() + seconds
        self.rng = random.Random(seed)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            everything_at = time.monotonic() + (self.until - time.monotonic()) / 2
            while time.monotonic() < self.until:
                if everything_at and time.monotonic() >= everything_at:
                    everything_at = 0
                    victims = list(self.stack.services)
                    self.audit.fault("kill -9 all services at once")
                else:
                    victims = [self.rng.choice(self.stack.services)]
                    self.audit.fault(f"kill -9 {victims[0].name.split('-')[0]}")
                for victim in victims:
                    victim.kill9()
                time.sleep(self.rng.uniform(0.2, 1.5))
                for victim in victims:
                    victim.start()
                time.sleep(self.rng.uniform(1.0, 3.0))
        except BaseException as exc:  # pragma: no cover - reported by the test
            self.error = exc


@pytest.mark.slow
@pytest.mark.stack(executors=3, env={**ACK_WAIT, "PROVISIONING_EXECUTOR_MAX_DELIVERIES": "50"})
def test_chaos_kill9_random_services(stack: Stack) -> None:
    audit = Audit()
    chaos = Chaos(stack, audit, seconds=50, seed=8)
    expected: dict[str, tuple[str, dict[str, int], dict[str, str]]] = {}
    chaos.start()
    for n in range(24):  # submissions keep coming while services die
        definition, status, attempts, statuses = _shapes(n)
        wf_id = submit_retrying(stack.http, definition, f"chaos-{n}", timeout=120)
        expected[wf_id] = (status, attempts, statuses)
        time.sleep(1.5)
    chaos.join()
    assert chaos.error is None, chaos.error
    for service in stack.services:
        assert service.alive, service.name
    stack.http.wait_healthy(30)

    for wf_id, (status, attempts, statuses) in expected.items():
        view = audit_workflow(stack, wf_id, audit, status=status, attempts=attempts, timeout=180)
        for task in view["tasks"]:
            assert task["status"] == statuses.get(task["id"], "completed"), task
            if task["action"] == "server.create":
                assert task["output"]["existed"] is False, task
    assert audit.workflows == len(expected) == 24
    audit.report("chaos kill -9")


@pytest.mark.slow
@pytest.mark.stack(executors=2)
def test_paused_scheduler_loses_its_lease_and_stands_by(stack: Stack) -> None:
    """SIGSTOP the active scheduler past its lease: the standby takes over; the paused one,
    resumed, writes nothing, steps down and stands by in the same process, and takes over in
    turn when the other is killed. The workflow runs through both hand-overs exactly once."""
    audit = Audit()
    first = stack.scheduler
    wait_until(lambda: "scheduler running" in first.log(), 30, what="the first scheduler")
    standby = Service("scheduler-2", ["scheduler"], stack.env, stack.log_dir).start()
    try:
        wait_until(lambda: "standing by" in standby.log(), 30, what="the standby")
        tasks = [sleep(f"s{i}", 1.0, *([f"s{i - 1}"] if i else [])) for i in range(14)]
        tasks += [sleep(f"p{i}", 3.0, "s2") for i in range(4)]
        wf_id = submit_retrying(stack.http, {"name": "paused", "tasks": tasks}, "paused")
        wait_until(lambda: _counts(stack, wf_id).get("completed", 0) >= 2, 30, what="progress")

        first.signal(signal.SIGSTOP)
        audit.fault("SIGSTOP active scheduler past its lease")
        try:
            wait_until(lambda: "scheduler running" in standby.log(), 30, what="the takeover")
        finally:
            first.signal(signal.SIGCONT)
        wait_until(
            lambda: "standing by again" in first.log(), 30, what="the paused one to step down"
        )
        assert first.alive

        standby.kill9()
        audit.fault("kill -9 active scheduler")
        wait_until(
            lambda: first.log().count("scheduler running") == 2, 30, what="the first to return"
        )
        audit_workflow(stack, wf_id, audit, timeout=90)
    finally:
        standby.stop()
    audit.report("paused scheduler")
