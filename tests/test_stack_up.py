"""`provisioning-orchestrator up`: the embedded stack starts, serves, and stops leaving nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "PYTHONUNBUFFERED": "1"}
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
    assert (tmp_path / "data" / "logs" / "gateway.log").read_text()
    time.sleep(0.5)
    assert _processes_mentioning(str(tmp_path / "data")) == [], "processes left behind"
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
