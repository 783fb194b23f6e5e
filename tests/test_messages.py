"""Messages: tagged, versioned, strictly decoded."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from shared.errors import MessageError
from shared.messages import (
    READS_REPORT_BATCHES,
    CancelWorkflow,
    ReportBatch,
    RetryWorkflow,
    SchedulerLease,
    SubmitWorkflow,
    TaskDispatch,
    TaskFinished,
    TaskSpec,
    TaskStarted,
    WorkflowDefinition,
    decode_command,
    decode_dispatch,
    decode_lease,
    decode_report,
    decode_report_message,
    encode,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
WF = "0" * 32


def test_commands_round_trip_with_tag_and_version() -> None:
    definition = WorkflowDefinition(
        name="w", tasks=[TaskSpec(id="a", action="builtin.noop", args={"x": [1, "two"]})]
    )
    for command in (
        SubmitWorkflow(WF, definition, NOW, idempotency_key="k"),
        CancelWorkflow(WF),
        RetryWorkflow(WF, runs=2),
    ):
        raw = msgspec.json.decode(encode(command))
        assert raw["type"] in ("submit", "cancel", "retry")
        assert raw["v"] == 1
        assert decode_command(encode(command)) == command


def test_reports_round_trip() -> None:
    started = TaskStarted(WF, "a", 1, 1, "ex", NOW)
    finished = TaskFinished(
        WF,
        "a",
        1,
        2,
        "ex",
        "failed",
        NOW,
        NOW,
        exit_code=3,
        reason="timeout",
        error="e",
        output={"k": 1},
    )
    assert decode_report(encode(started)) == started
    assert decode_report(encode(finished)) == finished


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"{}",
        b'{"type": "nope", "workflow_id": "x"}',
        b'{"type": "cancel"}',
        b'{"type": "cancel", "workflow_id": 5}',
        b'{"type": "cancel", "workflow_id": "x", "surprise": true}',
        b'{"type": "retry", "workflow_id": "x", "runs": "1"}',
    ],
)
def test_commands_decode_strictly(payload: bytes) -> None:
    with pytest.raises(MessageError):
        decode_command(payload)


def test_dispatch_rejects_wrong_types() -> None:
    good = TaskDispatch(WF, "a", 1, "builtin.noop", {}, 10.0)
    assert decode_dispatch(encode(good)) == good
    raw = msgspec.json.decode(encode(good))
    raw["attempt"] = "1"
    with pytest.raises(MessageError):
        decode_dispatch(msgspec.json.encode(raw))


def test_new_fields_have_defaults_for_old_messages() -> None:
    """Schema evolution: a v1 message without the newer optional fields still decodes."""
    old = (
        b'{"type":"started","workflow_id":"w","task_id":"a","attempt":1,"delivery":1,'
        b'"executor_id":"e","started_at":"2026-01-01T00:00:00Z"}'
    )
    assert decode_report(old).v == 1


def test_a_batch_of_reports_round_trips_and_single_reports_still_decode() -> None:
    """The reports stream carries single reports (every executor before batches, and an idle
    one still) and batches; one decoder reads both, each report keeping its own fields."""
    started = TaskStarted(WF, "a", 1, 1, "ex", NOW)
    finished = TaskFinished(WF, "b", 2, 1, "ex", "completed", NOW, NOW, output={"k": [1]})
    batch = ReportBatch("ex", [started, finished], ["00-" + "1" * 32 + "-" + "2" * 16 + "-01", ""])
    assert decode_report_message(encode(batch)) == batch
    assert msgspec.json.decode(encode(batch))["type"] == "report_batch"
    assert decode_report_message(encode(started)) == started
    old = (
        b'{"type":"finished","workflow_id":"w","task_id":"a","attempt":1,"delivery":1,'
        b'"executor_id":"e","outcome":"completed","started_at":"2026-01-01T00:00:00Z",'
        b'"finished_at":"2026-01-01T00:00:01Z"}'
    )
    assert decode_report_message(old) == decode_report(old)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type": "report_batch", "executor_id": "ex"}',
        b'{"type": "report_batch", "executor_id": "ex", "reports": [{"type": "dispatch"}]}',
        b'{"type": "report_batch", "executor_id": "ex", "reports": [], "extra": 1}',
        b'{"type": "report_batch", "executor_id": "ex", "reports": [[]]}',
    ],
)
def test_batches_of_reports_decode_strictly(payload: bytes) -> None:
    with pytest.raises(MessageError):
        decode_report_message(payload)


def test_a_lease_says_what_its_scheduler_reads_and_old_leases_read_nothing_new() -> None:
    """Executors batch reports only for a scheduler whose lease says it reads batches: an older
    scheduler's lease (no ``reads``) decodes with none, and an older reader ignores the field."""
    old = b'{"holder":"h","acquired_at":1.0,"renewed_at":2.0,"v":1}'
    assert decode_lease(old).reads == []
    lease = SchedulerLease("h", 1.0, 2.0, reads=[READS_REPORT_BATCHES])
    assert decode_lease(encode(lease)) == lease

    class OldLease(msgspec.Struct):
        holder: str
        acquired_at: float
        renewed_at: float
        v: int = 1

    assert msgspec.json.decode(encode(lease), type=OldLease).holder == "h"
