"""Concurrency keys in the engine, as a specification: holders, waiters in order, strategies,
rates, release on every end, and recovery from checkpoints. In process, no NATS."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from engine import Effects, Engine
from shared.errors import DefinitionError
from shared.ids import new_workflow_id
from shared.keys import KeySpec, claims, key_problem, parse_rate
from shared.messages import (
    SubmitWorkflow,
    TaskFinished,
    TaskRecord,
    TaskStarted,
    WorkflowDefinition,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def engine(slots: int = 10) -> Engine:
    def claims_of(spec: Any, args: dict[str, Any]) -> Any:
        return claims([], spec.concurrency, args, {}, task=spec.id)

    e = Engine(timeout_for=lambda spec: 60.0, claims_for=claims_of)
    e.set_capacity({"default": slots})
    return e


class Cluster:
    """Several workflows in one engine, as the scheduler holds them."""

    def __init__(self, slots: int = 10) -> None:
        self.engine = engine(slots)
        self.now = T0
        self.ids: dict[str, str] = {}  # name -> workflow id

    def submit(self, name: str, tasks: list[dict[str, Any]], **definition: Any) -> Effects:
        wf = new_workflow_id()
        self.ids[name] = wf
        body = msgspec.convert({"name": name, "tasks": tasks, **definition}, WorkflowDefinition)
        self.engine.accept(SubmitWorkflow(wf, body, self.now), self.now)
        return self.step()

    def step(self) -> Effects:
        self.engine.pump(self.now)
        return self.engine.take()

    def later(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def task(self, name: str, task_id: str = "t") -> TaskRecord:
        state = self.engine.get(self.ids[name])
        assert state is not None, name
        return state.tasks[task_id]

    def start(self, name: str, task_id: str = "t") -> None:
        task = self.task(name, task_id)
        report = TaskStarted(self.ids[name], task_id, task.attempt, 1, "ex", self.now)
        self.engine.report(report, self.now)

    def finish(self, name: str, task_id: str = "t", outcome: str = "completed") -> Effects:
        task = self.task(name, task_id)
        report = TaskFinished(
            workflow_id=self.ids[name],
            task_id=task_id,
            attempt=task.attempt,
            delivery=1,
            executor_id="ex",
            outcome=outcome,  # type: ignore[arg-type]
            started_at=self.now,
            finished_at=self.now,
            reason="cancelled"
            if outcome == "cancelled"
            else ("error" if outcome == "failed" else None),  # type: ignore[arg-type]
        )
        self.engine.report(report, self.now)
        return self.step()


def keyed(key: str = "server:x", task_id: str = "t", **spec: Any) -> dict[str, Any]:
    return {"id": task_id, "action": "builtin.noop", "concurrency": [{"key": key, **spec}]}


def sent(effects: Effects) -> list[tuple[str, str]]:
    return [(d.message.workflow_id, d.message.task_id) for d in effects.dispatches]


# -- holding and waiting ---------------------------------------------------------------------------


def test_a_second_workflow_on_the_same_server_waits_for_the_first() -> None:
    c = Cluster()
    c.submit("first", [keyed()])
    assert c.task("first").status == "queued" and c.task("first").keys == ["server:x"]
    effects = c.submit("second", [keyed()])
    assert not effects.dispatches
    waiting = c.task("second")
    assert waiting.status == "waiting"
    assert waiting.waiting_for == f"server:x, held by {c.ids['first']}.t"
    assert [e.status for e in effects.events if getattr(e, "task_id", "") == "t"] == ["waiting"]
    state = effects.keys["server:x"]
    assert state is not None and state.waiters == [f"{c.ids['second']}.t"]
    c.start("first")
    effects = c.finish("first")
    assert sent(effects) == [(c.ids["second"], "t")]
    assert c.task("second").waiting_for is None


def test_waiters_go_in_priority_then_arrival_order_across_workflows() -> None:
    c = Cluster()
    c.submit("holder", [keyed()])
    for name, priority in (("low-early", 0), ("high", 5), ("low-late", 0), ("mid", 3)):
        c.later(1)
        c.submit(name, [keyed()], priority=priority)
    order = []
    current = "holder"
    for _ in range(4):
        c.start(current)
        effects = c.finish(current)
        ((wf, _),) = sent(effects)
        current = next(n for n, i in c.ids.items() if i == wf)
        order.append(current)
    assert order == ["high", "mid", "low-early", "low-late"]


def test_distinct_keys_run_in_parallel_up_to_capacity() -> None:
    c = Cluster(slots=20)
    effects = c.submit("fleet", [keyed(f"server:s{i}", f"s{i}") for i in range(50)])
    assert len(effects.dispatches) == 20  # capacity, not the keys, is the bound
    assert not any(c.task("fleet", f"s{i}").status == "waiting" for i in range(50))


def test_a_limit_above_one_admits_that_many_holders() -> None:
    c = Cluster()
    effects = c.submit("pool", [keyed("db:main", f"t{i}", limit=2) for i in range(3)])
    assert len(effects.dispatches) == 2 and c.task("pool", "t2").status == "waiting"


@pytest.mark.parametrize("outcome", ["completed", "failed", "cancelled"])
def test_a_key_is_released_however_the_attempt_ends(outcome: str) -> None:
    c = Cluster()
    c.submit("a", [keyed()])
    c.submit("b", [keyed()])
    c.start("a")
    effects = c.finish("a", outcome=outcome)
    assert sent(effects) == [(c.ids["b"], "t")]


def test_a_failed_attempt_waiting_for_its_retry_lets_others_take_the_key() -> None:
    c = Cluster()
    c.submit("a", [{**keyed(), "retries": 2}])
    c.submit("b", [keyed()])
    c.start("a")
    effects = c.finish("a", outcome="failed")
    assert c.task("a").status == "retrying"
    assert sent(effects) == [(c.ids["b"], "t")]
    c.engine.retry_due(c.ids["a"], "t", 1, c.now)
    c.step()
    assert c.task("a").status == "waiting"  # its retry waits for b


def test_cancelling_a_workflow_removes_its_waiters() -> None:
    c = Cluster()
    c.submit("a", [keyed()])
    c.submit("b", [keyed()])
    c.engine.cancel(c.ids["b"], "by request", c.now)
    effects = c.step()
    state = c.engine.get(c.ids["b"]) or effects.ended[c.ids["b"]]
    assert state.tasks["t"].status == "cancelled"
    assert effects.keys["server:x"] is not None and effects.keys["server:x"].waiters == []


# -- strategies ------------------------------------------------------------------------------------


def test_cancel_newest_ends_the_new_task_naming_the_holder() -> None:
    c = Cluster()
    c.submit("holder", [keyed()])
    effects = c.submit(
        "newcomer",
        [
            keyed(strategy="cancel_newest"),
            {"id": "after", "action": "builtin.noop", "depends_on": ["t"]},
        ],
    )
    state = effects.ended[c.ids["newcomer"]]
    task = state.tasks["t"]
    assert task.status == "cancelled" and f"{c.ids['holder']}.t" in (task.error or "")
    assert state.tasks["after"].status == "skipped"
    assert c.task("holder").status == "queued"


def test_cancel_in_progress_stops_the_holder_and_takes_its_slot_first() -> None:
    c = Cluster()
    c.submit("holder", [keyed()])
    c.start("holder")
    c.submit("queued-behind", [keyed()])
    effects = c.submit("takeover", [keyed(strategy="cancel_in_progress")])
    holder = c.task("holder")
    assert holder.status == "cancelling" and c.ids["takeover"] in (holder.error or "")
    assert effects.kills[c.ids["holder"]] == ["t"]
    effects = c.finish("holder", outcome="cancelled")
    assert sent(effects) == [(c.ids["takeover"], "t")]  # ahead of the older waiter
    assert c.task("queued-behind").status == "waiting"


# -- rates -----------------------------------------------------------------------------------------


def test_a_rate_bounds_starts_per_window_and_wakes_waiters_when_it_opens() -> None:
    c = Cluster()
    effects = c.submit("burst", [keyed("provider:aws", f"t{i}", rate="2/10s") for i in range(5)])
    assert len(effects.dispatches) == 2
    assert effects.wakeups  # when the window may open
    for task_id in ("t0", "t1"):
        c.start("burst", task_id)
        c.finish("burst", task_id)  # finishing does not give the rate back
    assert c.task("burst", "t2").status == "waiting"
    assert "rate 2/10s" in (c.task("burst", "t2").waiting_for or "")
    c.later(10.5)
    c.engine.tick(c.now)
    effects = c.engine.take()
    assert len(effects.dispatches) == 2


def test_rate_waiters_are_not_woken_before_the_window_opens() -> None:
    c = Cluster()
    c.submit("burst", [keyed("k", f"t{i}", rate="1/60s") for i in range(2)])
    c.start("burst", "t0")
    c.finish("burst", "t0")
    c.later(30)
    c.engine.tick(c.now)
    assert not c.engine.take().dispatches
    assert c.task("burst", "t1").status == "waiting"


# -- recovery --------------------------------------------------------------------------------------


def adopted(c: Cluster, names: list[str]) -> Engine:
    """A fresh engine that adopted the named workflows from copies of their checkpoints."""
    fresh = engine()
    for name in names:
        state = c.engine.get(c.ids[name])
        assert state is not None
        record = msgspec.convert(msgspec.to_builtins(state.record), type(state.record))
        tasks = {
            k: msgspec.convert(msgspec.to_builtins(v), TaskRecord) for k, v in state.tasks.items()
        }
        fresh.adopt(record, tasks, c.now)
    return fresh


def test_holders_and_waiters_are_rebuilt_from_checkpoints_in_order() -> None:
    c = Cluster()
    c.submit("holder", [keyed()])
    c.start("holder")
    for name in ("w1", "w2", "w3"):
        c.later(1)
        c.submit(name, [keyed()])
    # adopt in an order unlike the waiting order, as a listing of active workflows might
    fresh = adopted(c, ["w3", "holder", "w1", "w2"])
    fresh.pump(c.now)
    effects = fresh.take()
    assert not effects.dispatches  # the holder still holds the key: no second holder
    assert effects.keys["server:x"] is not None
    assert effects.keys["server:x"].holders == [f"{c.ids['holder']}.t"]
    waiters = [w.split(".")[0] for w in effects.keys["server:x"].waiters]
    assert waiters == [c.ids["w1"], c.ids["w2"], c.ids["w3"]]


def test_waiters_that_tied_keep_their_order_whatever_order_they_are_adopted_in() -> None:
    """Workflows taken in one step wait since the same moment: the tie is broken by their
    records (submission time, id), not by the order a restarted scheduler happened to load
    them in (it loads them concurrently)."""
    c = Cluster()
    c.submit("holder", [keyed()])
    c.start("holder")
    names = [f"w{i}" for i in range(6)]
    for i, name in enumerate(names):
        c.ids[name] = wf = new_workflow_id()
        body = msgspec.convert({"name": name, "tasks": [keyed()]}, WorkflowDefinition)
        submitted = c.now + timedelta(milliseconds=i % 2)  # pairs submitted in one millisecond
        c.engine.accept(SubmitWorkflow(wf, body, submitted), c.now)
    effects = c.step()
    before = effects.keys["server:x"]
    assert before is not None and len(before.waiters) == len(names)
    for order in ([*names[::-1], "holder"], [*names[3:], "holder", *names[:3]], ["holder", *names]):
        fresh = adopted(c, order)
        fresh.pump(c.now)
        after = fresh.take().keys["server:x"]
        assert after is not None and after.waiters == before.waiters, order


# -- the keys themselves ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("", "empty"),
        ("k" * 10_000, "at most 256"),
        ("server:\x07bell", "control"),
        ("server: x", "space"),
        ("server:*", "wildcard"),
        ("server:>", "wildcard"),
    ],
)
def test_hostile_keys_are_refused_naming_them(key: str, words: str) -> None:
    assert words in (key_problem(key) or "")
    with pytest.raises(DefinitionError) as refused:
        claims([], [KeySpec(key=key)], {}, {}, task="t")
    assert refused.value.task == "t" and words in refused.value.message


def test_a_template_takes_the_task_arguments_and_names_a_missing_one() -> None:
    spec = KeySpec(key="server:{args.server.hostname}")
    (claim,) = claims([], [spec], {"server": {"hostname": "cp-1"}}, {}, task="t")
    assert claim.key == "server:cp-1" and claim.limit == 1
    with pytest.raises(DefinitionError) as refused:
        claims([], [spec], {"server": {}}, {}, task="t")
    assert "args.server.hostname" in refused.value.message and refused.value.task == "t"
    optional = KeySpec(key="provider:{args.provider?}")
    assert claims([], [optional], {}, {}, task="t") == []


@pytest.mark.parametrize("hostname", ["'; rm -rf ~", "x\n^touch m", "a*b>c", "\x1b[31m"])
def test_an_argument_with_any_characters_makes_one_printable_key(hostname: str) -> None:
    """A value put into a key is escaped, never refused: the submission is still judged by
    its action (which refuses such a hostname), and two tasks on that value share the key."""
    spec = KeySpec(key="server:{args.server.hostname}")
    (claim,) = claims([], [spec], {"server": {"hostname": hostname}}, {}, task="t")
    assert key_problem(claim.key) is None and claim.key.startswith("server:")
    (again,) = claims([spec], None, {"server": {"hostname": hostname}}, {}, task="u")
    assert again.key == claim.key
    (other,) = claims([spec], None, {"server": {"hostname": hostname + "2"}}, {}, task="v")
    assert other.key != claim.key


def test_declared_keys_override_the_defaults_and_configured_rates_apply() -> None:
    defaults = [KeySpec(key="server:{args.hostname}")]
    declared = [KeySpec(key="server:h1", limit=3), KeySpec(key="provider:aws")]
    rates = {"provider:aws": parse_rate("20/minute")}
    got = claims(defaults, declared, {"hostname": "h1"}, rates, task="t")
    assert [(c.key, c.limit) for c in got] == [("server:h1", 3), ("provider:aws", 1)]
    assert got[1].rate is not None and got[1].rate.count == 20 and got[1].rate.window_s == 60
    rate_only = claims([], [KeySpec(key="k", rate="5/10s")], {}, {}, task="t")
    assert rate_only[0].limit is None  # a key with only a rate has no holder limit
