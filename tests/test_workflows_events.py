"""Events: every transition is published, and GET /workflows/{id}/events streams them as
Server-Sent Events from the start, then live, and ends with the workflow."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from shared import subjects
from shared.messages import decode_event

from .support import SseEvent, Stack, nats_run, read_event_stream, sse, submit, wait_until

pytestmark = pytest.mark.e2e


def statuses(events: list[SseEvent], kind: str, task_id: str | None = None) -> list[str]:
    return [
        e.data["status"]
        for e in events
        if e.event == kind and (task_id is None or e.data.get("task_id") == task_id)
    ]


def index_of(events: list[SseEvent], task_id: str, status: str) -> int:
    """Where the task event of ``task_id`` reaching ``status`` is in the stream."""
    for i, e in enumerate(events):
        if e.event == "task" and e.data["task_id"] == task_id and e.data["status"] == status:
            return i
    raise AssertionError(f"no {status!r} event for {task_id!r} in {events}")


def test_event_stream_from_the_start_then_live_until_the_workflow_ends(stack: Stack) -> None:
    status, accepted = stack.http.post(
        "/workflows",
        {
            "name": "watched",
            "tasks": [
                {  # Nushell actions print PROGRESS lines: they become progress events
                    "id": "server",
                    "action": "server.create",
                    "args": {"infra": "ev", "server": {"hostname": "ev-1"}, "delay_seconds": 0.8},
                },
                {
                    "id": "kubernetes",
                    "action": "taskserv.create",
                    "args": {"infra": "ev", "taskserv": "kubernetes", "server": "ev-1"},
                    "depends_on": ["server"],
                },
            ],
        },
    )
    assert status == 202, accepted
    wf_id = accepted["workflow_id"]
    url = f"{stack.http.base}/workflows/{wf_id}/events"

    # A watcher connected from the start sees the events while the workflow runs.
    live: list[SseEvent] = []
    seen_while_running: list[str] = []

    def on_event(event: SseEvent) -> None:
        if event.event == "progress" and not seen_while_running:
            seen_while_running.append(stack.http.get(f"/workflows/{wf_id}")[1]["status"])

    def watch() -> None:
        live.extend(read_event_stream(url, on_event=on_event, timeout=60))

    watcher = threading.Thread(target=watch)
    watcher.start()
    view = stack.http.wait_workflow(wf_id)
    watcher.join(30)
    assert not watcher.is_alive(), "the stream did not end with the workflow"
    assert view["status"] == "completed", view
    assert seen_while_running == ["running"], seen_while_running

    # the workflow: queued, running, completed, and the stream ends with its end
    assert statuses(live, "workflow") == ["queued", "running", "completed"]
    assert live[0].event == "workflow" and live[0].data["status"] == "queued"
    assert live[-1].event == "workflow" and live[-1].data["status"] == "completed"
    # each task: every transition, in order
    for task_id in ("server", "kubernetes"):
        assert statuses(live, "task", task_id) == ["queued", "running", "completed"], task_id
        positions = [i for i, e in enumerate(live) if e.data.get("task_id") == task_id]
        progress = [live[i].data for i in positions if live[i].event == "progress"]
        percents = [p["percent"] for p in progress]
        assert percents == sorted(percents) and percents[-1] == 100, percents
        assert all(p["attempt"] == 1 for p in progress)
        queued, done = index_of(live, task_id, "queued"), index_of(live, task_id, "completed")
        assert all(queued < i < done for i in positions if live[i].event == "progress")
    # the second task only starts once the first is completed
    assert index_of(live, "server", "completed") < index_of(live, "kubernetes", "queued")
    ids = [int(e.id) for e in live]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {e.data["workflow_id"] for e in live} == {wf_id}

    # Connected after the end: the same events from the start, then the stream closes.
    replay = read_event_stream(url, timeout=30)
    assert [(e.id, e.event, e.data) for e in replay] == [(e.id, e.event, e.data) for e in live]

    # Resuming after an event (Last-Event-ID) gives what followed it, nothing before.
    resumed = read_event_stream(url, headers={"Last-Event-ID": live[3].id}, timeout=30)
    assert [e.id for e in resumed] == [e.id for e in live[4:]]

    status, _ = stack.http.get("/workflows/" + "f" * 32 + "/events")
    assert status == 404


def test_events_of_failure_retry_and_cancel(stack: Stack) -> None:
    status, accepted = stack.http.post(
        "/workflows",
        {
            "name": "bumpy",
            "on_failure": "continue",
            "tasks": [
                {
                    "id": "flaky",
                    "action": "builtin.fail",
                    "retries": 1,
                    "backoff": {"initial_seconds": 0.1},
                },
                {"id": "child", "action": "builtin.noop", "depends_on": ["flaky"]},
                {"id": "long", "action": "builtin.sleep", "args": {"seconds": 60}},
            ],
        },
    )
    assert status == 202
    wf_id = accepted["workflow_id"]
    url = f"{stack.http.base}/workflows/{wf_id}/events"
    events: list[SseEvent] = []
    watcher = threading.Thread(target=lambda: events.extend(read_event_stream(url)))
    watcher.start()

    def flaky_failed() -> Any:
        tasks = {t["id"]: t for t in stack.http.get(f"/workflows/{wf_id}")[1]["tasks"]}
        return tasks["flaky"]["status"] == "failed" and tasks["long"]["status"] == "running"

    wait_until(flaky_failed, what="flaky to fail for good")
    assert stack.http.post(f"/workflows/{wf_id}/cancel")[0] == 202
    watcher.join(30)
    assert not watcher.is_alive()
    assert statuses(events, "task", "flaky") == [
        *("queued", "running", "retrying"),  # attempt 1
        *("queued", "running", "failed"),  # attempt 2, the last one
    ]
    attempts = [e.data.get("attempt") for e in events if e.data.get("task_id") == "flaky"]
    assert attempts == [1, 1, 1, 2, 2, 2]
    retrying = next(e for e in events if e.data.get("status") == "retrying")
    assert retrying.data["reason"] == "error" and retrying.data["error"]
    assert statuses(events, "task", "child") == ["skipped"]
    assert statuses(events, "task", "long") == ["queued", "running", "cancelling", "cancelled"]
    assert statuses(events, "workflow") == ["queued", "running", "cancelled"]


def test_stream_ends_when_the_record_has_ended_but_its_end_event_is_lost(stack: Stack) -> None:
    """The scheduler checkpoints, then publishes events; if the end event never makes it into
    the stream, an SSE client still gets the end (from the record) instead of waiting for ever."""
    wf_id = submit(stack.http, [{"id": "a", "action": "builtin.noop"}])
    assert stack.http.wait_workflow(wf_id)["status"] == "completed"

    async def drop_end_event(nc: Any) -> int:
        js = nc.jetstream()
        last = await js.get_last_msg(subjects.STREAM_EVENTS, subjects.event_subject(wf_id))
        assert decode_event(last.data).status == "completed"  # type: ignore[union-attr]
        await js.delete_msg(subjects.STREAM_EVENTS, last.seq)
        return int(last.seq)

    dropped = nats_run(stack.nats.url, drop_end_event)
    events = sse(stack.http.base, f"/workflows/{wf_id}/events", timeout=10)
    kinds = [(kind, data.get("status")) for kind, data in events]
    assert ("task", "completed") in kinds
    assert kinds[-1] == ("workflow", "completed")  # from the record, the stream's one is gone
    assert all(
        data.get("status") != "completed" or kind != "workflow" for kind, data in events[:-1]
    )
    assert dropped > 0
