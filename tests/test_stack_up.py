"""`provisioning-orchestrator up`: the embedded stack starts, serves, and stops leaving nothing."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.stack import RESTART_INITIAL_S, STABLE_AFTER_S

from .support import Http, free_port, wait_until

pytestmark = pytest.mark.e2e


def _processes_mentioning(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline or marker in environ:
            pids.append(int(entry.name))
    return pids


def _up(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "XDG_STATE_HOME": str(tmp_path / "xdg-state"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("NATS_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "services", "--data-dir", str(tmp_path / "data"), "up", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_up_serves_and_stops_cleanly(tmp_path: Path) -> None:
    nats_port, port = free_port(), free_port()
    proc = _up(tmp_path, "--nats-port", str(nats_port), "--port", str(port), "--executors", "2")
    http = Http(f"http://127.0.0.1:{port}")
    executors: set[int] = set()
    try:
        http.wait_healthy(60)
        wait_until(
            lambda: len([e for e in http.get("/executors")[1]["executors"] if e["alive"]]) == 2, 30
        )
        status, accepted = http.post("/workflows/servers/create", {"infra": "wuji"})
        assert status == 202
        assert http.wait_workflow(accepted["workflow_id"])["status"] == "completed"
        marker = str(tmp_path / "data")
        # executors drop their start-up environment (the data directory with it): by pid
        executors = {e["pid"] for e in http.get("/executors")[1]["executors"] if e["alive"]}
        children = {*_processes_mentioning(marker), *executors}
        assert len(children) >= 5  # up itself, nats, scheduler, two executors, gateway
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output[-3000:]
    assert "stopped" in output
    # a clean start says nothing alarming: no refused connect while its NATS was starting (the
    # executors' own warnings about this machine, such as where Python lives, may be there)
    started = output[: output.index("serving; press Ctrl-C to stop")]
    alarming = [ln for ln in started.splitlines() if "WARNING" in ln and "isolation" not in ln]
    assert alarming == [] and "Errno" not in started, started[-3000:]
    assert (tmp_path / "data" / "logs" / "gateway.log").read_text()
    wait_until(
        lambda: _processes_mentioning(str(tmp_path / "data")) == [],
        10,
        what="no process left behind",
    )
    assert [pid for pid in executors if Path(f"/proc/{pid}/cmdline").exists()] == []
    assert sorted(p.name for p in (tmp_path / "data" / "logs").iterdir()) == [
        "executor-1.log",
        "executor-2.log",
        "gateway.log",
        "nats.log",
        "scheduler.log",
    ]


def test_up_refuses_a_taken_nats_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        proc = _up(tmp_path, "--nats-port", str(taken), "--port", str(free_port()))
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert f"port {taken} is already in use" in output
    assert "Traceback" not in output


def test_up_with_external_nats(tmp_path: Path, nats_url: str) -> None:
    port = free_port()
    proc = _up(tmp_path, "--nats-url", nats_url, "--port", str(port))
    http = Http(f"http://127.0.0.1:{port}")
    try:
        http.wait_healthy(60)
        status, accepted = http.post(
            "/workflows", {"name": "n", "tasks": [{"id": "a", "action": "builtin.noop"}]}
        )
        assert status == 202
        assert http.wait_workflow(accepted["workflow_id"])["status"] == "completed"
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output[-3000:]
    assert not (tmp_path / "data" / "nats").exists()


# -- supervision: every child on its own, NATS included -----------------------------------------

_BACKOFF_RE = re.compile(r"^up\s*\| (\S+) exited with code (-?\d+).*restarting in ([\d.]+)s$", re.M)


def _children(parent: int) -> dict[str, int]:
    """``up``'s live children by service (``nats``, ``scheduler``, ``executor``, ``gateway``)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if fields[0] == "Z" or int(fields[1]) != parent or not argv[0]:
            continue
        name = "nats" if argv[0].endswith(b"nats-server") else argv[-2].decode()
        found[name] = int(entry.name)
    return found


class Up:
    """``provisioning-orchestrator up`` as a subprocess on free ports with one executor; its
    output in a file (read while it runs), its children found in ``/proc``."""

    def __init__(self, tmp_path: Path) -> None:
        self.nats_port, self.port = free_port(), free_port()
        self.out_path = tmp_path / "up.out"
        self.marker = str(tmp_path / "data")
        env = {
            **os.environ,
            "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
            "XDG_STATE_HOME": str(tmp_path / "xdg-state"),
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("NATS_URL", None)
        with self.out_path.open("w") as out:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "services", "--data-dir", self.marker, "up"),
                    *("--nats-port", str(self.nats_port), "--port", str(self.port)),
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.http = Http(f"http://127.0.0.1:{self.port}")

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def backoffs(self, name: str) -> list[float]:
        """The delay ``up`` announced after each exit of a child, in order."""
        return [float(d) for n, _, d in _BACKOFF_RE.findall(self.output()) if n == name]

    def pid(self, service: str, *, other_than: int = 0, timeout: float = 30) -> int:
        """The pid of a service's (new) process."""

        def found() -> int:
            pid = _children(self.proc.pid).get(service, 0)
            return pid if pid != other_than else 0

        return int(wait_until(found, timeout, 0.05, what=f"{service} (re)started"))

    def kill(self, service: str) -> int:
        pid = self.pid(service)
        os.kill(pid, signal.SIGKILL)
        return pid

    def crash_loop(self, service: str, name: str, *, until_s: float) -> float:
        """Kill a service as soon as it is back, until ``up`` announces a backoff of at least
        ``until_s``; that backoff."""
        while True:
            count = len(self.backoffs(name))
            self.kill(service)
            wait_until(lambda n=count: len(self.backoffs(name)) > n, 10, 0.05, what="the backoff")
            if (delay := self.backoffs(name)[-1]) >= until_s:
                return delay
            self.pid(service, timeout=delay + 30)

    def health_status(self) -> int:
        try:
            return self.http.get("/health", timeout=2)[0]
        except OSError:
            return 0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            print(self.output()[-6000:])


@pytest.mark.slow
def test_an_executor_killed_after_running_stably_comes_back_as_fast_each_time(
    tmp_path: Path,
) -> None:
    """Backoff resets: each kill after a stable run is a new incident, not a crash loop."""
    up = Up(tmp_path)
    try:
        up.http.wait_healthy(60)
        pid, seen = up.pid("executor"), time.monotonic()
        took = []
        for kills in (1, 2):
            time.sleep(max(0.0, seen + STABLE_AFTER_S + 0.5 - time.monotonic()))
            up.kill("executor")
            killed = time.monotonic()
            pid, seen = up.pid("executor", other_than=pid), time.monotonic()
            took.append(round(seen - killed, 2))
            assert len(up.backoffs("executor-1")) == kills
        print(f"\nexecutor back after {took} s; backoffs {up.backoffs('executor-1')}")
        assert up.backoffs("executor-1") == [RESTART_INITIAL_S, RESTART_INITIAL_S]
        assert up.proc.poll() is None
    finally:
        assert up.stop() == 0


@pytest.mark.slow
def test_a_gateway_killed_while_an_executor_waits_out_a_long_backoff_is_back_at_once(
    tmp_path: Path,
) -> None:
    """Children are supervised independently: no child's backoff delays another's restart."""
    up = Up(tmp_path)
    try:
        up.http.wait_healthy(60)
        executor_backoff = up.crash_loop("executor", "executor-1", until_s=8)
        waiting_since = time.monotonic()
        up.kill("gateway")
        wait_until(lambda: up.health_status() == 200, 30, 0.05, what="the gateway back")
        back_after = time.monotonic() - waiting_since
        print(f"\ngateway back after {back_after:.2f}s; executor waits {executor_backoff:g}s")
        assert "executor" not in _children(up.proc.pid), "the executor's backoff is over"
        assert back_after < executor_backoff
    finally:
        assert up.stop() == 0


@pytest.mark.slow
def test_sigterm_during_a_long_backoff_stops_up_within_seconds(tmp_path: Path) -> None:
    up = Up(tmp_path)
    try:
        up.http.wait_healthy(60)
        executor_backoff = up.crash_loop("executor", "executor-1", until_s=8)
        asked = time.monotonic()
        up.proc.send_signal(signal.SIGTERM)
        code = up.proc.wait(60)
        took = time.monotonic() - asked
        print(f"\nup stopped {took:.2f}s after SIGTERM (executor backoff {executor_backoff:g}s)")
        assert code == 0
        assert took < 5
        time.sleep(0.5)
        assert _processes_mentioning(up.marker) == [], "processes left behind"
        assert "executor-1 restarted" not in up.output().rsplit("restarting in", 1)[1]
    finally:
        up.stop()


@pytest.mark.slow
def test_up_restarts_its_nats_on_the_same_port_with_the_same_data(tmp_path: Path) -> None:
    up = Up(tmp_path)
    try:
        up.http.wait_healthy(60)
        status, accepted = up.http.post(
            "/workflows",
            {
                "name": "across a NATS restart",
                "tasks": [
                    {"id": "a", "action": "builtin.sleep", "args": {"seconds": 2}},
                    {"id": "b", "action": "builtin.noop", "depends_on": ["a"]},
                ],
            },
        )
        assert status == 202, accepted
        wf_id = accepted["workflow_id"]
        nats = up.kill("nats")
        up.pid("nats", other_than=nats)
        assert up.backoffs("nats") == [RESTART_INITIAL_S]
        view = up.http.wait_workflow(wf_id, timeout=60)  # the gateway's NATS_URL: same port
        assert view["status"] == "completed", view
        assert up.proc.poll() is None, "up exited"
        assert (
            up.output().count(f"Listening for client connections on 127.0.0.1:{up.nats_port}") == 2
        )
        assert set(_children(up.proc.pid)) == {"nats", "scheduler", "executor", "gateway"}
    finally:
        assert up.stop() == 0
