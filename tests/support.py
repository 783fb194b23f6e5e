"""Helpers for the tests: real processes (from :mod:`testkit.processes`, shared with the
benchmarks), and what tests read of them: events, logs, runs, streams, records."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testkit.processes import (
    NATS_BIN,
    VENV_BIN,
    Http,
    NatsServer,
    Service,
    Stack,
    free_port,
    proc_status,
    running_stack,
    wait_until,
)

__all__ = [
    "NATS_BIN",
    "VENV_BIN",
    "Http",
    "NatsServer",
    "Service",
    "Stack",
    "free_port",
    "proc_status",
    "running_stack",
    "wait_until",
]

# -- executors: fixtures, processes, events ------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"
# A user registry of test-only actions (probe.*) beside the packaged one.
PROBE_ENV = {
    "PROVISIONING_NUSHELL_REGISTRY": str(FIXTURES / "registry.toml"),
    "PROVISIONING_NUSHELL_REGISTRY_LIB": str(FIXTURES / "nulib"),
}


def python_tools_env() -> dict[str, str]:
    """For stacks whose tasks run the project's Python tools (the ``aws`` command line): as
    root, executors run tasks as ``provisioning-task``, which cannot run an interpreter kept
    where only root may go (pyenv under /root, as on the CI machines). Then, and only then,
    tasks of those stacks run as root (the executor warns about both)."""
    if os.geteuid() != 0:
        return {}
    from services.executor import isolation

    if isolation.tools_denied(isolation.resolve_task_user("")) is None:
        return {}
    return {"PROVISIONING_EXECUTOR_TASK_USER": "root"}


def task_processes(task_id: str) -> list[tuple[int, str]]:
    """Live processes (pid, command line) whose environment says they belong to ``task_id``:
    a task's children inherit ``PROVISIONING_TASK_ID`` whatever process group they are in."""
    wanted = f"PROVISIONING_TASK_ID={task_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if wanted in environ.split(b"\0") and cmdline:  # zombies have neither
            found.append((int(entry), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


def sse(base: str, path: str, *, token: str = "", timeout: float = 60) -> list[tuple[str, Any]]:
    """Every Server-Sent Event of ``path`` until the server ends the stream."""
    from shared.api_client import ApiClient

    client = ApiClient(base, token=token, timeout_s=timeout)
    return list(client.stream(path))


# -- workflows: streams, events, runs and memory of real processes ------------------------------


def stream_state(url: str, stream: str) -> dict[str, int]:
    """``messages``, ``first_seq`` and ``last_seq`` of a JetStream stream, read with nats-py.
    On a work queue ``last_seq`` only grows: it tells whether anything was ever published."""
    import asyncio

    import nats

    async def read() -> dict[str, int]:
        nc = await nats.connect(url, max_reconnect_attempts=1, reconnect_time_wait=0.2)
        try:
            info = await nc.jetstream().stream_info(stream)
        finally:
            await nc.close()
        state = info.state
        return {
            "messages": state.messages,
            "first_seq": state.first_seq,
            "last_seq": state.last_seq,
        }

    return asyncio.run(read())


class SseEvent:
    """One Server-Sent Event: ``id``, ``event`` and the decoded JSON ``data``."""

    def __init__(self, event_id: str, event: str, data: Any) -> None:
        self.id = event_id
        self.event = event
        self.data = data

    def __repr__(self) -> str:
        return f"SseEvent({self.id}, {self.event}, {self.data})"


def read_event_stream(
    url: str,
    *,
    token: str = "",
    headers: dict[str, str] | None = None,
    timeout: float = 60,
    on_event: Callable[[SseEvent], None] | None = None,
) -> list[SseEvent]:
    """Read ``text/event-stream`` with urllib until the server closes it; comments (keepalives)
    are skipped. ``on_event`` sees each event as it arrives."""
    hdrs = {"Accept": "text/event-stream", **(headers or {})}
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, headers=hdrs)
    events: list[SseEvent] = []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.headers.get_content_type() == "text/event-stream"
        event_id, event, data = "", "message", ""
        for raw in response:
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line:
                if data:
                    item = SseEvent(event_id, event, json.loads(data))
                    events.append(item)
                    if on_event is not None:
                        on_event(item)
                event_id, event, data = "", "message", ""
            elif line.startswith(":"):
                continue
            elif line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
    return events


def task_runs(executor_logs: str, workflow_id: str, task_id: str) -> list[tuple[int, str]]:
    """``(attempt, outcome)`` of every run of a task an executor finished, from its log lines
    ``<workflow>.<task> attempt <n> <outcome> in <seconds>s``."""
    pattern = re.compile(
        rf"\b{re.escape(workflow_id)}\.{re.escape(task_id)} attempt (\d+) (\w+) in [\d.]+s"
    )
    return [(int(a), o) for a, o in pattern.findall(executor_logs)]


def caught_signals(pid: int) -> set[int]:
    """The signals a live process has handlers for (``SigCgt`` in ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask & (1 << (n - 1))}
    return set()


def submit(http: Http, tasks: list[dict[str, Any]], **definition: Any) -> str:
    """POST a workflow of ``tasks``; return its id (asserting the 202)."""
    body = {"name": definition.pop("name", "test"), "tasks": tasks, **definition}
    status, accepted = http.post("/workflows", body)
    assert status == 202, accepted
    return str(accepted["workflow_id"])


def task_of(http: Http, wf_id: str, task_id: str) -> dict[str, Any]:
    status, view = http.get(f"/tasks/{wf_id}.{task_id}")
    assert status == 200, view
    return dict(view)


def executor_id(stack: Stack, service: Service) -> str:
    """The id a running executor process announces in its heartbeats."""
    assert service.proc is not None
    pid = service.proc.pid

    def find() -> str | None:
        status, body = stack.http.get("/executors")
        ids = [e["id"] for e in body.get("executors", []) if e["pid"] == pid and e["alive"]]
        return ids[0] if status == 200 and ids else None

    return str(wait_until(find, 30, what=f"{service.name} to announce itself"))


def running_executor(stack: Stack, wf_id: str, task_id: str) -> Service:
    """The executor process running ``task_id`` (waits until it runs)."""
    ids = {executor_id(stack, s): s for s in stack.executors}

    def running() -> Service | None:
        task = task_of(stack.http, wf_id, task_id)
        return ids.get(task["executor_id"]) if task["status"] == "running" else None

    found: Service = wait_until(running, 30, what=f"{task_id} to run")
    return found


def start_executor(stack: Stack, *args: str, env: dict[str, str] | None = None) -> Service:
    """One more executor process (stopped with the stack); returns once it is live."""
    service = stack.new_executor(len(stack.executors), *args, env=env).start()
    stack.executors.append(service)
    executor_id(stack, service)
    return service


def workflow_events(stack: Stack, wf_id: str) -> list[tuple[str, Any]]:
    """A finished workflow's whole event history, from its SSE stream."""
    return sse(stack.http.base, f"/workflows/{wf_id}/events", token=stack.http.token)


def completions(events: list[tuple[str, Any]]) -> dict[str, int]:
    """How many times each task was reported completed."""
    counts: dict[str, int] = {}
    for kind, data in events:
        if kind == "task" and data["status"] == "completed":
            counts[data["task_id"]] = counts.get(data["task_id"], 0) + 1
    return counts


def nats_run(url: str, body: Callable[[Any], Any]) -> Any:
    """Run ``await body(nc)`` with a NATS connection of its own (for tests that poke JetStream)."""
    import asyncio

    import nats

    async def main() -> Any:
        nc = await nats.connect(url, max_reconnect_attempts=1, reconnect_time_wait=0.2)
        try:
            return await body(nc)
        finally:
            await nc.drain()

    return asyncio.run(main())


def injection_payloads(marker: Path) -> list[str]:
    """Strings that would run code (creating ``marker``) if any layer spliced them into a
    shell or Nushell program."""
    m = str(marker)
    return [
        f"'; rm -rf ~; touch {m}; '",
        f"$(touch {m})",
        f"(^touch {m})",
        f"`touch {m}`",
        f'"; ^touch {m}; "',
        f"x\n^touch {m}\n",
        f'$"(^touch {m})"',
        f"{{|| ^touch {m} }}",
        f"| save {m}",
        "$env.HOME",
        "$nu.home-path",
        "%s %n {0} {{ }}",
        "\\u0000 \x1b[31m \u00fcn\u00efc\u00f8d\u00e9",
    ]


def task_record(stack: Stack, wf_id: str, task_id: str) -> Any:
    """The scheduler's checkpoint of a task (a ``TaskRecord``), read straight from KV."""
    from shared import subjects
    from shared.messages import decode_task

    async def body(nc: Any) -> Any:
        kv = await nc.jetstream().key_value(subjects.BUCKET_TASKS)
        return decode_task((await kv.get(f"{wf_id}.{task_id}")).value)

    return nats_run(stack.nats.url, body)


def publish(stack: Stack, subject: str, data: bytes, msg_id: str | None = None) -> None:
    """Publish into a JetStream stream as a service would (waits for the stream's ack)."""

    async def body(nc: Any) -> None:
        await nc.jetstream().publish(
            subject, data, headers={"Nats-Msg-Id": msg_id} if msg_id else None
        )

    nats_run(stack.nats.url, body)


def dispatch_backlog(stack: Stack, pool: str = "default") -> int:
    """Task attempts in a pool's queue not yet acked (waiting or being worked on)."""
    from shared import subjects

    async def body(nc: Any) -> int:
        info = await nc.jetstream().consumer_info(
            subjects.STREAM_DISPATCH, subjects.executor_consumer(pool)
        )
        return int(info.num_pending + info.num_ack_pending)

    return int(nats_run(stack.nats.url, body))


def logged_runs(
    stack: Stack, workflow_id: str, task_id: str, at_least: int = 1, timeout: float = 10
) -> list[tuple[int, str]]:
    """:func:`task_runs` of every executor of the stack, sorted, once at least ``at_least`` are
    logged (an executor logs a run just after reporting it, so the scheduler may be faster)."""

    def runs() -> list[tuple[int, str]]:
        logs = "\n".join(e.log() for e in stack.executors)
        return sorted(task_runs(logs, workflow_id, task_id))

    wait_until(lambda: len(runs()) >= at_least, timeout, what=f"{task_id} runs in the logs")
    return runs()
