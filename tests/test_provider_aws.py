"""The AWS provider against a real EC2 endpoint: moto's server (``moto_server`` from the dev
dependencies) on a free port, ``AWS_ENDPOINT_URL`` pointing at it, the official ``aws`` command
line doing the calls. The provider alone through the runner, then direct mode, then the whole
stack: the CLI sequence, the seed's Example 3 on five AWS servers, the 422 for an unknown
provider, and a task that tries to leak its credentials every way it can."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core import INFRA_DIR
from core.providers import Providers
from core.registry import Registry, load_registry
from core.runner import Runner, RunResult, resolve_binary
from shared.config import load_config
from testkit.otlp import Receiver

from .support import (
    PROBE_ENV,
    VENV_BIN,
    Stack,
    free_port,
    read_event_stream,
    running_stack,
    wait_until,
)

pytestmark = pytest.mark.e2e

SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # the shape of a real one
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLE-session-token-0123456789"  # no shape: masked by value
REGION = "us-east-1"  # the sample infra's
IMAGE = "ami-1e749f67"  # in moto's built-in list
SAMPLE_HOSTS = ["wuji-aws-cp-1", *(f"wuji-aws-worker-{i}" for i in range(1, 5))]
LIVE = ("pending", "running", "stopping", "stopped")


class Moto:
    """``moto_server`` as a real process; state is per region, reset between tests."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MOTO_ENABLE_AMI_VALIDATION": "true"}  # unknown images fail
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            wait_until(self._answers, 30, 0.1, what="moto_server to answer")
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
        with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2) as response:
            return bool(response.status == 200)

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/moto-api/reset", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def env(self) -> dict[str, str]:
        """What an operator would export to use this endpoint."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_SESSION_TOKEN": SESSION_TOKEN,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def instances(self, region: str = REGION) -> list[dict[str, Any]]:
        """Every instance of a region, asked with boto3 (not through the code under test):
        ``{id, state, tags}``."""
        import boto3

        client = boto3.client(
            "ec2",
            region_name=region,
            endpoint_url=self.url,
            aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
            aws_secret_access_key=SECRET_KEY,
        )
        found = []
        for reservation in client.describe_instances()["Reservations"]:
            for instance in reservation["Instances"]:
                tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                found.append(
                    {"id": instance["InstanceId"], "state": instance["State"]["Name"], "tags": tags}
                )
        return found

    def live(self, region: str = REGION) -> dict[str, str]:
        """Hostname tag -> instance id of the instances that are not terminated."""
        return {
            i["tags"].get("provisioning:hostname", "?"): i["id"]
            for i in self.instances(region)
            if i["state"] in LIVE
        }


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    server = Moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ec2(moto: Moto) -> Moto:
    moto.reset()
    return moto


# -- the provider alone, through the runner --------------------------------------------------------


class Calls:
    """Runs actions the executor's way, with the environment captured from ``env``."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        config = load_config(environ={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
        self.registry: Registry = load_registry()
        self.runner = Runner(
            nu_binary=resolve_binary("nu"),
            data_dir=tmp_path / "data",
            providers=Providers.from_config(config, environ=env, home=tmp_path),
        )
        self.progress: list[tuple[int, str]] = []
        self.lines: list[str] = []

    async def run(self, action: str, args: dict[str, Any]) -> RunResult:
        self.progress.clear()
        self.lines.clear()

        async def on_line(stream: str, line: str) -> None:
            self.lines.append(line)

        async def on_progress(percent: int, message: str) -> None:
            self.progress.append((percent, message))

        return await self.runner.run(
            self.registry.get(action),
            args,
            task_env={"PROVISIONING_TASK_ID": "wf.t", "PROVISIONING_WORKFLOW_ID": "wf"},
            timeout_s=120,
            on_line=on_line,
            on_progress=on_progress,
        )

    async def ok(self, action: str, args: dict[str, Any]) -> Any:
        result = await self.run(action, args)
        assert result.outcome == "completed", (result, self.lines)
        return result.output


def _server(hostname: str, **fields: Any) -> dict[str, Any]:
    return {
        "hostname": hostname,
        "provider": "aws",
        "region": REGION,
        "image": IMAGE,
        "labels": {"role": "web"},
        "tags": {"team": "platform"},
        **fields,
    }


async def test_create_is_idempotent_and_list_status_plan_delete_go_by_tags(
    tmp_path: Path, ec2: Moto
) -> None:
    calls = Calls(tmp_path, ec2.env())
    args = {"infra": "lab", "server": _server("web-1", plan="medium")}

    created = await calls.ok("server.create", args)
    assert created["existed"] is False and created["state"] == "running"
    assert created["provider"] == "aws" and created["instance_id"].startswith("i-")
    assert created["instance_type"] == "t3.medium" and created["image"] == IMAGE
    assert created["ip"] and created["private_ip"] and created["zone"].startswith(REGION)
    assert created["labels"] == {"role": "web"}
    assert [p for p, _ in calls.progress][:3] == [10, 30, 50] and calls.progress[-1][0] == 100
    assert calls.progress[1][1] == f"launching t3.medium from {IMAGE} in {REGION}"
    assert (
        created["ip"] in calls.progress[-1][1] and created["instance_id"] in calls.progress[-1][1]
    )
    (instance,) = ec2.instances()
    assert instance["id"] == created["instance_id"] and instance["state"] == "running"
    assert instance["tags"] == {
        "Name": "web-1",
        "provisioning:infra": "lab",
        "provisioning:hostname": "web-1",
        "provisioning:plan": "medium",
        "provisioning:label:role": "web",
        "team": "platform",
    }

    again = await calls.ok("server.create", args)
    assert again["existed"] is True and again["instance_id"] == created["instance_id"]
    assert len(ec2.instances()) == 1  # nothing launched
    elsewhere = await calls.run("server.create", {**args, "infra": "other"})
    assert elsewhere.outcome == "failed"
    assert "web-1 already exists in infra lab" in (elsewhere.error or "")

    listed = await calls.ok(
        "server.list", {"providers": ["local", "aws"], "regions": [REGION], "infra": "lab"}
    )
    assert [(s["hostname"], s["instance_id"]) for s in listed["servers"]] == [
        ("web-1", created["instance_id"])
    ]
    assert (await calls.ok("server.list", {"providers": ["aws"], "infra": "nope"}))["servers"] == []
    status = await calls.ok("server.status", {"hostname": "web-1", "provider": "aws"})
    assert status["state"] == "running" and status["instance_id"] == created["instance_id"]
    assert (await calls.ok("server.plan", args))["change"] == "none"
    bigger = await calls.ok("server.plan", {**args, "server": _server("web-1", plan="large")})
    assert bigger["change"] == "update" and bigger["detail"]["replace"] is False
    assert bigger["detail"]["differences"] == [
        {"field": "instance_type", "current": "t3.medium", "wanted": "t3.large"}
    ]
    assert (await calls.ok("server.plan", {**args, "state": "absent"}))["change"] == "delete"
    fresh = await calls.ok("server.plan", {**args, "server": _server("web-2")})
    assert fresh["change"] == "create" and fresh["detail"]["instance_type"] == "t3.micro"

    deleted = await calls.ok("server.delete", {"hostname": "web-1", "provider": "aws"})
    assert deleted["deleted"] is True and deleted["instance_ids"] == [created["instance_id"]]
    assert [i["state"] for i in ec2.instances()] == ["terminated"]
    assert calls.progress[-1] == (
        100,
        f"server web-1 deleted ({created['instance_id']} terminated)",
    )
    missing = await calls.ok("server.delete", {"hostname": "web-1", "provider": "aws"})
    assert missing["deleted"] is False
    status = await calls.ok("server.status", {"hostname": "web-1", "provider": "aws"})
    assert status["state"] == "absent"


async def test_a_bad_image_fails_with_awss_message_and_leaves_nothing(
    tmp_path: Path, ec2: Moto
) -> None:
    calls = Calls(tmp_path, ec2.env())
    result = await calls.run(
        "server.create", {"infra": "lab", "server": _server("bad-1", image="ami-00000000")}
    )
    assert result.outcome == "failed" and result.reason == "exit_code"
    assert "InvalidAMIID.NotFound" in (result.error or "")
    assert "The image id '[ami-00000000]' does not exist" in (result.error or ""), result.error
    assert ec2.instances() == []


async def test_a_failure_after_the_launch_terminates_the_instance(
    tmp_path: Path, ec2: Moto
) -> None:
    calls = Calls(tmp_path, ec2.env())
    result = await calls.run(
        "server.create", {"infra": "lab", "server": _server("half-1"), "fail_at": 60}
    )
    assert result.outcome == "failed"
    (instance,) = ec2.instances()
    assert instance["state"] == "terminated"
    assert f"simulated failure at 60% (instance {instance['id']} terminated)" in (
        result.error or ""
    )
    # and a retry starts afresh: the lookup does not find the terminated one
    retried = await calls.ok("server.create", {"infra": "lab", "server": _server("half-1")})
    assert retried["existed"] is False and retried["instance_id"] != instance["id"]


async def test_without_credentials_the_provider_fails_clearly(tmp_path: Path, ec2: Moto) -> None:
    """A server task of provider aws run where none of its variables are set up."""
    calls = Calls(tmp_path, {"AWS_ENDPOINT_URL": ec2.url, "AWS_EC2_METADATA_DISABLED": "true"})
    result = await calls.run("server.create", {"infra": "lab", "server": _server("nokeys-1")})
    assert result.outcome == "failed"
    assert "credentials" in (result.error or "").lower(), result.error
    assert ec2.instances() == []


# -- through the whole stack, and the CLI -----------------------------------------------------


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver() as the_receiver:
        yield the_receiver


@pytest.fixture(scope="module")
def aws_stack(
    tmp_path_factory: pytest.TempPathFactory, moto: Moto, receiver: Receiver
) -> Iterator[Stack]:
    """One stack for the module: the executors see the AWS variables, an infra directory holds
    the packaged samples and one whose servers name a provider that does not exist."""
    tmp = tmp_path_factory.mktemp("stack")
    (tmp / "schemas").symlink_to(INFRA_DIR.parent / "schemas")
    infra_dir = tmp / "infra"
    infra_dir.mkdir()
    for sample in ("wuji", "wuji-aws"):
        (infra_dir / sample).symlink_to(INFRA_DIR / sample)
    (infra_dir / "wuji-upcloud").mkdir()
    (infra_dir / "wuji-upcloud" / "settings.ncl").write_text(
        'let schema = import "../../schemas/infra.ncl" in\n'
        '{ name = "wuji-upcloud", provider = "upcloud", servers = [{ hostname = "up-1" }] }\n'
        "| schema.Infra\n"
    )
    env = {
        **moto.env(),
        **PROBE_ENV,
        "PROVISIONING_ORCHESTRATOR_INFRA_DIR": str(infra_dir),
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
    }
    with running_stack(tmp, executors=2, env=env) as stack:
        yield stack


def _ok(run: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"
    return run


def test_cli_creates_lists_and_deletes_aws_servers_through_the_orchestrator(
    aws_stack: Stack, ec2: Moto
) -> None:
    created = _ok(
        aws_stack.cli("server", "create", "--infra", "wuji-aws", "--orchestrated", "--wait")
    )
    assert "completed" in created.stdout
    assert "running at" in created.stdout  # the live progress lines
    live = ec2.live()
    assert sorted(live) == SAMPLE_HOSTS

    table = _ok(aws_stack.cli("server", "list")).stdout  # no infra: every provider set up here
    for host, instance_id in live.items():
        row = next(line for line in table.splitlines() if line.startswith(host + " "))
        assert instance_id in row and "aws" in row and "running" in row
    listed = json.loads(
        _ok(aws_stack.cli("server", "list", "--infra", "wuji-aws", "--output", "json")).stdout
    )
    assert {s["hostname"]: s["instance_id"] for s in listed} == live
    assert all(s["ip"] and s["private_ip"] for s in listed)

    deletes = [
        subprocess.Popen(
            [
                *(str(VENV_BIN / "provisioning"), "server", "delete", host),
                *("--infra", "wuji-aws", "--orchestrated", "--wait"),
            ],
            env=aws_stack.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for host in SAMPLE_HOSTS
    ]
    for process in deletes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0, out
        assert "terminated" in out
    assert ec2.live() == {}
    assert len(ec2.instances()) == 5  # terminated, not forgotten
    assert "no servers" in _ok(aws_stack.cli("server", "list", "--infra", "wuji-aws")).stdout


def test_example3_on_five_aws_servers_through_the_whole_stack(aws_stack: Stack, ec2: Moto) -> None:
    status, accepted = aws_stack.http.post(
        "/workflows/cluster/create", {"infra": "wuji-aws", "params": {"delay_seconds": 0}}
    )
    assert status == 202, accepted
    view = aws_stack.http.wait_workflow(accepted["workflow_id"], timeout=120)
    assert view["status"] == "completed", json.dumps(view, indent=2)[-3000:]
    tasks = {t["task_id"].split(".", 1)[1]: t for t in view["tasks"]}
    assert sorted(tasks) == sorted(
        [f"server-{h}" for h in SAMPLE_HOSTS]
        + [f"kubernetes-{h}" for h in SAMPLE_HOSTS]
        + ["cluster", "app-web"]
    )
    live = ec2.live()
    assert sorted(live) == SAMPLE_HOSTS
    for host in SAMPLE_HOSTS:
        output = tasks[f"server-{host}"]["output"]
        # the instance id and addresses are in the result, for later tasks to use
        assert output["instance_id"] == live[host] and output["existed"] is False
        assert output["ip"] and output["state"] == "running"
    # in parallel: every server creation started before the first one finished
    starts = [tasks[f"server-{h}"]["started_at"] for h in SAMPLE_HOSTS]
    ends = [tasks[f"server-{h}"]["finished_at"] for h in SAMPLE_HOSTS]
    assert max(starts) < min(ends)
    assert tasks["cluster"]["output"]["servers"] == SAMPLE_HOSTS
    assert tasks["app-web"]["output"]["state"] == "deployed"

    # the same again: every server exists, nothing new is launched
    status, again = aws_stack.http.post("/workflows/servers/create", {"infra": "wuji-aws"})
    view = aws_stack.http.wait_workflow(again["workflow_id"], timeout=120)
    assert view["status"] == "completed"
    assert all(t["output"]["existed"] is True for t in view["tasks"])
    assert len(ec2.instances()) == 5


def test_an_unknown_provider_is_a_422_everywhere(aws_stack: Stack, ec2: Moto) -> None:
    status, body = aws_stack.http.post(
        "/workflows",
        {
            "name": "upcloud",
            "tasks": [
                {
                    "id": "up",
                    "action": "server.create",
                    "args": {"infra": "x", "server": {"hostname": "up-1", "provider": "upcloud"}},
                }
            ],
        },
    )
    assert status == 422, body
    error = body["error"]
    assert error["code"] == "invalid_definition"
    assert error["details"]["reason"] == "unknown_provider" and error["details"]["task"] == "up"
    assert "'up-1'" in error["message"] and "'upcloud'" in error["message"]

    status, body = aws_stack.http.post("/workflows/servers/create", {"infra": "wuji-upcloud"})
    assert status == 422, body
    assert "server 'up-1': provider 'upcloud' is unknown" in body["error"]["message"]

    direct = aws_stack.cli("server", "create", "--infra", "wuji-upcloud", "--direct")
    assert direct.returncode == 4, direct.stdout + direct.stderr  # EXIT_API, like the 422
    assert "provider 'upcloud' is unknown" in direct.stderr
    # never replaced by another: nothing was created anywhere
    listed = json.loads(_ok(aws_stack.cli("server", "list", "--output", "json")).stdout)
    assert [s for s in listed if s["hostname"] == "up-1"] == []
    assert ec2.instances() == []


def test_direct_mode_against_the_same_endpoint(aws_stack: Stack, ec2: Moto) -> None:
    created = _ok(aws_stack.cli("server", "create", "--infra", "wuji-aws", "--direct"))
    assert "(direct)" in created.stdout and "completed" in created.stdout
    live = ec2.live()
    assert sorted(live) == SAMPLE_HOSTS
    listed = json.loads(
        _ok(
            aws_stack.cli("server", "list", "--infra", "wuji-aws", "--direct", "--output", "json")
        ).stdout
    )
    assert {s["hostname"]: s["instance_id"] for s in listed} == live
    _ok(aws_stack.cli("server", "delete", "wuji-aws-cp-1", "--infra", "wuji-aws", "--direct"))
    assert sorted(ec2.live()) == SAMPLE_HOSTS[1:]


# -- secrets ------------------------------------------------------------------------------------


def test_a_task_cannot_leak_its_credentials_anywhere(
    aws_stack: Stack, receiver: Receiver, tmp_path: Path
) -> None:
    """A provider task prints its secret key and session token on stdout and stderr, in a
    progress line, posts them as progress, returns them and fails with them: the API's records,
    events, logs and progress, the services' logs, the exported spans and direct mode's output
    hold none of it."""
    secrets = {"AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_SESSION_TOKEN": SESSION_TOKEN}
    tasks = [
        {
            "id": f"{name.lower().replace('_', '-')}-{'fails' if fail else 'ok'}",
            "action": "server.leak",
            "args": {"provider": "aws", "variable": name, "fail": fail},
        }
        for name in secrets
        for fail in (False, True)
    ]
    definition = {"name": "leak", "on_failure": "continue", "tasks": tasks}
    status, accepted = aws_stack.http.post("/workflows", definition)
    assert status == 202, accepted
    wf_id = accepted["workflow_id"]
    view = aws_stack.http.wait_workflow(wf_id)
    assert sorted(t["status"] for t in view["tasks"]) == ["completed"] * 2 + ["failed"] * 2

    seen: list[Any] = [view]
    for task in view["tasks"]:
        seen.append(aws_stack.http.get(f"/tasks/{task['task_id']}")[1])
        seen.append(aws_stack.http.get(f"/tasks/{task['task_id']}/logs")[1])
    events = read_event_stream(f"{aws_stack.http.base}/workflows/{wf_id}/events")
    seen.append([e.data for e in events])
    text = json.dumps(seen)
    # every way out was tried, and each came out masked
    assert "stdout: [redacted]" in text and "stderr: [redacted]" in text
    assert "progress [redacted]" in text and "failing with [redacted]" in text
    assert '"secret": "[redacted]"' in text

    trace_id = view["trace_id"]

    def exported() -> bool:
        names = [s["name"] for s in receiver.trace(trace_id)]
        return names.count("subprocess server.leak") == 4 and "gateway.progress" in names

    wait_until(exported, 30, 0.5, what="the spans of the leaking tasks")
    with receiver.lock:
        spans = b"".join(receiver.raw_traces)
    logs = "".join(s.log() for s in aws_stack.services)

    direct_file = tmp_path / "leak.json"
    direct_file.write_text(json.dumps(definition))
    direct = aws_stack.cli("workflow", "submit", str(direct_file), "--direct", "--output", "json")
    assert direct.returncode == 1  # two tasks fail on purpose
    assert json.loads(direct.stdout)["tasks"]["aws-secret-access-key-ok"]["output"]["secret"] == (
        "[redacted]"
    )

    for name, secret in secrets.items():
        assert secret not in text, name
        assert secret.encode() not in spans, name
        assert secret not in logs, name
        assert secret not in direct.stdout + direct.stderr, name
        for fragment in (secret[:20], secret[-20:]):
            assert fragment not in text + logs, name
    with contextlib.suppress(FileNotFoundError):
        for log in (aws_stack.data_dir / "logs").glob("*"):
            assert all(s not in log.read_text(errors="replace") for s in secrets.values())
