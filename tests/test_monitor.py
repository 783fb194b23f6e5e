"""The monitor's lines, from events in the order the services may deliver them (pure: no
stack). A task's progress can overtake the scheduler's word that it started: the lines still
say it started first, once."""

from __future__ import annotations

import io

from shared.monitor import Board


def _board() -> Board:
    view = {"workflow_id": "w1", "status": "running", "tasks": [{"id": "t", "status": "queued"}]}
    return Board(view, io.StringIO(), tty=False)


def test_progress_before_the_start_announces_the_start_once() -> None:
    board = _board()
    lines = board.apply(
        "progress", {"task_id": "t", "percent": 90, "message": "booting", "attempt": 1}
    )
    lines += board.apply("task", {"task_id": "t", "status": "running", "attempt": 1})
    lines += board.apply("task", {"task_id": "t", "status": "completed", "attempt": 1})
    assert lines == [
        "task t running (attempt 1)",
        "task t  90% booting",
        "task t completed (attempt 1)",
    ]


def test_in_order_events_are_told_as_they_come() -> None:
    board = _board()
    lines = board.apply("task", {"task_id": "t", "status": "running", "attempt": 1})
    lines += board.apply("progress", {"task_id": "t", "percent": 30, "attempt": 1})
    lines += board.apply(
        "task", {"task_id": "t", "status": "failed", "attempt": 1, "error": "disk full"}
    )
    assert lines == [
        "task t running (attempt 1)",
        "task t  30%",
        "task t failed (attempt 1): disk full",
    ]


def test_a_retry_is_announced_again() -> None:
    board = _board()
    board.apply("progress", {"task_id": "t", "percent": 10, "attempt": 1})
    board.apply("task", {"task_id": "t", "status": "running", "attempt": 1})
    board.apply("task", {"task_id": "t", "status": "retrying", "attempt": 1})
    lines = board.apply("progress", {"task_id": "t", "percent": 10, "attempt": 2})
    assert lines[0] == "task t running (attempt 2)"
    # the scheduler's word of the second attempt, late: not told again
    assert board.apply("task", {"task_id": "t", "status": "queued", "attempt": 2}) == []
    assert board.apply("task", {"task_id": "t", "status": "running", "attempt": 2}) == []


def test_a_progress_report_after_the_end_does_not_start_it_again() -> None:
    board = _board()
    board.apply("task", {"task_id": "t", "status": "running", "attempt": 1})
    board.apply("task", {"task_id": "t", "status": "completed", "attempt": 1})
    assert board.apply("progress", {"task_id": "t", "percent": 90, "attempt": 1}) == []
