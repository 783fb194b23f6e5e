"""NATS itself failing: restarted (SIGTERM or kill -9, same port, same file store) in the middle
of workflows, down for longer than the scheduler's lease and the executors' ack wait, or not
there yet when the services start. The services ride it out by themselves (same processes),
``/health`` says 503 meanwhile, and every workflow reaches its end state exactly once."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from shared import subjects
from shared.messages import TaskDispatch, encode

from .faults import Audit, audit_workflow, server, sleep, submit_retrying
from .support import (
    NatsServer,
    Stack,
    dispatch_backlog,
    publish,
    task_record,
    wait_until,
    workflow_events,
)

pytestmark = pytest.mark.e2e

# Longer than any outage below: a task running while NATS is away keeps its delivery (its
# executor's keep-alives resume on reconnection). An outage longer than the ack wait means a
# redelivery, and an attempt that may run twice, though it is reported completed once.
ACK_WAIT = {"PROVISIONING_EXECUTOR_ACK_WAIT_SECONDS": "20"}


def _pids(stack: Stack) -> dict[str, int]:
    return {s.name: s.proc.pid for s in stack.services if s.proc is not None}


def _workload(stack: Stack, tag: str) -> dict[str, tuple[str, dict[str, int]]]:
    """Three workflows in flight: chains and a fan of sleeps, Nushell side effects, and a task
    that fails and is retried with a backoff. Returns {id: (expected status, attempts)}."""
    tasks: list[dict[str, Any]] = [sleep("long", 5)]
    for c in range(2):
        tasks += [sleep(f"c{c}-{i}", 0.8, *([f"c{c}-{i - 1}"] if i else [])) for i in range(6)]
    tasks += [sleep(f"f{i}", 1.5, "c0-0") for i in range(6)]
    tasks.append(sleep("join", 0, "long", "c0-5", "c1-5", *(f"f{i}" for i in range(6))))
    nu = [server("a", f"{tag}-a", 1.0), server("b", f"{tag}-b", 1.0, "a")]
    flaky = [
        {
            "id": "bad",
            "action": "builtin.fail",
            "retries": 3,
            "backoff": {"initial_seconds": 1.5, "multiplier": 1},
        }
    ]
    return {
        submit_retrying(stack.http, {"name": "dag", "tasks": tasks}, f"{tag}-dag"): (
            "completed",
            {},
        ),
        submit_retrying(stack.http, {"name": "nu", "tasks": nu}, f"{tag}-nu"): ("completed", {}),
        submit_retrying(stack.http, {"name": "flaky", "tasks": flaky}, f"{tag}-flaky"): (
            "failed",
            {"bad": 4},
        ),
    }


def _running(stack: Stack, wf_id: str) -> bool:
    status, view = stack.http.get(f"/workflows/{wf_id}")
    return status == 200 and view["counts"].get("running", 0) > 0


def _unhealthy(stack: Stack) -> bool:
    status, body = stack.http.get("/health", timeout=5)
    return status == 503 and body["status"] == "unhealthy"


@pytest.mark.stack(executors=2, env=ACK_WAIT)
def test_nats_restarts_mid_workflow(stack: Stack) -> None:
    audit = Audit()
    pids = _pids(stack)
    for n, sig in enumerate((signal.SIGTERM, signal.SIGKILL)):
        expected = _workload(stack, f"restart{n}")
        first = next(iter(expected))
        wait_until(lambda w=first: _running(stack, w), 30, what="tasks running")
        stack.nats.stop(sig)
        audit.fault(f"NATS restart ({signal.Signals(sig).name})")
        wait_until(lambda: _unhealthy(stack), 20, what="/health to say unhealthy")
        time.sleep(2)
        stack.nats.start()  # same port, same store
        stack.http.wait_healthy(30)
        for wf_id, (status, attempts) in expected.items():
            audit_workflow(stack, wf_id, audit, status=status, attempts=attempts, timeout=120)
    assert _pids(stack) == pids  # nobody restarted them: they reconnected by themselves
    audit.report("NATS restarts")


def test_services_started_before_nats_wait_for_it(tmp_path: Path, nats_server: NatsServer) -> None:
    nats_server.stop()  # its port and store stay: started again below
    stack = Stack(tmp_path, nats_server, executors=1)
    try:
        for service in stack.services:
            service.start()
        wait_until(lambda: _unhealthy(stack), 30, what="the gateway to answer 503")
        status, body = stack.http.get("/health")
        assert body["nats"]["connected"] is False, body
        status, body = stack.http.post("/workflows", {"name": "x", "tasks": []})
        assert status == 503 and body["error"]["code"] == "bus_unavailable", body
        time.sleep(3)  # they keep waiting, they do not give up
        assert all(s.alive for s in stack.services), stack.logs()
        for service in (stack.scheduler, *stack.executors):
            assert "not reachable" in service.log(), service.name

        nats_server.start()
        stack.http.wait_healthy(30)
        wait_until(stack.executors_alive, 30, what="the executor to announce itself")
        audit = Audit()
        audit.fault("NATS absent at start")
        wf_id = submit_retrying(
            stack.http,
            {"name": "late", "tasks": [sleep("a", 0.2), server("b", "late-1", 0, "a")]},
            "late",
        )
        audit_workflow(stack, wf_id, audit)
        audit.report("NATS absent at start")
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


@pytest.mark.slow
@pytest.mark.stack(executors=2, env=ACK_WAIT)
def test_nats_down_longer_than_lease_and_ack_wait(stack: Stack) -> None:
    """kill -9 of NATS for 12 s, twice: longer than the scheduler's lease (6 s), so the lone
    scheduler loses it and takes it back by itself; the tasks that ran meanwhile finish, and
    their results reach the scheduler, exactly once."""
    audit = Audit()
    pids = _pids(stack)
    for n in range(2):
        expected = _workload(stack, f"down{n}")
        first = next(iter(expected))
        wait_until(lambda w=first: _running(stack, w), 30, what="tasks running")
        stack.nats.stop(signal.SIGKILL)
        audit.fault("NATS down 12 s (kill -9)")
        wait_until(lambda: _unhealthy(stack), 20, what="/health to say unhealthy")
        time.sleep(12)
        stack.nats.start()
        stack.http.wait_healthy(30)
        for wf_id, (status, attempts) in expected.items():
            audit_workflow(stack, wf_id, audit, status=status, attempts=attempts, timeout=180)
    assert _pids(stack) == pids
    audit.report("NATS down past lease")


@pytest.mark.stack(executors=1, env={"PROVISIONING_EXECUTOR_ACK_WAIT_SECONDS": "3"})
def test_nats_outage_longer_than_ack_wait_does_not_run_a_task_twice(stack: Stack) -> None:
    """NATS away for longer than the ack wait while tasks run: their keep-alives are lost and
    JetStream redelivers them, to the executor that still runs them. It keeps the redelivery
    with the run in hand: one run, one result."""
    audit = Audit()
    tasks = [sleep("long", 9), server("nu", "outage-1", 7)]
    wf_id = submit_retrying(stack.http, {"name": "outage", "tasks": tasks}, "outage")
    wait_until(
        lambda: stack.http.get(f"/workflows/{wf_id}")[1]["counts"].get("running", 0) == 2,
        30,
        what="both tasks running",
    )
    time.sleep(1)
    stack.nats.stop(signal.SIGKILL)
    audit.fault("NATS down past the ack wait (kill -9)")
    time.sleep(5)
    stack.nats.start()
    audit_workflow(stack, wf_id, audit, timeout=60)
    log = stack.executors[0].log()
    assert f"{wf_id}.long attempt 1 delivery 2 already runs here" in log, log[-3000:]
    started = Counter(
        d["task_id"]
        for k, d in workflow_events(stack, wf_id)
        if k == "task" and d["status"] == "running"
    )
    assert started == {"long": 1, "nu": 1}, started  # each started once: never restarted
    assert task_record(stack, wf_id, "long").delivery == 1
    audit.report("NATS outage past ack wait")


@pytest.mark.stack(executors=2, env={"PROVISIONING_EXECUTOR_ACK_WAIT_SECONDS": "5"})
def test_dispatch_repeated_after_a_restart_does_not_run_twice(stack: Stack) -> None:
    """After a restart JetStream has forgotten the message ids of work-queue messages already
    consumed, so a dispatch whose publish is retried across it (its ack was lost) arrives
    again as a new message, delivery 1, while the first copy runs. Simulated here by
    publishing that copy: neither executor runs the attempt a second time."""
    audit = Audit()
    wf_id = submit_retrying(stack.http, {"name": "again", "tasks": [sleep("s", 4)]}, "again")
    wait_until(lambda: task_record(stack, wf_id, "s").status == "running", 30, what="s to run")
    copy = TaskDispatch(wf_id, "s", 1, "builtin.sleep", {"seconds": 4}, 60.0)
    for _ in range(2):  # two copies: whichever executors they reach
        publish(stack, subjects.dispatch_subject("default", wf_id, "s"), encode(copy))
        audit.fault("repeated dispatch")
    audit_workflow(stack, wf_id, audit, timeout=60)
    logs = "".join(e.log() for e in stack.executors)
    held = logs.count(f"{wf_id}.s attempt 1 delivery 1 already runs here")
    deferred = logs.count(f"{wf_id}.s attempt 1 delivery 1 was already started by")
    assert held + deferred == 2, logs[-3000:]
    assert task_record(stack, wf_id, "s").delivery == 1
    wait_until(lambda: dispatch_backlog(stack) == 0, 60, what="the copies to be settled")
    audit.report("repeated dispatch")
