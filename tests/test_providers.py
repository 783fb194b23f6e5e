"""The provider interface, in process: which provider a task runs and what it receives, the 422
for an unknown or disabled one, the masking of secrets, the Nickel contracts of provider fields,
and the local (development) provider's status and plan."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import nickel
import pytest

from core import INFRA_DIR, NULIB_DIR
from core.infra import (
    cluster_workflow,
    load_infra,
    server_delete_args,
    server_list_args,
    servers_workflow,
    strip_ansi,
)
from core.providers import Providers, check_providers, provider_env, task_providers
from core.redact import MASK, Redactor
from core.registry import Registry, load_registry
from core.runner import Runner, resolve_binary
from shared.config import Config, load_config
from shared.errors import DefinitionError
from shared.messages import TaskSpec, WorkflowDefinition

from .support import FIXTURES

# the shape of a real secret access key (AWS's documentation example), and a session token that
# has no recognisable shape: only its configured value can mask it
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLE-session-token-0123456789"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_SESSION_TOKEN": SESSION_TOKEN,
    "AWS_DEFAULT_REGION": "eu-west-1",
}


def _config(**env: str) -> Config:
    return load_config(environ={"XDG_CONFIG_HOME": "/nonexistent", **env})


def _workflow(*tasks: dict[str, Any]) -> WorkflowDefinition:
    return WorkflowDefinition(name="t", tasks=[msgspec.convert(t, TaskSpec) for t in tasks])


# -- which provider a task runs, and the 422 --------------------------------------------------


def test_a_task_runs_the_provider_its_arguments_name() -> None:
    assert task_providers("server.create", {"server": {"hostname": "h", "provider": "aws"}}) == [
        "aws"
    ]
    assert task_providers("server.create", {"server": {"hostname": "h"}}) == ["local"]
    assert task_providers("server.delete", {"hostname": "h", "provider": "aws"}) == ["aws"]
    assert task_providers("server.list", {}) == ["local"]
    assert task_providers("server.list", {"providers": ["local", "aws"]}) == ["local", "aws"]
    assert task_providers("taskserv.create", {"provider": "aws"}) == []
    assert task_providers("builtin.noop", {"server": {"provider": "aws"}}) == []


def test_an_unknown_provider_is_refused_naming_the_server_and_the_provider() -> None:
    config = _config()
    with pytest.raises(DefinitionError) as caught:
        check_providers(
            _workflow(
                {"id": "ok", "action": "server.create", "args": {"server": {"hostname": "a"}}},
                {
                    "id": "web",
                    "action": "server.create",
                    "args": {"infra": "x", "server": {"hostname": "web-1", "provider": "upcloud"}},
                },
            ),
            config,
        )
    error = caught.value
    assert error.reason == "unknown_provider" and error.task == "web"
    assert "'web-1'" in error.message and "'upcloud'" in error.message
    assert "unknown" in error.message and error.data["provider"] == "upcloud"


def test_a_provider_that_is_not_enabled_is_refused_too() -> None:
    config = _config(PROVISIONING_PROVIDERS_ENABLED="local")
    workflow = _workflow(
        {"id": "d", "action": "server.delete", "args": {"hostname": "h", "provider": "aws"}}
    )
    with pytest.raises(DefinitionError, match=r"'aws' is not enabled here") as caught:
        check_providers(workflow, config)
    assert caught.value.reason == "unknown_provider"
    check_providers(workflow, _config())  # enabled by default
    check_providers(_workflow({"id": "n", "action": "builtin.noop"}), config)
    with pytest.raises(DefinitionError, match="provider 'gcp'"):
        check_providers(
            _workflow(
                {"id": "l", "action": "server.list", "args": {"providers": ["local", "gcp"]}}
            ),
            _config(),
        )


def _infra_dir(tmp_path: Path) -> Path:
    """An infra directory with the packaged samples (and their schema) and one of upcloud
    servers, which no provider module exists for."""
    (tmp_path / "schemas").symlink_to(INFRA_DIR.parent / "schemas")
    infra = tmp_path / "infra"
    infra.mkdir()
    for sample in ("wuji", "wuji-aws"):
        (infra / sample).symlink_to(INFRA_DIR / sample)
    (infra / "wuji-upcloud").mkdir()
    (infra / "wuji-upcloud" / "settings.ncl").write_text(
        'let schema = import "../../schemas/infra.ncl" in\n'
        '{ name = "wuji-upcloud", provider = "upcloud",\n'
        '  servers = [{ hostname = "up-1" }, { hostname = "up-2", provider = "local" }] }\n'
        "| schema.Infra\n"
    )
    return infra


def test_the_shortcuts_carry_each_servers_provider_and_refuse_an_unknown_one(
    tmp_path: Path,
) -> None:
    infra_dir = str(_infra_dir(tmp_path))
    config = _config()
    aws = cluster_workflow("wuji-aws", {}, infra_dir)
    servers = [t for t in aws.tasks if t.action == "server.create"]
    assert len(servers) == 5
    assert {t.args["server"]["provider"] for t in servers} == {"aws"}
    assert all(t.args["server"]["region"] and t.args["server"]["image"] for t in servers)
    check_providers(aws, config)
    local = servers_workflow("wuji", {}, infra_dir)
    assert {t.args["server"]["provider"] for t in local.tasks} == {"local"}  # the infra's default

    upcloud = servers_workflow("wuji-upcloud", {}, infra_dir)
    assert [t.args["server"]["provider"] for t in upcloud.tasks] == ["upcloud", "local"]
    with pytest.raises(DefinitionError, match=r"server 'up-1': provider 'upcloud' is unknown"):
        check_providers(upcloud, config)


def test_list_and_delete_arguments_follow_the_infra(tmp_path: Path) -> None:
    infra_dir = str(_infra_dir(tmp_path))
    config = _config()
    assert server_list_args("wuji-aws", config, infra_dir) == {
        "infra": "wuji-aws",
        "providers": ["local", "aws"],
        "regions": ["us-east-1"],
    }
    assert server_list_args("wuji", config, infra_dir) == {"infra": "wuji", "providers": ["local"]}
    # no infra: the development provider, and aws only where the environment sets it up
    assert server_list_args(None, config, infra_dir, environ={}) == {"providers": ["local"]}
    assert server_list_args(None, config, infra_dir, environ={"AWS_DEFAULT_REGION": "x"}) == {
        "providers": ["local"]
    }
    assert server_list_args(None, config, infra_dir, environ=AWS_ENV) == {
        "providers": ["local", "aws"]
    }

    assert server_delete_args("wuji-aws-cp-1", "wuji-aws", infra_dir) == {
        "hostname": "wuji-aws-cp-1",
        "infra": "wuji-aws",
        "provider": "aws",
        "region": "us-east-1",
    }
    assert server_delete_args("wuji-cp-1", "wuji", infra_dir)["provider"] == "local"
    assert server_delete_args("h", None, infra_dir) == {"hostname": "h"}
    assert server_delete_args("h", "adhoc", infra_dir) == {"hostname": "h", "infra": "adhoc"}


# -- credentials: only the tasks of the provider that needs them -------------------------------


def test_only_server_tasks_of_a_provider_receive_its_variables() -> None:
    settings = _config().providers
    environ = {**AWS_ENV, "HOME": "/root", "UNRELATED": "x"}
    aws_args = {"server": {"hostname": "h", "provider": "aws"}}
    assert provider_env("server.create", aws_args, settings, environ) == AWS_ENV
    assert provider_env("server.create", {"server": {"hostname": "h"}}, settings, environ) == {}
    assert provider_env("taskserv.create", {"provider": "aws"}, settings, environ) == {}
    assert (
        provider_env("server.list", {"providers": ["local", "aws"]}, settings, environ) == AWS_ENV
    )
    disabled = _config(PROVISIONING_PROVIDERS_ENABLED="local").providers
    assert provider_env("server.create", aws_args, disabled, environ) == {}


def test_the_environment_is_captured_once_with_the_users_profile_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        "[default]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\n"
        f"aws_secret_access_key = {SECRET_KEY}\n"
        "[other]\naws_session_token = token-from-the-file-0123\n"
    )
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    providers = Providers.from_config(_config(), home=home)
    monkeypatch.setenv("AWS_REGION", "us-west-2")  # later changes are not seen
    monkeypatch.delenv("AWS_REGION")
    env = providers.env_for("server.status", {"hostname": "h", "provider": "aws"})
    assert env["AWS_REGION"] == "eu-central-1"
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == str(home / ".aws" / "credentials")
    assert "AWS_CONFIG_FILE" not in env  # no such file
    # the file's secrets are masked although no variable holds them
    masked = providers.redactor.text(f"key {SECRET_KEY} token token-from-the-file-0123")
    assert SECRET_KEY not in masked and "token-from-the-file-0123" not in masked
    assert providers.set_up("aws") and providers.set_up("local")
    assert not Providers.from_config(_config(), environ={}, home=tmp_path).set_up("aws")


async def test_the_runner_gives_provider_variables_to_provider_tasks_only(tmp_path: Path) -> None:
    registry = load_registry(FIXTURES / "registry.toml", FIXTURES / "nulib")
    runner = Runner(
        nu_binary=resolve_binary("nu"),
        data_dir=tmp_path,
        providers=Providers.from_config(
            _config(), environ={**AWS_ENV, "OTHER": "x"}, home=tmp_path
        ),
    )
    workdir = tmp_path / "w"
    server = runner.environment(
        registry.get("server.create"), {}, workdir, {"server": {"provider": "aws"}}
    )
    assert {k: v for k, v in server.items() if k.startswith("AWS_")} == AWS_ENV
    assert "OTHER" not in server
    for action, args in [
        ("server.create", {"server": {"hostname": "h"}}),
        ("taskserv.create", {"server": "h", "provider": "aws"}),
        ("probe.env", {"provider": "aws"}),
    ]:
        env = runner.environment(registry.get(action), {}, workdir, args)
        assert not [k for k in env if k.startswith("AWS_")], action
    # the child finds the project's own aws command line (installed beside the interpreter) first
    assert shutil.which("aws", path=server["PATH"]) == str(Path(sys.executable).parent / "aws")


# -- secrets never leave the runner ------------------------------------------------------------


def test_redactor_masks_configured_values_and_aws_key_shapes() -> None:
    redactor = Redactor(["s3cr3t-value", "abc"])  # too short to mask without mangling text
    assert redactor.size == 1
    assert redactor.text("x=s3cr3t-value;") == f"x={MASK};"
    assert redactor.text("prefix-s3cr3t-value-suffix") == f"prefix-{MASK}-suffix"
    assert redactor.text("abc") == "abc"
    # a secret key's shape, next to what names it
    for text in (
        f"aws_secret_access_key = {SECRET_KEY}",
        f"AWS_SECRET_ACCESS_KEY={SECRET_KEY}",
        f'{{"SecretAccessKey": "{SECRET_KEY}"}}',
    ):
        assert SECRET_KEY not in redactor.text(text), text
    # 40 characters without such a context, hex digests and key ids stay readable
    digest = "0123456789abcdef0123456789abcdef01234567"
    assert redactor.text(f"commit {digest}") == f"commit {digest}"
    assert redactor.text("key id AKIAIOSFODNN7EXAMPLE") == "key id AKIAIOSFODNN7EXAMPLE"
    # results: strings, keys, nested values, and a bare key under a secret-ish name
    value = {
        "a": ["x s3cr3t-value y", {"s3cr3t-value": 1}],
        "secret_key": SECRET_KEY,
        "n": 3,
        "ok": None,
    }
    assert redactor.value(value) == {
        "a": [f"x {MASK} y", {MASK: 1}],
        "secret_key": MASK,
        "n": 3,
        "ok": None,
    }


def test_redactor_masks_the_ends_of_a_secret_cut_by_a_line_split() -> None:
    redactor = Redactor([SESSION_TOKEN])
    cut = len(SESSION_TOKEN) // 2
    head = "a long line ... " + SESSION_TOKEN[:cut]
    tail = SESSION_TOKEN[cut:] + " ... the rest"
    assert SESSION_TOKEN[:cut] not in redactor.text(head, fragment=True)
    assert SESSION_TOKEN[cut:] not in redactor.text(tail, fragment=True)
    assert redactor.text(head) == head  # a whole line is not a fragment


@pytest.fixture
def leaky(tmp_path: Path) -> tuple[Runner, Registry]:
    registry = load_registry(FIXTURES / "registry.toml", FIXTURES / "nulib")
    runner = Runner(
        nu_binary=resolve_binary("nu"),
        data_dir=tmp_path / "data",
        providers=Providers.from_config(_config(), environ=AWS_ENV, home=tmp_path),
    )
    return runner, registry


@pytest.mark.parametrize("variable", ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"])
@pytest.mark.parametrize("fail", [False, True])
async def test_a_task_cannot_leak_its_credentials_through_the_runner(
    leaky: tuple[Runner, Registry], variable: str, fail: bool
) -> None:
    runner, registry = leaky
    secret = AWS_ENV[variable]
    seen: list[str] = []

    async def on_line(stream: str, line: str) -> None:
        seen.append(line)

    async def on_progress(percent: int, message: str) -> None:
        seen.append(message)

    result = await runner.run(
        registry.get("server.leak"),
        {"provider": "aws", "variable": variable, "fail": fail},
        task_env={"PROVISIONING_GATEWAY_URL": "http://127.0.0.1:9"},
        timeout_s=30,
        on_line=on_line,
        on_progress=on_progress,
    )
    assert result.outcome == ("failed" if fail else "completed"), result
    assert f"stdout: {MASK}" in seen and f"stderr: {MASK}" in seen and f"progress {MASK}" in seen
    everything = json.dumps([seen, msgspec.to_builtins(result)])
    assert secret not in everything
    if fail:
        assert result.error and f"failing with {MASK}" in result.error
    else:
        assert result.output["secret"] == MASK
        assert result.output["nested"] == {"list": [f"x{MASK}y"]}
        assert f"k{MASK}" in result.output


# -- Nickel: the provider fields and their contracts ---------------------------------------------


def _evaluate(source: str, directory: Path) -> dict[str, Any]:
    return dict(json.loads(nickel.run(source, import_paths=[str(directory)])))


def _aws_sample() -> str:
    return (INFRA_DIR / "wuji-aws" / "settings.ncl").read_text()


def test_the_aws_sample_is_example_3_on_five_aws_servers() -> None:
    infra = load_infra("wuji-aws")
    assert infra["provider"] == "aws" and len(infra["servers"]) == 5
    for server in infra["servers"]:
        assert server["provider"] == "aws" and server["region"] == "us-east-1"
        assert server["image"].startswith("ami-")
    assert infra["taskservs"] == ["kubernetes"]
    assert infra["cluster"]["apps"] == ["web"]
    assert "zone" not in load_infra("wuji")["servers"][0]  # the local provider's default applies


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('plan = "medium"', 'plna = "medium"'), "extra field `plna`"),
        (('region = "us-east-1",', 'regoin = "us-east-1",'), "extra field `regoin`"),
        (('region = "us-east-1",', ""), "an aws server needs `region`"),
        (('image = "ami-1e749f67",', ""), "an aws server needs `image`"),
        (('"ami-1e749f67"', '"file:///etc/passwd"'), "is not an AMI id"),
        (('region = "us-east-1"', 'region = "Mars 1"'), "is not an AWS region name"),
        (
            ('plan = "medium"', 'plan = "medium", zone = "eu-west-1a"'),
            "is not an availability zone of region us-east-1",
        ),
        (("security_group_ids", "x"), None),  # not in the sample: nothing to break
    ],
)
def test_the_schema_names_the_field_and_the_server(
    edit: tuple[str, str], message: str | None
) -> None:
    source = _aws_sample().replace(*edit)
    if message is None:
        _evaluate(source, INFRA_DIR / "wuji-aws")
        return
    with pytest.raises(nickel.NickelException) as caught:
        _evaluate(source, INFRA_DIR / "wuji-aws")
    text = strip_ansi(str(caught.value))
    assert message in text, text[:500]
    if "needs" in message:
        assert "server wuji-aws-cp-1 (provider aws)" in text


def test_a_local_server_refuses_aws_fields_and_an_aws_one_takes_them_all() -> None:
    wuji = (INFRA_DIR / "wuji" / "settings.ncl").read_text()
    with pytest.raises(nickel.NickelException, match="`image` is a field of aws servers"):
        _evaluate(wuji.replace('plan = "medium"', 'image = "ami-12345678"'), INFRA_DIR / "wuji")
    full = _aws_sample().replace(
        'plan = "medium"',
        'plan = "medium", zone = "us-east-1b", instance_type = "m5.large", subnet_id = "subnet-1",'
        ' key_name = "ops", security_group_ids = ["sg-1", "sg-2"]',
    )
    cp = _evaluate(full, INFRA_DIR / "wuji-aws")["servers"][0]
    assert cp["zone"] == "us-east-1b" and cp["security_group_ids"] == ["sg-1", "sg-2"]
    assert cp["tags"] == {"project": "wuji", "cost-center": "platform"}


# -- the local provider: status and plan ----------------------------------------------------------


async def _call(runner: Runner, registry: Registry, action: str, args: dict[str, Any]) -> Any:
    async def ignore(*_: Any) -> None:
        return None

    result = await runner.run(
        registry.get(action), args, task_env={}, timeout_s=30, on_line=ignore, on_progress=ignore
    )
    assert result.outcome == "completed", result
    return result.output


async def test_local_status_and_plan_read_without_changing_anything(
    leaky: tuple[Runner, Registry],
) -> None:
    runner, registry = leaky
    server = {"hostname": "web-1", "plan": "large", "labels": {"role": "web"}}
    args = {"infra": "lab", "server": server, "delay_seconds": 0}
    assert (await _call(runner, registry, "server.plan", args))["change"] == "create"
    assert (await _call(runner, registry, "server.status", {"hostname": "web-1"}))[
        "state"
    ] == "absent"
    assert (await _call(runner, registry, "server.plan", {**args, "state": "absent"}))[
        "change"
    ] == "none"

    await _call(runner, registry, "server.create", args)
    assert (await _call(runner, registry, "server.status", {"hostname": "web-1"}))[
        "state"
    ] == "running"
    assert (await _call(runner, registry, "server.plan", args))["change"] == "none"
    bigger = await _call(
        runner, registry, "server.plan", {**args, "server": {**server, "plan": "xlarge"}}
    )
    assert bigger["change"] == "update"
    assert bigger["detail"]["differences"] == [
        {"field": "plan", "current": "large", "wanted": "xlarge"}
    ]
    gone = await _call(runner, registry, "server.plan", {**args, "state": "absent"})
    assert gone["change"] == "delete"
    listed = await _call(runner, registry, "server.list", {"infra": "lab"})
    assert [s["hostname"] for s in listed["servers"]] == ["web-1"]  # plan changed nothing


# -- the aws provider's waiting, where moto cannot help (its instances run at once) ---------------

_FAKE_AWS = """#!/bin/sh
# describe by tags: nothing; by id: unknown once (EC2 is eventually consistent), then pending
# until the RUNNING_AT-th call, then running
count="$FAKE_DIR/calls"
case "$2" in
  run-instances) echo '{"Instances": [{"InstanceId": "i-slow", "State": {"Name": "pending"}}]}' ;;
  terminate-instances) echo "terminate $4" >> "$FAKE_DIR/terminated"; echo '{}' ;;
  describe-instances)
    case "$4" in *InstanceIds*) ;; *) echo '{"Reservations": []}'; exit 0 ;; esac
    n=$(( $(cat "$count" 2>/dev/null || echo 0) + 1 )); echo $n > "$count"
    if [ $n -eq 1 ]; then
      echo "An error occurred (InvalidInstanceID.NotFound): no i-slow yet" >&2
      exit 254
    fi
    state=pending; [ $n -ge "$RUNNING_AT" ] && state=running
    printf '{"Reservations": [{"Instances": [{"InstanceId": "i-slow", %s, %s, %s}]}]}' \\
      "\\"State\\": {\\"Name\\": \\"$state\\"}" \\
      '"PrivateIpAddress": "10.0.0.5"' \\
      '"Placement": {"AvailabilityZone": "eu-west-1b"}'
    ;;
esac
"""


@pytest.mark.parametrize("running_at", [4, 1000])
def test_aws_create_waits_with_progress_and_cleans_up_when_the_wait_is_over(
    tmp_path: Path, running_at: int
) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "aws").write_text(_FAKE_AWS)
    (fake / "aws").chmod(0o755)
    args = {
        "infra": "lab",
        "server": {"hostname": "slow-1", "provider": "aws", "region": "eu-west-1"}
        | {"image": "ami-12345678"},
        "poll_seconds": 0.1,
        "wait_timeout_seconds": 1,
    }
    program = (
        "use servers\nlet args = ($in | from json)\n"
        "servers create $args | to json --raw | save --force $env.PROVISIONING_RESULT_FILE\n"
    )
    done = subprocess.run(
        [resolve_binary("nu"), "-n", "--no-std-lib", "--stdin", "-c", program],
        input=json.dumps(args),
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": f"{fake}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "NU_LIB_DIRS": str(NULIB_DIR),
            "PROVISIONING_DATA_DIR": str(tmp_path / "data"),
            "PROVISIONING_RESULT_FILE": str(tmp_path / "result.json"),
            "FAKE_DIR": str(tmp_path),
            "RUNNING_AT": str(running_at),
        },
    )
    progress = [line for line in done.stdout.splitlines() if line.startswith("PROGRESS: ")]
    assert "PROGRESS: 50 instance i-slow launched, pending" in progress
    waiting = [p for p in progress if "pending, waiting for running" in p]
    assert waiting, done.stdout
    if running_at < 1000:
        assert done.returncode == 0, done.stderr
        result = json.loads((tmp_path / "result.json").read_text())
        assert result["instance_id"] == "i-slow" and result["ip"] == "10.0.0.5"
        assert result["existed"] is False and progress[-1].startswith("PROGRESS: 100 ")
        assert not (tmp_path / "terminated").exists()
    else:
        assert done.returncode != 0
        assert "instance i-slow is still pending after 1" in done.stderr
        assert "i-slow" in (tmp_path / "terminated").read_text()  # not left behind
