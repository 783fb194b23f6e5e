"""No process of a task survives its executor, and tasks cannot read the executor's secrets or
the bus's files: real NATS, services, ``nu`` and the programs tasks start.

- A task's programs outlive an executor killed with -9 (its ``nu`` dies with it, what ``nu``
  started is re-parented and runs on): the executor that gets the redelivery kills them before
  the attempt runs again, so no two copies ever run at once; an executor that starts on the
  same host kills them even when the redelivery went elsewhere.
- Under the executor, a child subreaper, a program that leaves the task's session and loses
  its parent is still found and killed when the task ends.
- An executor running as root runs tasks as an unprivileged user: a task cannot read its
  executor's ``/proc/<pid>/environ``, the JetStream store, the logs, the data directory or the
  configuration file, and a Nushell task still works end to end.

These need root (to switch users): they skip elsewhere, and fail under ``CI=true``.
"""

from __future__ import annotations

import os
import pwd
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from .support import (
    PROBE_ENV,
    NatsServer,
    Stack,
    running_executor,
    start_executor,
    submit,
    task_processes,
    task_record,
    wait_until,
)

pytestmark = pytest.mark.e2e

ACK_WAIT = {"PROVISIONING_EXECUTOR_ACK_WAIT_SECONDS": "3"}
TASK_USER = "provisioning-task"  # the executor's automatic choice when it runs as root


@pytest.fixture(autouse=True)
def _as_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the isolation tests must run as root in CI")
        pytest.skip("switching task users needs root")


def _beats(stack: Stack) -> dict[int, list[Decimal]]:
    """``{pid: [times]}`` of every heartbeat loop (``probe.heartbeat``) that ever ran."""
    beats = stack.data_dir / "provider" / "beats"
    found = {}
    for path in beats.glob("beat.*") if beats.is_dir() else ():
        times = [Decimal(line) for line in path.read_text().split()]
        if times:
            found[int(path.suffix[1:])] = times
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.stack(executors=2, env={**PROBE_ENV, **ACK_WAIT})
def test_a_killed_executors_programs_never_run_beside_the_redelivered_attempt(
    stack: Stack,
) -> None:
    """The issue's case: kill -9 of the executor while its task's external program runs; the
    redelivered attempt starts on the other executor only once that program is dead."""
    wf_id = submit(stack.http, [{"id": "hb", "action": "probe.heartbeat", "args": {"seconds": 8}}])
    victim = running_executor(stack, wf_id, "hb")
    first = wait_until(lambda: list(_beats(stack)), 20, what="the first copy to beat")[0]
    victim.kill9()
    # the orphaned loop runs on, with nobody to stop it but the next executor of this host
    wait_until(lambda: len(_beats(stack)[first]) >= 10 and _alive(first), 5, what="beats")
    count = len(_beats(stack)[first])
    wait_until(lambda: len(_beats(stack)[first]) > count, 2, what="the orphan to beat on")

    view = stack.http.wait_workflow(wf_id, timeout=60)
    assert view["status"] == "completed", view
    assert task_record(stack, wf_id, "hb").delivery == 2

    runs = _beats(stack)
    assert len(runs) == 2, runs.keys()  # one copy per delivery, each a loop of its own
    (old, new) = sorted(runs.values(), key=lambda times: times[0])
    assert old[-1] < new[0], (old[-1], new[0])  # never two at once: the orphan was killed ...
    assert len(old) < 80  # ... before its end
    assert len(new) == 80  # and the redelivered copy ran whole
    assert task_processes(f"{wf_id}.hb") == []
    assert not _alive(first)
    logs = "\n".join(e.log() for e in stack.executors)
    assert f"processes of {wf_id}.hb left behind by an earlier run" in logs


@pytest.mark.stack(env=PROBE_ENV)
def test_an_executor_starting_on_the_host_ends_what_a_dead_one_left(stack: Stack) -> None:
    """The redelivery may go to another host: the next executor to start here (systemd
    restarts it) ends the dead one's leftovers anyway, from their footprint."""
    doomed = start_executor(stack, "--pool", "doomed")
    wf_id = submit(
        stack.http,
        [{"id": "hb", "action": "probe.heartbeat", "args": {"seconds": 60}, "pool": "doomed"}],
    )
    running_executor(stack, wf_id, "hb")
    orphan = wait_until(lambda: list(_beats(stack)), 20, what="the loop to beat")[0]
    doomed.kill9()
    footprints = list((stack.data_dir / "run" / "tasks").glob("*.json"))
    assert _alive(orphan) and task_processes(f"{wf_id}.hb")

    start_executor(stack, "--pool", "elsewhere")  # not the task's pool: no redelivery here
    wait_until(lambda: not _alive(orphan), 15, what="the new executor to end the orphan")
    assert task_processes(f"{wf_id}.hb") == []
    assert [p.name for p in footprints] == [f"{wf_id}.hb.json"]  # what told it, now gone
    assert not footprints[0].exists()
    status, _ = stack.http.post(f"/workflows/{wf_id}/cancel", {})
    assert status in (200, 202)


@pytest.mark.stack(env={**PROBE_ENV, "PROVISIONING_EXECUTOR_ALLOW_COMMANDS": "1"})
def test_a_program_that_leaves_the_session_and_loses_its_parent_is_still_killed(
    stack: Stack,
) -> None:
    """``setsid`` plus an exiting parent escapes a scan of the session and the descendants
    (the runner without a subreaper); under the executor it is an adopted orphan, still the
    task's by its identity, or a stray once no task runs (``env -i`` dropped the identity)."""
    marker = f"{300 + uuid.uuid4().int % 600}.{uuid.uuid4().int % 1000}"
    script = f"setsid sleep {marker} & env -i /usr/bin/setsid /bin/sleep 1{marker} & echo started"
    wf_id = submit(
        stack.http, [{"id": "esc", "action": "command.run", "args": {"argv": ["sh", "-c", script]}}]
    )
    view = stack.http.wait_workflow(wf_id, timeout=30)
    assert view["status"] == "completed", view

    def sleepers() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd[:2] in ([b"sleep", marker.encode()], [b"/bin/sleep", f"1{marker}".encode()]):
                found.append(int(entry))
        return found

    wait_until(lambda: not sleepers(), 5, what="the escaped sleeps to be killed")
    assert task_processes(f"{wf_id}.esc") == []
    executor = stack.executors[0]
    assert executor.proc is not None
    zombies = [  # the executor reaped what it adopted
        pid
        for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
        if (text := _stat_text(pid)) and text[1] == str(executor.proc.pid) and text[0] == "Z"
    ]
    assert zombies == []


def _stat_text(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except OSError:
        return []


SECRETS = {
    "PROVISIONING_GATEWAY_AUTH_TOKEN": "gw-token-3f9a1c",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-77d2e0",
    "AWS_ACCESS_KEY_ID": "AKIAISOLATIONTEST",
}
NATS_PASSWORD = "nats-pass-5b8e41"
CONFIG_SECRET = "cfg-token-a0c3d9"


def test_tasks_cannot_read_the_executors_secrets_or_the_bus_files(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "logs").mkdir(parents=True)  # as `up` lays it out: the store and logs inside
    (data_dir / "logs" / "gateway.log").write_text(f"token {CONFIG_SECRET}\n")
    config = tmp_path / "config.toml"
    config.write_text(f'[orchestrator]\nauth_token = "{CONFIG_SECRET}"\n')
    config.chmod(0o600)
    nats = NatsServer(
        data_dir / "nats",
        extra_conf=f'authorization {{ user: "svc", password: "{NATS_PASSWORD}" }}',
    ).start()
    nats_url = f"nats://svc:{NATS_PASSWORD}@127.0.0.1:{nats.port}"
    env = {**PROBE_ENV, **SECRETS, "NATS_URL": nats_url, "PROVISIONING_CONFIG": str(config)}
    stack = Stack(tmp_path, nats, env=env)
    stack.env["PROVISIONING_CONFIG"] = str(config)
    for service in stack.services:
        service.env = {**service.env, "PROVISIONING_CONFIG": str(config)}
    try:
        stack.start()
        store = sorted(p for p in (data_dir / "nats").rglob("*") if p.is_file())
        assert store, "the JetStream store is under the data directory"
        paths = [
            str(store[0]),
            f"{data_dir}/nats/",
            f"{data_dir}/",
            f"{data_dir}/run/",
            f"{data_dir}/logs/gateway.log",
            str(config),
        ]
        wf_id = submit(
            stack.http,
            [
                {"id": "snoop", "action": "probe.snoop", "args": {"paths": paths}},
                {
                    "id": "create",
                    "action": "server.create",
                    "args": {"infra": "iso", "server": {"hostname": "iso-1"}, "delay_seconds": 0},
                },
            ],
            on_failure="continue",
        )
        view = stack.http.wait_workflow(wf_id, timeout=60)
        by_id = {t["id"]: t for t in view["tasks"]}
        snoop = by_id["snoop"]
        assert snoop["status"] == "completed", snoop
        out = snoop["output"]
        executor = stack.executors[0].proc
        assert executor is not None and out["ppid"] == executor.pid
        reads = {r["path"]: r for r in out["reads"]}
        assert set(reads) == {f"/proc/{executor.pid}/environ", *paths}
        for read in reads.values():
            assert read["exit_code"] != 0, read
            assert "Permission denied" in read["stderr"], read
        _assert_no_secret(stack, wf_id, view)
        task_user = pwd.getpwnam(TASK_USER)  # an unprivileged user: no capabilities either
        assert out["uid"] == task_user.pw_uid and out["cap_eff"] == "0" * 16

        # and the executor's own start-up environment no longer holds them (root reads it)
        environ = Path(f"/proc/{executor.pid}/environ").read_bytes()
        for secret in (*SECRETS.values(), NATS_PASSWORD):
            assert secret.encode() not in environ
        assert b"PATH=" in environ

        created = by_id["create"]  # a Nushell task still works end to end as the task user
        assert created["status"] == "completed", created
        assert created["output"]["hostname"] == "iso-1"
        record = data_dir / "provider" / "local" / "servers" / "iso-1.json"
        assert record.stat().st_uid == task_user.pw_uid
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()
        nats.stop()


def _assert_no_secret(stack: Stack, wf_id: str, view: dict[str, Any]) -> None:
    import json

    status, logs = stack.http.get(f"/tasks/{wf_id}.snoop/logs")
    assert status == 200
    dump = json.dumps(view) + json.dumps(logs)
    for secret in (*SECRETS.values(), NATS_PASSWORD, CONFIG_SECRET):
        assert secret not in dump, secret
