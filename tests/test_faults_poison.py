"""Poison messages on every subject the services consume: each one is logged and copied to the
dead-letter stream (``PROV_DLQ``, with ``Prov-Dlq-*`` headers), removed from its queue, and the
consumers keep going: a workflow running meanwhile and one submitted afterwards complete."""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime
from typing import Any

import pytest

from shared import subjects
from shared.errors import MessageError
from shared.ids import new_workflow_id
from shared.messages import (
    ReportBatch,
    SubmitWorkflow,
    TaskDispatch,
    TaskFinished,
    decode_command,
    encode,
)
from shared.workflow import definition_from_data

from .faults import Audit, audit_workflow, dead_letters, wait_dead_letters
from .support import Stack, nats_run, publish, stream_state, submit, wait_until

pytestmark = pytest.mark.e2e

MAX_PAYLOAD = 8 * 1024 * 1024  # the test NATS server's max_payload (tests/support.py)


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _oversized(kind: str, wf_id: str) -> bytes:
    """Valid JSON just under NATS's max payload, shaped like a message but with a huge unknown
    field: the dead-letter copy (payload plus headers) cannot fit whole."""
    head = json.dumps({"type": kind, "workflow_id": wf_id, "junk": ""}).encode()[:-2]
    return head + b"x" * (MAX_PAYLOAD - len(head) - 2 - 64) + b'"}'


def _finished(wf_id: str, task_id: str) -> bytes:
    now = datetime.now(UTC)
    report = TaskFinished(wf_id, task_id, 1, 1, "forged", "completed", now, now)
    return encode(report)


def _report(wf_id: str, task_id: str, executor: str) -> TaskFinished:
    now = datetime.now(UTC)
    return TaskFinished(wf_id, task_id, 1, 1, executor, "completed", now, now)


def _poison() -> list[tuple[str, bytes, str]]:
    """``(subject, payload, consumer)``: one or more per consumed subject."""
    ids = [new_workflow_id() for _ in range(18)]
    cycle = definition_from_data(
        {
            "name": "cycle",
            "tasks": [
                {"id": "a", "action": "builtin.noop", "depends_on": ["b"]},
                {"id": "b", "action": "builtin.noop", "depends_on": ["a"]},
            ],
        }
    )
    submit_cycle = SubmitWorkflow(ids[7], cycle, datetime.now(UTC))
    bad_id = TaskDispatch("not a workflow", "t", 1, "builtin.noop", {}, 5.0)
    unknown = TaskDispatch(ids[14], "t", 1, "builtin.noop", {}, 5.0)  # never checkpointed
    deep_dispatch = (
        b'{"type":"dispatch","workflow_id":"%s","task_id":"t","attempt":1,'
        b'"action":"builtin.noop","timeout_seconds":5,"args":{"a":%s}}'
        % (ids[10].encode(), _nested(200_000))
    )
    deep_report = (
        b'{"type":"finished","workflow_id":"%s","task_id":"t","attempt":1,"delivery":1,'
        b'"executor_id":"x","outcome":"completed","started_at":"2025-01-01T00:00:00Z",'
        b'"finished_at":"2025-01-01T00:00:00Z","output":%s}' % (ids[11].encode(), _nested(200_000))
    )
    deep_submit = (
        b'{"type":"submit","workflow_id":"%s","submitted_at":"2025-01-01T00:00:00Z",'
        b'"definition":{"name":"deep","tasks":[{"id":"a","action":"builtin.noop","args":{"a":%s}}]}}'
        % (ids[12].encode(), _nested(200_000))
    )
    cmd, dispatch, report = (
        subjects.command_subject,
        subjects.dispatch_subject,
        subjects.report_subject,
    )
    return [
        (cmd("submit", ids[0]), b"\x00\xff not json at all", "scheduler"),
        (cmd("cancel", ids[1]), b'{"type": "cancel"}', "scheduler"),
        (
            cmd("retry", ids[2]),
            b'{"type":"retry","workflow_id":"%s","runs":"one"}' % ids[2].encode(),
            "scheduler",
        ),
        (dispatch("default", ids[3], "t"), b"[1, 2, 3]", "executor"),
        (report(ids[4], "t"), b'{"type": "finished"}', "scheduler"),
        # oversized but valid JSON
        (cmd("submit", ids[5]), _oversized("submit", ids[5]), "scheduler"),
        (dispatch("default", ids[6], "t"), _oversized("dispatch", ids[6]), "executor"),
        # decodable, but not something a service could have sent
        (cmd("submit", ids[7]), encode(submit_cycle), "scheduler"),
        (dispatch("default", ids[8], "t"), encode(bad_id), "executor"),
        (report(ids[9], "t"), _finished("not.a workflow", "t"), "scheduler"),
        (dispatch("default", ids[14], "t"), encode(unknown), "executor"),
        # valid JSON nested deeper than any decoder recurses
        (dispatch("default", ids[10], "t"), deep_dispatch, "executor"),
        (report(ids[11], "t"), deep_report, "scheduler"),
        (cmd("submit", ids[12]), deep_submit, "scheduler"),
        (cmd("cancel", ids[13]), _nested(200_000), "scheduler"),
        # batches of reports that no executor sends: a report of another executor in it, a
        # batch on a task's own subject, an empty one
        (
            subjects.report_batch_subject("forger1"),
            encode(ReportBatch("ex", [_report(ids[15], "t", "another")])),
            "scheduler",
        ),
        (
            report(ids[16], "t"),
            encode(ReportBatch("ex", [_report(ids[16], "t", "ex")])),
            "scheduler",
        ),
        (
            subjects.report_batch_subject("forger2"),
            b'{"type":"report_batch","executor_id":"ex","reports":[]}',
            "scheduler",
        ),
    ]


def _decodes(data: bytes) -> bool:
    try:
        decode_command(data)
    except MessageError:
        return False
    return True


def _core_publish(stack: Stack, subject: str, data: bytes) -> None:
    async def body(nc: Any) -> None:
        await nc.publish(subject, data)
        await nc.flush()

    nats_run(stack.nats.url, body)


@pytest.mark.stack(executors=2)
def test_poison_messages_are_dead_lettered_and_consumers_keep_going(stack: Stack) -> None:
    audit = Audit()
    pids = {s.name: s.proc.pid for s in stack.services if s.proc}
    sleeper = {"action": "builtin.sleep", "args": {"seconds": 2}}
    during = submit(stack.http, [{"id": "s1", **sleeper}, {"id": "s2", **sleeper}])
    wait_until(lambda: stack.http.get(f"/workflows/{during}")[1]["status"] == "running", 30)

    poison = _poison()
    stack.scheduler.signal(signal.SIGSTOP)  # a moment for the gateway to see them queued
    try:
        for subject, data, _ in poison:
            publish(stack, subject, data)
        for subject, data, _ in poison:  # the gateway reads pending submissions: not poisoned
            if ".submit." in subject and not _decodes(data):
                wf_id = subject.rsplit(".", 1)[1]
                assert stack.http.get(f"/workflows/{wf_id}")[0] == 404, subject
    finally:
        stack.scheduler.signal(signal.SIGCONT)
    kill = subjects.cancel_subject(during)
    for data in (b"\x00 not json", b'{"tasks": "s1"}', _nested(200_000)):
        _core_publish(stack, kill, data)  # core NATS: every executor sees it
    # histories the gateway replays (SSE, logs): skipped when read, never dead-lettered
    for data in (b"\x00 not json", _nested(200_000)):
        publish(stack, subjects.event_subject(during), data)
        publish(stack, subjects.log_subject(during, "s1", 1), data)
    assert stack.http.get(f"/tasks/{during}.s1/logs") == (
        200,
        {"task_id": f"{during}.s1", "attempt": None, "lines": [], "next_cursor": None},
    )
    audit.fault("poison message", len(poison) + 3 + 4)

    letters = wait_dead_letters(stack.nats.url, len(poison) + 3)
    by_subject: dict[str, list[tuple[str, dict[str, str], bytes]]] = {}
    for letter in letters:
        by_subject.setdefault(letter[1].get("Prov-Dlq-Subject", "?"), []).append(letter)
    for subject, data, consumer in poison:
        found = by_subject.get(subject, [])
        assert len(found) == 1, (subject, [(s, h) for s, h, _ in found])
        dlq_subject, headers, copy = found[0]
        assert dlq_subject == subjects.dlq_subject(consumer), (subject, dlq_subject)
        assert headers["Prov-Dlq-Source"] == consumer
        assert headers["Prov-Dlq-Error"] and headers["Prov-Dlq-At"], headers
        if len(data) + 1024 < MAX_PAYLOAD:
            assert copy == data, subject
        else:  # too big to copy whole with its headers: a prefix, and the size it had
            assert headers["Prov-Dlq-Truncated"] == str(len(data)), headers
            assert copy and data.startswith(copy), subject
    kills = by_subject.get(kill, [])
    assert len(kills) == 3, kills  # one copy each, however many executors saw it
    assert {s for s, _, _ in kills} == {subjects.dlq_subject("executor")}

    # logged, and removed from their queues
    logs = stack.scheduler.log() + "".join(e.log() for e in stack.executors)
    for subject, _, _ in poison:
        assert f"dead-lettered a message from {subject}" in logs, subject
    for stream in (subjects.STREAM_COMMANDS, subjects.STREAM_DISPATCH, subjects.STREAM_REPORTS):
        wait_until(
            lambda s=stream: stream_state(stack.nats.url, s)["messages"] == 0, 30, what=stream
        )
    # nothing was accepted from the poison: the cyclic submission made no workflow
    assert stack.http.get(f"/workflows/{poison[7][0].rsplit('.', 1)[1]}")[0] == 404

    # the consumers keep going: the running workflow and a new one complete
    audit_workflow(stack, during, audit)
    after = submit(
        stack.http,
        [
            {"id": "a", "action": "builtin.noop"},
            {
                "id": "b",
                "action": "server.create",
                "depends_on": ["a"],
                "args": {"infra": "dlq", "server": {"hostname": "dlq-1"}},
            },
        ],
    )
    audit_workflow(stack, after, audit)
    assert {s.name: s.proc.pid for s in stack.services if s.proc} == pids
    assert all(s.alive for s in stack.services)
    assert len(dead_letters(stack.nats.url)) == len(poison) + 3  # nothing else dead-lettered
    audit.report("poison")


def test_only_failures_of_the_input_itself_make_it_poison() -> None:
    """An accepted workflow must survive NATS being away or electing leaders for as long as
    it takes: those failures never count toward dead-lettering the input."""
    import nats.errors
    import nats.js.errors

    from services.scheduler.inputs import POISON_DELIVERIES, poisonous

    not_the_input = [
        nats.errors.TimeoutError(),
        nats.errors.NoRespondersError(),
        nats.errors.ConnectionClosedError(),
        nats.js.errors.ServiceUnavailableError(),
        nats.js.errors.KeyWrongLastSequenceError(),
        TimeoutError(),
        ConnectionResetError(),
    ]
    for exc in not_the_input:
        assert not poisonous(exc, POISON_DELIVERIES * 100), exc
    for exc in (ValueError("bad"), KeyError("t1"), nats.errors.MaxPayloadError()):
        assert not poisonous(exc, POISON_DELIVERIES - 1)
        assert poisonous(exc, POISON_DELIVERIES), exc


@pytest.mark.stack(env={"PROVISIONING_EXECUTOR_MAX_DELIVERIES": "2"})
def test_a_dispatch_whose_checkpoint_does_not_decode_is_not_run_and_ends_dead_lettered(
    stack: Stack,
) -> None:
    """A checkpoint the executor cannot read (a newer scheduler's, or damaged) is never run
    blind, and never crashes the executor's handler: handed back, then dead-lettered."""
    wf_id = new_workflow_id()
    key = subjects.task_key(wf_id, "t")

    async def damage(nc: Any) -> None:
        kv = await nc.jetstream().key_value(subjects.BUCKET_TASKS)
        await kv.put(key, b'{"type": "task_record", "v": 99, "status": "from the future"}')

    nats_run(stack.nats.url, damage)
    dispatch = TaskDispatch(wf_id, "t", 1, "builtin.sleep", {"seconds": 30}, 60.0)
    publish(stack, subjects.dispatch_subject("default", wf_id, "t"), encode(dispatch))
    (letter,) = wait_dead_letters(stack.nats.url, 1)
    assert f"the checkpoint of {key} cannot be read" in letter[1]["Prov-Dlq-Error"], letter[1]
    log = "".join(e.log() for e in stack.executors)
    assert "not running it (delivery 1), handed back" in log, log[-3000:]
    assert "task handler crashed" not in log
    assert stream_state(stack.nats.url, subjects.STREAM_REPORTS)["messages"] == 0  # never began
    assert all(s.alive for s in stack.services)
