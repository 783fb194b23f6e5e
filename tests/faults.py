"""Helpers of the fault tests (tests/test_faults_*.py): the exactly-once audit of finished
workflows, the dead-letter stream, and a tally of what the fault tests checked."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .support import (
    Http,
    Stack,
    completions,
    logged_runs,
    nats_run,
    task_runs,
    wait_until,
    workflow_events,
)

TALLY_FILE = os.environ.get("PROVISIONING_FAULT_TALLY", "")


@dataclass
class Audit:
    """What an exactly-once audit looked at, for docs/reliability.md's figures."""

    workflows: int = 0
    tasks: int = 0
    runs: int = 0
    redelivered: int = 0  # tasks whose attempt was delivered again (its executor died)
    faults: Counter[str] = field(default_factory=Counter)

    def fault(self, kind: str, n: int = 1) -> None:
        self.faults[kind] += n

    def report(self, test: str) -> None:
        """Print the figures (``pytest -s`` shows them) and append them to the tally file when
        ``PROVISIONING_FAULT_TALLY`` names one."""
        line = {
            "test": test,
            "workflows": self.workflows,
            "tasks": self.tasks,
            "runs": self.runs,
            "redelivered": self.redelivered,
            "faults": dict(self.faults),
        }
        print(f"fault figures: {json.dumps(line)}")
        if TALLY_FILE:
            with Path(TALLY_FILE).open("a") as out:
                out.write(json.dumps(line) + "\n")


def expected_runs(task: dict[str, Any]) -> list[tuple[int, str]]:
    """The runs an executor must have logged for a finished task: one per attempt, with the
    attempt's outcome (``failed`` for every attempt but the last of a completed task)."""
    runs = []
    for record in task["attempts"]:
        outcome = record.get("outcome")
        if outcome is None or record.get("reason") == "max_deliveries":
            continue  # never ran to an outcome (cancelled while queued, or given up)
        runs.append((record["attempt"], outcome))
    return runs


def _killed_runs(stack: Stack, task: dict[str, Any]) -> set[tuple[int, str]]:
    """Runs reported by an executor process that is gone (killed -9): it may have died between
    reporting the run and logging it, so its log line may be missing."""
    alive = {s.proc.pid for s in stack.executors if s.alive and s.proc is not None}
    gone = set()
    for record in task["attempts"]:
        executor = record.get("executor_id") or ""
        pid = executor.rsplit("-", 2)[-2] if executor.count("-") >= 2 else ""
        if pid.isdigit() and int(pid) not in alive and record.get("outcome"):
            gone.add((record["attempt"], record["outcome"]))
    return gone


def audit_workflow(
    stack: Stack,
    wf_id: str,
    audit: Audit,
    *,
    status: str = "completed",
    attempts: dict[str, int] | None = None,
    timeout: float = 120,
) -> dict[str, Any]:
    """Wait for ``wf_id`` to end and check it exactly: its status, every task's status and
    attempt count (``attempts``, 1 unless named), and the executors' logs: exactly one logged run
    per attempt, with that attempt's outcome, and a completed task reported completed once."""
    view = stack.http.wait_workflow(wf_id, timeout=timeout)
    assert view["status"] == status, json.dumps(view, indent=2)
    want = attempts or {}
    logs = "\n".join(e.log() for e in stack.executors)
    events = completions(workflow_events(stack, wf_id))
    for task in view["tasks"]:
        tid = task["id"]
        if status == "completed":
            assert task["status"] == "completed", task
        assert task["attempt"] == want.get(tid, 1), task
        assert len(task["attempts"]) == task["attempt"], task
        runs = expected_runs(task)
        unlogged_ok = _killed_runs(stack, task)
        need = len(runs) - len(unlogged_ok)
        if need > 0:  # an executor logs a run just after reporting it: wait for the last line
            logged = logged_runs(stack, wf_id, tid, at_least=need, timeout=15)
        else:
            logged = sorted(task_runs(logs, wf_id, tid))
        # exactly one logged run per attempt, but for runs whose executor was killed between
        # reporting and logging them
        assert len(logged) == len(set(logged)), (tid, logged, task["attempts"])
        assert set(logged) <= set(runs), (tid, logged, task["attempts"])
        assert set(runs) - set(logged) <= unlogged_ok, (tid, logged, task["attempts"])
        assert events.get(tid, 0) == (1 if task["status"] == "completed" else 0), (tid, events)
        audit.tasks += 1
        audit.runs += len(logged)
    audit.workflows += 1
    audit.redelivered += sum(1 for r in _records(stack, wf_id, view).values() if r.delivery > 1)
    return view


def _records(stack: Stack, wf_id: str, view: dict[str, Any]) -> dict[str, Any]:
    """The scheduler's checkpoint of every task of a workflow (``TaskRecord``s) from KV."""
    from shared import subjects
    from shared.messages import decode_task

    async def body(nc: Any) -> dict[str, Any]:
        kv = await nc.jetstream().key_value(subjects.BUCKET_TASKS)
        ids = [t["id"] for t in view["tasks"]]
        return {t: decode_task((await kv.get(f"{wf_id}.{t}")).value) for t in ids}

    records: dict[str, Any] = nats_run(stack.nats.url, body)
    return records


def dead_letters(url: str) -> list[tuple[str, dict[str, str], bytes]]:
    """Every message of the dead-letter stream: ``(subject, headers, data)``."""
    from shared import subjects

    async def body(nc: Any) -> list[tuple[str, dict[str, str], bytes]]:
        js = nc.jetstream()
        try:
            info = await js.stream_info(subjects.STREAM_DLQ)
        except Exception:
            return []
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if info.state.messages == 0:
                break
            msg = await js.get_msg(subjects.STREAM_DLQ, seq)
            out.append((msg.subject, dict(msg.headers or {}), msg.data or b""))
        return out

    result: list[tuple[str, dict[str, str], bytes]] = nats_run(url, body)
    return result


def wait_dead_letters(url: str, n: int, timeout: float = 60) -> list[Any]:
    """The dead-letter stream once it holds at least ``n`` messages."""
    found: list[Any] = wait_until(
        lambda: (d := dead_letters(url)) and len(d) >= n and d,
        timeout,
        0.3,
        what=f"{n} dead letters",
    )
    return found


# -- workflows ----------------------------------------------------------------------------------


def sleep(task_id: str, seconds: float, *deps: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": task_id,
        "action": "builtin.sleep",
        "args": {"seconds": seconds},
        "depends_on": list(deps),
        **extra,
    }


def server(task_id: str, hostname: str, delay: float, *deps: str) -> dict[str, Any]:
    """A Nushell side effect: a second run would say the server already existed."""
    return {
        "id": task_id,
        "action": "server.create",
        "args": {"infra": "faults", "server": {"hostname": hostname}, "delay_seconds": delay},
        "depends_on": list(deps),
    }


def submit_retrying(http: Http, body: dict[str, Any], key: str, timeout: float = 90) -> str:
    """Submit with an ``Idempotency-Key``, retrying while the gateway is down or not ready
    (a client's correct behaviour): the key makes every retry the same workflow."""

    def attempt() -> str | None:
        status, answer = http.post("/workflows", body, headers={"Idempotency-Key": key}, timeout=5)
        return str(answer["workflow_id"]) if status == 202 else None

    return str(wait_until(attempt, timeout, 0.3, what=f"submission {key} to be accepted"))
