"""The local orchestrator the CLI starts and stops: ``provisioning-orchestrator up`` detached,
its pidfile and logs under the data directory, and one way to wait until it is healthy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.api_client import ApiClient, OrchestratorUnavailable
from shared.config import Config

__all__ = ["running_pid", "start_background", "stop_background", "wait_healthy"]

POLL_S = 0.5


def _pidfile(config: Config) -> Path:
    return config.data_dir / "orchestrator.pid"


def running_pid(config: Config) -> int | None:
    """The pid of the local stack this data directory's pidfile names, if it is alive."""
    try:
        pid = int(_pidfile(config).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def start_background(config: Config) -> int:
    """Start ``provisioning-orchestrator up`` detached; pidfile and logs under the data dir."""
    pid = running_pid(config)
    if pid:
        return pid
    data_dir = config.data_dir
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    log = (data_dir / "logs" / "orchestrator.log").open("ab")
    port = config.orchestrator.endpoint.rsplit(":", 1)[-1].split("/")[0]
    argv = [sys.executable, "-m", "services", "--data-dir", str(data_dir), "up", "--nats-port", "0"]
    if port.isdigit():
        argv += ["--port", port]
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    _pidfile(config).write_text(f"{proc.pid}\n")
    return proc.pid


def stop_background(config: Config, timeout_s: float = 60) -> bool:
    """SIGTERM the local stack and wait for it to be gone; False if it would not stop."""
    pid = running_pid(config)
    if not pid:
        return True
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and running_pid(config):
        time.sleep(0.2)
    if running_pid(config):
        return False
    _pidfile(config).unlink(missing_ok=True)
    return True


def wait_healthy(client: ApiClient, timeout_s: float) -> bool:
    """Whether the orchestrator answers healthy within ``timeout_s`` (asked every half second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.health().get("status") == "healthy":
                return True
        except OrchestratorUnavailable:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
