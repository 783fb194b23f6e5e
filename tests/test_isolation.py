"""What an executor sets up so that tasks cannot reach its secrets, in process (the whole stack:
test_executor_isolation.py): the task user, the data directory's modes, the access check, the
scrubbed environment, and the runner running a task as another user without trusting what
that user leaves in its directory."""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.registry import load_registry
from core.runner import Runner, RunResult, TaskUser, resolve_binary
from services.executor import isolation
from shared.errors import ConfigError

from .support import FIXTURES

ROOT = Path(__file__).resolve().parent.parent


def _need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the isolation tests must run as root in CI")
        pytest.skip("switching task users needs root")


@pytest.fixture
def task_user() -> TaskUser:
    _need_root()
    user = isolation.resolve_task_user("")
    assert user is not None and user.name == isolation.DEFAULT_TASK_USER
    return user


@pytest.fixture
def reachable(tmp_path: Path) -> Iterator[Path]:
    """A directory under /tmp the task user can pass through (tmp_path's parents may be
    closed to it outside of the test suite's own base directory)."""
    path = Path(tempfile.mkdtemp(prefix="prov-iso-"))
    path.chmod(0o711)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def test_the_automatic_task_user_is_the_dedicated_one_as_root_else_our_own() -> None:
    if os.geteuid() == 0:
        user = isolation.resolve_task_user("")
        assert user is not None and user.uid != 0
        assert pwd.getpwnam(user.name).pw_shell == "/usr/sbin/nologin"
        assert isolation.resolve_task_user("root") is None  # asked for: tasks as root
    else:
        assert isolation.resolve_task_user("") is None
        with pytest.raises(ConfigError, match="needs an executor running as root"):
            isolation.resolve_task_user("root")
    with pytest.raises(ConfigError, match="does not exist on this host"):
        isolation.resolve_task_user(f"no-such-user-{uuid.uuid4().hex[:8]}")


def test_the_data_directory_is_closed_to_tasks_but_their_own_state(
    task_user: TaskUser, reachable: Path
) -> None:
    data = reachable / "data"
    (data / "nats" / "jetstream").mkdir(parents=True)
    (data / "logs").mkdir()
    (data / "orchestrator.pid").write_text("1")
    (data / "provider" / "local").mkdir(parents=True)  # records direct mode wrote as root
    (data / "provider" / "local" / "r.json").write_text("{}")
    for path in (data, data / "nats", data / "logs", data / "orchestrator.pid"):
        path.chmod(0o755)

    state, runtime = isolation.prepare_data_dir(data, task_user)
    assert (state, runtime) == (data / "provider", data / "run")

    def mode(path: Path) -> int:
        return path.stat().st_mode & 0o777

    assert mode(data) == 0o751  # others may pass through, not list
    assert mode(data / "nats") == mode(data / "logs") == 0o750
    assert mode(data / "orchestrator.pid") == 0o750
    assert mode(runtime) == 0o700
    assert mode(state) == 0o700
    for path in (state, state / "local", state / "local" / "r.json"):
        assert (path.stat().st_uid, path.stat().st_gid) == (task_user.uid, task_user.gid)


def test_access_the_task_user_lacks_is_refused_naming_the_path(
    task_user: TaskUser, reachable: Path
) -> None:
    closed = reachable / "closed"
    (closed / "lib").mkdir(parents=True)
    closed.chmod(0o700)
    nu = resolve_binary("nu")
    isolation.check_access(task_user, [(Path(nu), "x"), (reachable, "x")])
    with pytest.raises(ConfigError) as caught:
        isolation.check_access(task_user, [(Path(nu), "x"), (closed / "lib", "r")])
    assert f"{closed} is not searchable" in caught.value.message
    assert "provisioning-task" in caught.value.message


def test_secrets_leave_the_environment_and_proc_environ() -> None:
    """In a process of its own: its start-up environment is what the kernel shows."""
    script = (
        "import json, os, sys\n"
        "from pathlib import Path\n"
        "from services.executor import isolation\n"
        "dropped = isolation.scrub_environment()\n"
        "shown = Path('/proc/self/environ').read_bytes().split(b'\\0')\n"
        "print(json.dumps({'dropped': dropped, 'env': sorted(os.environ),\n"
        "    'shown': [e.decode() for e in shown if e]}))\n"
    )
    env = {
        "PATH": os.environ["PATH"],
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PROVISIONING_GATEWAY_AUTH_TOKEN": "tok-9d1f",
        "AWS_SECRET_ACCESS_KEY": "aws-1c7e",
        "NATS_URL": "nats://u:pw-4e2a@h:4222",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    import json

    out = json.loads(done.stdout)
    assert out["dropped"] == [
        "AWS_SECRET_ACCESS_KEY",
        "NATS_URL",
        "PROVISIONING_GATEWAY_AUTH_TOKEN",
        "PYTHONPATH",
    ]
    assert out["env"] == ["LANG", "LC_ALL", "PATH"]
    assert sorted(e.split("=", 1)[0] for e in out["shown"]) == ["LANG", "LC_ALL", "PATH"]
    assert not any(s in done.stdout for s in ("tok-9d1f", "aws-1c7e", "pw-4e2a"))


# -- the runner as another user --------------------------------------------------------------


async def _run(runner: Runner, action: str, args: dict[str, Any]) -> RunResult:
    registry = load_registry(FIXTURES / "registry.toml", FIXTURES / "nulib")

    async def nothing(*_: Any) -> None:
        return None

    return await runner.run(
        registry.get(action),
        args,
        task_env={"PROVISIONING_TASK_ID": f"{uuid.uuid4().hex}.t"},
        timeout_s=30,
        on_line=nothing,
        on_progress=nothing,
    )


@pytest.fixture
def runner(task_user: TaskUser, reachable: Path) -> Runner:
    isolation.prepare_data_dir(reachable / "data", task_user)
    return Runner(nu_binary=resolve_binary("nu"), data_dir=reachable / "data", task_user=task_user)


async def test_a_task_runs_as_the_task_user_in_a_directory_of_its_own(
    runner: Runner, task_user: TaskUser
) -> None:
    done = await _run(runner, "probe.snoop", {"paths": ["/etc/shadow", "/root/"]})
    assert done.outcome == "completed", done
    out = done.output
    assert out["ppid"] == os.getpid() and out["uid"] == task_user.uid
    for read in out["reads"]:
        assert "Permission denied" in read["stderr"], read
    env = await _run(runner, "probe.env", {})
    home = Path(env.output["cwd"])
    assert home.name == "work" and not home.parent.exists()  # removed with its parent
    created = await _run(runner, "server.create", {"infra": "i", "server": {"hostname": "h"}})
    assert created.outcome == "completed", created
    assert (runner.state_dir / "local" / "servers" / "h.json").stat().st_uid == task_user.uid


async def test_the_result_file_is_not_followed_out_of_the_tasks_directory(
    runner: Runner,
) -> None:
    for target in ("/etc/shadow", "/etc/hostname"):
        done = await _run(runner, "probe.link-result", {"target": target})
        assert done.outcome == "failed" and done.reason == "error", done
        assert done.output is None
        assert "cannot read the result" in (done.error or ""), done


def test_runner_tasks_are_all_reaped_under_a_subreaper(reachable: Path) -> None:
    """A process of its own that becomes a subreaper, as the executor does: an orphan that
    left the task's session is killed when the task ends, and no zombie is left."""
    script = f"""
import asyncio, json, os, signal, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from core.processes import become_subreaper, children, stat
from core.registry import load_registry
from core.runner import Runner, resolve_binary
assert become_subreaper()
runner = Runner(nu_binary=resolve_binary("nu"), data_dir=Path({str(reachable)!r}))
assert runner.family.adopts

async def main():
    asyncio.get_running_loop().add_signal_handler(signal.SIGCHLD, runner.reap_adopted)
    async def nothing(*_): pass
    done = await runner.run(
        load_registry().get("command.run"),
        {{"argv": ["sh", "-c", "setsid sleep 317 & sleep 318 & echo started"]}},
        task_env={{"PROVISIONING_TASK_ID": "w.t"}}, timeout_s=30,
        on_line=nothing, on_progress=nothing)
    await asyncio.sleep(0.3)
    kids = [(p, stat(p)) for p in children(os.getpid())]
    print(json.dumps({{"outcome": done.outcome, "children": kids}}))

asyncio.run(main())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    import json

    out = json.loads(done.stdout.splitlines()[-1])
    assert out == {"outcome": "completed", "children": []}, done.stderr


def test_direct_mode_keeps_records_where_executors_do_and_moves_old_ones(
    reachable: Path,
) -> None:
    """Direct mode (no task user) keeps its records in ``provider/`` too; records of the old
    layout (``<data dir>/local``) move there on first use."""
    old = reachable / "data" / "local" / "servers"
    old.mkdir(parents=True)
    (old / "o.json").write_text('{"hostname": "o", "infra": "i"}')
    runner = Runner(nu_binary=resolve_binary("nu"), data_dir=reachable / "data")
    done = asyncio.run(_run(runner, "server.create", {"infra": "i", "server": {"hostname": "d"}}))
    assert done.outcome == "completed", done
    servers = reachable / "data" / "provider" / "local" / "servers"
    assert sorted(p.name for p in servers.iterdir()) == ["d.json", "o.json"]
    assert not (reachable / "data" / "local").exists()
