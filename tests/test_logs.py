"""Task logs are paged, bounded per attempt and per task, and one reader cannot hurt the gateway.

The hostile case of the issue: a task printing hundreds of thousands of lines per attempt and
failing again and again. Before, one ``GET /tasks/{id}/logs`` returned every line of every
attempt at once (4.7 M lines took the gateway from 62 MB to 1.74 GB and stalled ``/health``
for 8.5 s). Now a page is bounded, a task keeps the logs of its first attempt and its newest
ones only (``[executor] log_attempts_kept``), and reading them all page by page keeps the
gateway within a fixed memory bound while ``/health`` answers fast.
"""

from __future__ import annotations

import threading
import time

import pytest

from .support import Stack, proc_status, read_event_stream, submit, wait_until

pytestmark = pytest.mark.e2e

LINES_PER_ATTEMPT = 150_000
ATTEMPTS = 8
PRINT_AND_FAIL = (
    "import sys; sys.stdout.write('x\\n' * " + str(LINES_PER_ATTEMPT) + "); sys.exit(1)"
)
GATEWAY_RSS_LIMIT_KB = 250 * 1024


@pytest.mark.stack(
    env={
        "PROVISIONING_EXECUTOR_ALLOW_COMMANDS": "true",
        "PROVISIONING_EXECUTOR_LOG_LIMIT_BYTES": "2000000",
        "PROVISIONING_EXECUTOR_LOG_ATTEMPTS_KEPT": "3",
    }
)
def test_a_flood_of_log_lines_is_paged_bounded_and_harmless(stack: Stack) -> None:
    wf_id = submit(
        stack.http,
        [
            {
                "id": "flood",
                "action": "command.run",
                "args": {"argv": ["python3", "-c", PRINT_AND_FAIL]},
                "retries": ATTEMPTS - 1,
                "backoff": {"initial_seconds": 0.05, "max_seconds": 0.05},
                "timeout_seconds": 120,
            }
        ],
        name="flood",
    )
    view = stack.http.wait_workflow(wf_id, timeout=240)
    assert view["status"] == "failed" and view["tasks"][0]["attempt"] == ATTEMPTS
    key = f"{wf_id}.flood"

    # one page by default, with a cursor to go on
    status, page = stack.http.get(f"/tasks/{key}/logs")
    assert status == 200 and len(page["lines"]) == 1000 and page["next_cursor"], len(page["lines"])
    assert stack.http.get(f"/tasks/{key}/logs?limit=10001")[0] == 400
    assert stack.http.get(f"/tasks/{key}/logs?cursor=abc")[0] == 400

    # the first attempt's lines and the newest ones only: kept = 3 of 8
    def kept_attempts() -> set[int]:
        found = set()
        for attempt in range(1, ATTEMPTS + 1):
            lines = stack.http.get(f"/tasks/{key}/logs?attempt={attempt}&limit=1")[1]["lines"]
            if lines:
                assert lines[0]["attempt"] == attempt
                found.add(attempt)
        return found

    wait_until(lambda: kept_attempts() == {1, ATTEMPTS - 1, ATTEMPTS}, 30, what="old logs purged")

    # read every stored line, page by page, while /health is timed from another thread
    gateway = stack.gateway.proc
    assert gateway is not None
    health: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            assert stack.http.get("/health", timeout=10)[0] == 200
            health.append(time.monotonic() - t0)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    total, cursor, pages = 0, "", 0
    per_attempt: dict[int, int] = {}
    try:
        while True:
            page = stack.http.get(f"/tasks/{key}/logs?limit=10000{cursor}", timeout=60)[1]
            pages += 1
            for line in page["lines"]:
                per_attempt[line["attempt"]] = per_attempt.get(line["attempt"], 0) + 1
            total += len(page["lines"])
            if not page["next_cursor"] or not page["lines"]:
                break
            cursor = f"&cursor={page['next_cursor']}"
    finally:
        done.set()
        prober.join(30)
    rss = proc_status(gateway.pid)
    print(
        f"logs: {total} lines in {pages} pages; gateway peak RSS {rss['VmHWM'] // 1024} MB; "
        f"/health max {max(health):.3f}s over {len(health)} probes"
    )
    assert per_attempt == dict.fromkeys((1, ATTEMPTS - 1, ATTEMPTS), LINES_PER_ATTEMPT)
    assert rss["VmHWM"] < GATEWAY_RSS_LIMIT_KB, rss
    assert health and max(health) < 2.0, health


@pytest.mark.stack(env={"PROVISIONING_EXECUTOR_ALLOW_COMMANDS": "true"})
def test_pages_continue_exactly_and_follow_reads_one_attempt(stack: Stack) -> None:
    script = (
        "import os, sys; n = os.environ['PROVISIONING_ATTEMPT'];"
        " [print(f'attempt {n} line {i}') for i in range(7)]; sys.exit(1)"
    )
    wf_id = submit(
        stack.http,
        [
            {
                "id": "twice",
                "action": "command.run",
                "args": {"argv": ["python3", "-c", script]},
                "retries": 1,
                "backoff": {"initial_seconds": 0.05},
            }
        ],
    )
    assert stack.http.wait_workflow(wf_id)["status"] == "failed"
    key = f"{wf_id}.twice"
    lines: list[str] = []
    cursor = ""
    while True:  # pages of 3 lines: 7 + 7 lines come back in order, none twice, none lost
        page = stack.http.get(f"/tasks/{key}/logs?limit=3{cursor}")[1]
        assert len(page["lines"]) <= 3
        lines += [entry["line"] for entry in page["lines"]]
        if not page["next_cursor"]:
            break
        cursor = f"&cursor={page['next_cursor']}"
    expected = [f"attempt {n} line {i}" for n in (1, 2) for i in range(7)]
    assert [line for line in lines if line.startswith("attempt")] == expected

    second = stack.http.get(f"/tasks/{key}/logs?attempt=2")[1]["lines"]
    assert {entry["attempt"] for entry in second} == {2}
    url = f"{stack.http.base}/tasks/{key}/logs?follow=true&attempt=2"
    followed = [
        line for event in read_event_stream(url, timeout=30) for line in event.data["lines"]
    ]
    assert [line for line in followed if line.startswith("attempt")] == expected[7:]
