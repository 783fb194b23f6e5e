"""The shipped example workflows run as written (direct mode: the same engine, real Nushell)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from core import WORKFLOWS_DIR

from .support import VENV_BIN


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PROVISIONING_ORCHESTRATOR_DATA_DIR": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
    }
    env.pop("PROVISIONING_CONFIG", None)
    return subprocess.run(
        [str(VENV_BIN / "provisioning"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def run_direct(tmp_path: Path, *args: str) -> dict[str, Any]:
    result = cli(tmp_path, *args, "--direct", "-o", "json")
    assert result.returncode == 0, result.stderr + result.stdout
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def test_each_kubernetes_step_receives_its_servers_address(tmp_path: Path) -> None:
    run = run_direct(tmp_path, "workflow", "submit", str(WORKFLOWS_DIR / "example3-addresses.toml"))
    tasks = run["tasks"]
    assert run["status"] == "completed", tasks
    for n in (1, 2):
        address = tasks[f"server-{n}"]["output"]["ip"]
        assert tasks[f"kubernetes-{n}"]["output"]["address"] == address


def test_the_inventory_drives_one_install_per_server_found(tmp_path: Path) -> None:
    run_direct(tmp_path, "server", "create", "--infra", "wuji")
    run = run_direct(tmp_path, "workflow", "submit", str(WORKFLOWS_DIR / "example3-inventory.yaml"))
    tasks = run["tasks"]
    assert run["status"] == "completed", tasks
    found = sorted(s["hostname"] for s in tasks["inventory"]["output"]["servers"])
    installed = tasks["report"]["output"]["installed"]
    assert (
        sorted(i["server"] for i in installed)
        == found
        == [
            "wuji-cp-1",
            "wuji-worker-1",
            "wuji-worker-2",
        ]
    )
    assert {t for t in tasks if t.startswith("containerd[")} == {
        f"containerd[{i}]" for i in range(3)
    }
