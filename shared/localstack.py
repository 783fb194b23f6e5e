"""The local stack on this machine: its pidfile and logs under the data directory, starting
it detached (``provisioning orchestrator start``, ``auto_start``, ``provisioning-orchestrator
--daemon``), and the state file through which the CLI and a running ``up`` share one world:
the CLI, left at its default data directory, uses the one of the local stack that answers at
its endpoint (so ``make run`` then ``provisioning server list`` see the same servers)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "pidfile",
    "port_args",
    "read_stack_state",
    "remove_stack_state",
    "running_pid",
    "start_detached",
    "write_stack_state",
]


def pidfile(data_dir: Path) -> Path:
    """Where a detached local stack keeps its pid."""
    return data_dir / "orchestrator.pid"


def port_args(endpoint: str) -> list[str]:
    """``up``'s ``--port`` for the stack an endpoint points at (none when it names no port)."""
    port = endpoint.rsplit(":", 1)[-1].split("/")[0]
    return ["--port", port] if port.isdigit() else []


def running_pid(data_dir: Path) -> int | None:
    """The pid of the local stack this data directory's pidfile names, if it is alive."""
    try:
        pid = int(pidfile(data_dir).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def start_detached(data_dir: Path, *up_args: str, config_path: str | None = None) -> int:
    """Start ``provisioning-orchestrator up`` in the background (its own session, output in
    ``<data_dir>/logs/orchestrator.log``, pid in ``<data_dir>/orchestrator.pid``); returns the
    pid, or the running one's."""
    pid = running_pid(data_dir)
    if pid:
        return pid
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "services", "--data-dir", str(data_dir)]
    if config_path:
        argv += ["--config", config_path]
    with (data_dir / "logs" / "orchestrator.log").open("ab") as log:
        proc = subprocess.Popen(
            [*argv, "up", *up_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    pidfile(data_dir).write_text(f"{proc.pid}\n")
    return proc.pid


def state_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "provisioning" / "local-stack.json"


def write_stack_state(*, endpoint: str, data_dir: Path, infra_dir: str) -> None:
    """What a running ``up`` tells the CLI: where it listens and where its data lives."""
    path = state_path()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "pid": os.getpid(),
            "endpoint": endpoint,
            "data_dir": str(data_dir.resolve()),
            "infra_dir": infra_dir,
        }
        path.write_text(json.dumps(state))


def remove_stack_state() -> None:
    """Forget the state file, if it is this process's."""
    path = state_path()
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


def read_stack_state() -> dict[str, Any] | None:
    """The running local stack's state, if one runs (its process is alive)."""
    try:
        state = json.loads(state_path().read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if isinstance(state, dict) else None
