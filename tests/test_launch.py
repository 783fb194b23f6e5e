"""``provisioning-launch`` (core/launch.c), the program the runner starts every task program
through: built by ``make install``, it switches to the task user with no supplementary groups,
makes the program die with its runner, refuses what it does not understand, and the runner
uses it (setpriv only where it was not built)."""

from __future__ import annotations

import grp
import os
import pwd
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.runner import LAUNCH, Runner, TaskUser

from .support import wait_until

BUILT = Path(sys.executable).parent / LAUNCH


@pytest.fixture
def launch() -> Path:
    if not os.access(BUILT, os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{BUILT} was not built (make install needs a C compiler)")
        pytest.skip(f"{BUILT} was not built (no C compiler)")
    return BUILT


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=10)


def test_the_runner_starts_tasks_through_it(launch: Path, tmp_path: Path) -> None:
    runner = Runner(data_dir=tmp_path)
    assert runner.launcher == LAUNCH
    assert runner._prefix == [str(launch), "-", "-"]
    user = TaskUser("someone", 12345, 23456)
    as_user = Runner(data_dir=tmp_path, task_user=user)
    assert as_user._prefix == [str(launch), "12345", "23456"]
    assert as_user._spawn_user == {}  # switched after the fork: Python keeps using vfork


def test_without_a_switch_the_program_runs_as_it_was_given(launch: Path) -> None:
    done = _run(str(launch), "-", "-", "/bin/sh", "-c", 'echo "$0 $1 $(id -u)"', "a b", "$HOME")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"a b $HOME {os.getuid()}\n"  # arguments are data, none expanded


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_it_switches_to_the_task_user_with_no_other_group(launch: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    done = _run(str(launch), str(nobody.pw_uid), str(nobody.pw_gid), "/usr/bin/id")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        f"uid={nobody.pw_uid}(nobody)",
        f"gid={nobody.pw_gid}({_group(nobody.pw_gid)})",
        f"groups={nobody.pw_gid}({_group(nobody.pw_gid)})",
    ]
    status = _run(
        str(launch), str(nobody.pw_uid), str(nobody.pw_gid), "/bin/cat", "/proc/self/status"
    )
    fields = dict(line.split(":", 1) for line in status.stdout.splitlines())
    assert fields["Uid"].split() == [str(nobody.pw_uid)] * 4  # real, effective, saved, fs
    assert fields["Gid"].split() == [str(nobody.pw_gid)] * 4
    assert fields["CapEff"].strip() == "0" * 16


def _group(gid: int) -> str:
    return grp.getgrgid(gid).gr_name


@pytest.mark.parametrize(
    ("argv", "status", "says"),
    [
        ([], 126, "too few arguments"),
        (["-", "-"], 126, "too few arguments"),
        (["0", "-", "/bin/true"], 126, "both a uid and a gid"),
        (["x", "0", "/bin/true"], 126, "decimal numbers"),
        (["-1", "0", "/bin/true"], 126, "decimal numbers"),
        (["0 ", "0", "/bin/true"], 126, "decimal numbers"),
        (["4294967295", "0", "/bin/true"], 126, "decimal numbers"),  # the kernel's "unchanged"
        (["-", "-", "true"], 126, "absolute path"),
        (["-", "-", "/nonexistent/program"], 127, "No such file or directory"),
    ],
)
def test_it_refuses_what_it_does_not_understand(
    launch: Path, argv: list[str], status: int, says: str
) -> None:
    done = _run(str(launch), *argv)
    assert done.returncode == status
    assert says in done.stderr


def test_an_unprivileged_user_cannot_switch(launch: Path) -> None:
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        done = subprocess.run(
            [str(launch), "0", "0", "/usr/bin/id"],
            capture_output=True,
            text=True,
            timeout=10,
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
        )
    else:
        done = _run(str(launch), "0", "0", "/usr/bin/id")
    assert done.returncode == 126
    assert "Operation not permitted" in done.stderr


def test_the_program_dies_with_its_runner(launch: Path, tmp_path: Path) -> None:
    """A runner killed with -9 takes its task program with it (the parent-death signal,
    asked for after the switch of users, which would clear it)."""
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}; exec sleep 60"
    runner = textwrap.dedent(
        f"""
        import subprocess, sys, time
        argv = [{str(launch)!r}, *sys.argv[1:3], "/bin/sh", "-c", {script!r}]
        child = subprocess.Popen(argv, start_new_session=True)
        time.sleep(60)
        """
    )
    ids = ["-", "-"]
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        ids = [str(nobody.pw_uid), str(nobody.pw_gid)]
        tmp_path.chmod(0o777)
    parent = subprocess.Popen([sys.executable, "-c", runner, *ids])
    try:
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=10)
        pid = int(pidfile.read_text())
        assert Path(f"/proc/{pid}").exists()
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        wait_until(lambda: _gone(pid), timeout=10)
    finally:
        if parent.poll() is None:
            parent.kill()


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"  # killed, waiting for init (or the test's subreaper) to collect it


@pytest.mark.skipif(os.geteuid() != 0, reason="a task user needs root")
def test_a_program_is_looked_up_as_the_task_user_would(tmp_path: Path) -> None:
    """The task's PATH is searched for what the task user may execute, skipping what it may
    not (as execvp does): a copy in a directory closed to it is passed over for the next one;
    with none it may run, the error says which one it found and why it may not."""
    from core.runner import _find_program

    nobody = pwd.getpwnam("nobody")
    user = TaskUser("nobody", nobody.pw_uid, nobody.pw_gid)
    closed, open_ = tmp_path / "closed", tmp_path / "open"
    for directory in (closed, open_):
        directory.mkdir()
        (directory / "tool").write_text("#!/bin/sh\n")
        (directory / "tool").chmod(0o755)
    tmp_path.chmod(0o755)
    closed.chmod(0o700)  # root's only
    open_.chmod(0o755)
    path = f"{closed}:{open_}"
    assert _find_program("tool", path, None) == (str(closed / "tool"), "")
    assert _find_program("tool", path, user) == (str(open_ / "tool"), "")
    program, why = _find_program("tool", str(closed), user)
    assert program is None
    assert f"{closed / 'tool'}: the task user 'nobody' may not: {closed} is not searchable" in why
    assert _find_program(str(closed / "tool"), "", user)[0] is None
    assert _find_program("no-such-tool", path, user) == (None, "")
