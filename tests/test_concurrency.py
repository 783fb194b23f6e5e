"""Concurrency keys on a real stack: one server is never changed by two tasks at once, across
workflows; strategies, rates, visibility, hostile keys; and the failovers (slow: make chaos).

Every overlap is judged from the tasks' own start and end times as the API reports them.
"""

from __future__ import annotations

import itertools
import signal
from datetime import datetime
from typing import Any

import pytest

from .support import Stack, read_event_stream, submit, task_of, wait_until

pytestmark = pytest.mark.e2e


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def sleeper(
    task_id: str, seconds: float, key: str | None = None, **key_options: Any
) -> dict[str, Any]:
    task: dict[str, Any] = {"id": task_id, "action": "builtin.sleep", "args": {"seconds": seconds}}
    if key is not None:
        task["concurrency"] = [{"key": key, **key_options}]
    return task


def interval(stack: Stack, wf_id: str, task_id: str) -> tuple[float, float]:
    task = task_of(stack.http, wf_id, task_id)
    return ts(task["started_at"]), ts(task["finished_at"])


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = now = 0
    for _, step in edges:
        now += step
        best = max(best, now)
    return best


def test_one_server_is_changed_by_one_workflow_at_a_time_in_priority_then_submission_order(
    stack: Stack,
) -> None:
    gate = submit(stack.http, [sleeper("t", 2.0, "server:wuji-cp-1")], name="gate")
    wait_until(lambda: task_of(stack.http, gate, "t")["status"] == "running")
    waiters = {}
    for name, priority in (("a", 0), ("b", 5), ("c", 0), ("d", 3)):
        waiters[name] = submit(
            stack.http, [sleeper("t", 0.2, "server:wuji-cp-1")], name=name, priority=priority
        )

    def all_waiting() -> bool:
        return all(task_of(stack.http, w, "t")["status"] == "waiting" for w in waiters.values())

    wait_until(all_waiting, what="every later workflow to wait")
    held = task_of(stack.http, waiters["a"], "t")
    assert held["waiting_for"] == f"server:wuji-cp-1, held by {gate}.t", held
    keys = stack.http.get("/concurrency")[1]["keys"]
    (key,) = [k for k in keys if k["key"] == "server:wuji-cp-1"]
    assert key["holders"] == [f"{gate}.t"] and key["limit"] == 1
    assert key["waiters"] == [f"{waiters[n]}.t" for n in ("b", "d", "a", "c")], key
    listed = stack.cli("concurrency", "list")
    assert listed.returncode == 0 and "server:wuji-cp-1" in listed.stdout, listed.stderr

    for wf_id in (gate, *waiters.values()):
        assert stack.http.wait_workflow(wf_id)["status"] == "completed"
    runs = sorted(
        (*interval(stack, wf_id, "t"), name) for name, wf_id in (("gate", gate), *waiters.items())
    )
    assert [name for *_, name in runs] == ["gate", "b", "d", "a", "c"]
    for (_, end, _), (start, _, _) in itertools.pairwise(runs):
        assert start >= end, runs  # never two at once
    events = read_event_stream(f"{stack.http.base}/workflows/{waiters['a']}/events")
    waiting = [e.data for e in events if e.event == "task" and e.data["status"] == "waiting"]
    assert waiting and "server:wuji-cp-1" in waiting[0]["detail"], waiting
    assert stack.http.get("/concurrency")[1]["keys"] == []  # nothing held any more


@pytest.mark.stack(executors=2)
def test_fifty_servers_run_in_parallel_and_the_registry_guards_a_server_by_default(
    stack: Stack,
) -> None:
    fleet = submit(
        stack.http, [sleeper(f"s{i}", 0.6, f"server:s{i}") for i in range(50)], name="fleet"
    )
    # server.create holds server:<hostname> by default: two workflows on one host queue
    create = {
        "id": "t",
        "action": "server.create",
        "args": {"infra": "keys", "server": {"hostname": "keys-1"}, "delay_seconds": 1},
    }
    first = submit(stack.http, [create], name="create-1")
    second = submit(stack.http, [create], name="create-2")
    assert stack.http.wait_workflow(fleet, timeout=60)["status"] == "completed"
    spans = [interval(stack, fleet, f"s{i}") for i in range(50)]
    at_once = most_at_once(spans)
    print(f"fifty keys: at most {at_once} at once on 20 slots")
    assert at_once >= 10, spans
    for wf_id in (first, second):
        assert stack.http.wait_workflow(wf_id, timeout=60)["status"] == "completed"
    a, b = interval(stack, first, "t"), interval(stack, second, "t")
    assert a[1] <= b[0] or b[1] <= a[0], (a, b)
    assert task_of(stack.http, second, "t")["keys"] == ["server:keys-1"]


def test_cancel_newest_and_cancel_in_progress_end_the_right_task(stack: Stack) -> None:
    holder = submit(stack.http, [sleeper("t", 30, "db:main")], name="holder")
    wait_until(lambda: task_of(stack.http, holder, "t")["status"] == "running")
    newest = submit(
        stack.http,
        [sleeper("t", 0.1, "db:main", strategy="cancel_newest")],
        name="newest",
    )
    view = stack.http.wait_workflow(newest)
    task = view["tasks"][0]
    assert task["status"] == "cancelled" and f"{holder}.t" in task["error"], task
    assert task["attempt"] == 0  # it never ran
    assert task_of(stack.http, holder, "t")["status"] == "running"

    taker = submit(
        stack.http,
        [sleeper("t", 0.1, "db:main", strategy="cancel_in_progress")],
        name="taker",
    )
    assert stack.http.wait_workflow(taker)["status"] == "completed"
    old = task_of(stack.http, holder, "t")
    assert old["status"] == "cancelled" and f"{taker}.t" in old["error"], old
    assert stack.http.wait_workflow(holder)["status"] == "cancelled"
    assert interval(stack, taker, "t")[0] >= ts(old["finished_at"])


@pytest.mark.stack(executors=2, env={"PROVISIONING_CONCURRENCY_RATES": '{"api:x": "3/2s"}'})
def test_a_rate_holds_across_executors_and_windows(stack: Stack) -> None:
    tasks = [
        {"id": f"r{i}", "action": "builtin.noop", "concurrency": [{"key": "api:x", "limit": 0}]}
        for i in range(10)
    ]
    wf_id = submit(stack.http, tasks, name="rated")
    view = stack.http.wait_workflow(wf_id, timeout=60)
    assert view["status"] == "completed"
    starts = sorted(ts(t["started_at"]) for t in view["tasks"])
    for start in starts:
        in_window = [s for s in starts if start - 2.0 < s <= start]
        assert len(in_window) <= 3, (start, starts)
    assert starts[-1] - starts[0] >= 6.0, starts  # 10 starts at 3 per 2 s: at least 3 windows


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("", "empty"),
        ("k" * 10_000, "at most"),  # over the definition's own bound
        ("server:\u0007", "control"),
        ("server:*", "wildcard"),
        ("server.>", "wildcard"),
    ],
)
def test_hostile_keys_are_refused_naming_them(stack: Stack, key: str, words: str) -> None:
    status, reply = stack.http.post(
        "/workflows",
        {
            "name": "hostile",
            "tasks": [{"id": "t", "action": "builtin.noop", "concurrency": [{"key": key}]}],
        },
    )
    assert status == 422, reply
    assert reply["error"]["details"]["task"] == "t", reply
    assert words in reply["error"]["message"] or "1024" in reply["error"]["message"], reply


def test_a_key_needing_a_missing_argument_is_refused_naming_it(stack: Stack) -> None:
    status, reply = stack.http.post(
        "/workflows",
        {
            "name": "missing",
            "tasks": [
                {
                    "id": "patch",
                    "action": "builtin.noop",
                    "args": {"server": {}},
                    "concurrency": [{"key": "server:{args.server.hostname}"}],
                }
            ],
        },
    )
    assert status == 422 and reply["error"]["details"]["task"] == "patch", reply
    assert "args.server.hostname" in reply["error"]["message"], reply


# -- failover (make chaos) ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.stack(executors=2, env={"PROVISIONING_EXECUTOR_ACK_WAIT_SECONDS": "4"})
def test_a_killed_holder_keeps_its_slot_until_its_redelivery_ends_then_the_waiter_runs(
    stack: Stack,
) -> None:
    holder = submit(stack.http, [sleeper("t", 3, "server:k9")], name="holder")
    wait_until(lambda: task_of(stack.http, holder, "t")["status"] == "running")
    waiter = submit(stack.http, [sleeper("t", 0.2, "server:k9")], name="waiter")
    wait_until(lambda: task_of(stack.http, waiter, "t")["status"] == "waiting")
    running_on = task_of(stack.http, holder, "t")["executor_id"]
    victim = next(e for e in stack.executors if e.proc and str(e.proc.pid) in running_on)
    victim.kill9()
    for wf_id in (holder, waiter):
        assert stack.http.wait_workflow(wf_id, timeout=60)["status"] == "completed"
    h, w = interval(stack, holder, "t"), interval(stack, waiter, "t")
    assert w[0] >= h[1], (h, w)  # the redelivered holder finished before the waiter started


@pytest.mark.slow
def test_waiters_keep_their_order_across_a_scheduler_kill(stack: Stack) -> None:
    gate = submit(stack.http, [sleeper("t", 4, "server:fo")], name="gate")
    wait_until(lambda: task_of(stack.http, gate, "t")["status"] == "running")
    order = []
    for i in range(4):
        order.append(submit(stack.http, [sleeper("t", 0.3, "server:fo")], name=f"w{i}"))
    wait_until(
        lambda: all(task_of(stack.http, w, "t")["status"] == "waiting" for w in order),
        what="the waiters",
    )
    stack.scheduler.kill9()
    stack.scheduler.start()
    for wf_id in (gate, *order):
        assert stack.http.wait_workflow(wf_id, timeout=90)["status"] == "completed"
    runs = sorted((*interval(stack, w, "t"), w) for w in (gate, *order))
    assert [w for *_, w in runs] == [gate, *order]
    for (_, end, _), (start, _, _) in itertools.pairwise(runs):
        assert start >= end, runs


@pytest.mark.slow
def test_no_key_gains_a_second_holder_when_the_scheduler_is_killed_mid_burst(
    stack: Stack,
) -> None:
    workflows = [
        submit(stack.http, [sleeper("t", 0.3, f"server:b{i % 3}")], name=f"burst-{n}")
        for n, i in enumerate(range(12))
    ]
    wait_until(
        lambda: sum(task_of(stack.http, w, "t")["status"] == "waiting" for w in workflows) >= 6,
        what="waiters",
    )
    stack.scheduler.signal(signal.SIGKILL)
    stack.scheduler.proc.wait() if stack.scheduler.proc else None
    stack.scheduler.start()
    for wf_id in workflows:
        assert stack.http.wait_workflow(wf_id, timeout=90)["status"] == "completed"
    for server in range(3):
        spans = [interval(stack, w, "t") for n, w in enumerate(workflows) if n % 3 == server]
        assert most_at_once(spans) == 1, spans
