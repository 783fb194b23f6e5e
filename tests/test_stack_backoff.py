"""`up`'s restart policy, in process: capped exponential backoff that starts over after a
stable run (the processes themselves are tested in test_stack_up.py)."""

from __future__ import annotations

import pytest

from services.stack import (
    RESTART_INITIAL_S,
    RESTART_MAX_S,
    STABLE_AFTER_S,
    Backoff,
    describe_exit,
)

YOUNG = 0.5  # seconds a child ran before dying: a crash loop
STABLE = STABLE_AFTER_S


@pytest.mark.parametrize(
    ("runs", "delays"),
    [
        ([YOUNG], [1]),
        ([YOUNG] * 7, [1, 2, 4, 8, 16, 30, 30]),
        ([STABLE, STABLE, STABLE], [1, 1, 1]),  # the issue: 2.8, 5.1, 9.1 s after stable runs
        ([YOUNG, YOUNG, YOUNG, STABLE, YOUNG], [1, 2, 4, 1, 2]),
        ([YOUNG] * 10 + [STABLE], [1, 2, 4, 8, 16, 30, 30, 30, 30, 30, 1]),
        ([STABLE - 0.1, STABLE - 0.1], [1, 2]),  # just short of stable is still a crash loop
        ([YOUNG] * 200, [1, 2, 4, 8, 16] + [30] * 195),  # no overflow however long it loops
    ],
)
def test_backoff_doubles_while_a_child_dies_young_and_starts_over_after_a_stable_run(
    runs: list[float], delays: list[float]
) -> None:
    backoff = Backoff()
    assert [backoff.next(ran_s) for ran_s in runs] == delays


def test_backoff_constants_are_what_the_operations_guide_says() -> None:
    assert (RESTART_INITIAL_S, RESTART_MAX_S, STABLE_AFTER_S) == (1.0, 30.0, 10.0)


@pytest.mark.parametrize(
    ("code", "text"),
    [(0, "code 0"), (1, "code 1"), (-9, "code -9 (SIGKILL)"), (-15, "code -15 (SIGTERM)")],
)
def test_an_exit_is_described_with_its_signal(code: int, text: str) -> None:
    assert describe_exit(code) == text
