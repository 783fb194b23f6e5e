"""The deployment files, checked without a Docker engine or systemd: compose.yaml against the
Compose Specification's JSON schema and against the code (every variable one the services read,
ports, health checks, scaling, the cluster profile), the Dockerfile's runtime stage, and the
systemd units."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from services.runner import main as runner
from shared.config import load_config

from .support import FIXTURES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SYSTEMD = ROOT / "deploy" / "systemd"
SERVICES = {"gateway", "scheduler", "executor"}  # what an app container or unit runs
DEFAULTS = load_config(environ={"XDG_CONFIG_HOME": "/nonexistent"})
# PROVISIONING_* variables read outside the [section] keys, and where
OTHER_VARIABLES = {
    "PROVISIONING_LOG_LEVEL": "shared/logs.py",
    "PROVISIONING_CONFIG": "shared/config.py",
}
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution (``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``)
    over every string of the document, with ``env`` as the environment."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, op, default = match.group(1), match.group(2) or "", match.group(3) or ""
        if op.endswith("?"):
            raise AssertionError(f"${{{name}}} is required")
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return _INTERPOLATION.sub(one, value).replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves anchors and << merges
    return dict(_interpolate(document, {}))


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the orchestrator image, by name."""
    found = {
        name: svc
        for name, svc in compose["services"].items()
        if (svc.get("command") or [""])[0] in SERVICES
    }
    assert len(found) == 6, sorted(found)  # gateway, scheduler, executor, and their -ha twins
    return found


def _known_variables() -> set[str]:
    keys = {key for key in DEFAULTS.flat()}
    return {"PROVISIONING_" + key.replace(".", "_").upper() for key in keys}


def _check_variable(var: str) -> None:
    if var == "NATS_URL" or var.startswith("OTEL_"):
        return
    if var in OTHER_VARIABLES:
        assert var in (ROOT / OTHER_VARIABLES[var]).read_text()
        return
    assert var in _known_variables(), f"{var} is not read by the configuration loader"


# -- compose.yaml ----------------------------------------------------------------------------


def test_compose_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads((FIXTURES / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)

    # and the schema does catch mistakes: a misspelt key, a wrong type
    broken = json.loads(json.dumps(compose))
    broken["services"]["gateway"]["helthcheck"] = broken["services"]["gateway"].pop("healthcheck")
    broken["services"]["executor"]["ports"] = {"9090": 9090}  # must be a list
    assert len(list(validator.iter_errors(broken))) == 2


def test_compose_sets_only_variables_the_services_read(compose: dict[str, Any]) -> None:
    for name, service in _app_services(compose).items():
        env = _environment(service)
        for var in env:
            _check_variable(var)
        config = load_config(environ={**env, "XDG_CONFIG_HOME": "/nonexistent"})
        assert config.warnings == [], (name, config.warnings)
        assert config.nats.url == env["NATS_URL"]
        assert config.tracing.exporter == "otlp-http"  # OTEL_EXPORTER_OTLP_ENDPOINT turns it on
        assert config.sources["nats.url"] == "env:NATS_URL"


def test_compose_ports_match_the_configuration(compose: dict[str, Any]) -> None:
    port = DEFAULTS.gateway.port
    assert port == 9090
    services = compose["services"]
    for name in ("gateway", "gateway-ha"):
        gateway = services[name]
        assert gateway["command"] == ["gateway", "--host", "0.0.0.0"]
        published = [str(p).rsplit(":", 1) for p in gateway["ports"]]
        assert [container for _, container in published] == [str(port)], gateway["ports"]
    assert [p for p, _ in (str(x).rsplit(":", 1) for x in services["gateway"]["ports"])] == ["9090"]
    for name, service in _app_services(compose).items():
        endpoint = _environment(service)["PROVISIONING_ORCHESTRATOR_ENDPOINT"]
        host, _, endpoint_port = endpoint.removeprefix("http://").partition(":")
        assert endpoint_port == str(port) and host in services, (name, endpoint)
        assert services[host]["command"][0] == "gateway"
        assert set(service.get("profiles", [])) == set(services[host].get("profiles", []))


def test_every_compose_service_has_a_health_check(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
        for dependency, how in (service.get("depends_on") or {}).items():
            assert dependency in services, (name, dependency)
            if how.get("condition") == "service_healthy":
                assert services[dependency].get("healthcheck"), (name, dependency)
    for name in _app_services(compose):
        assert services[name]["healthcheck"]["test"] == ["CMD", "provisioning-healthcheck"]


def test_executors_and_schedulers_can_be_scaled(compose: dict[str, Any]) -> None:
    """``--scale executor=3`` needs services without a fixed container name or host port."""
    services = compose["services"]
    for name, service in services.items():
        assert "container_name" not in service, name
    for name in ("executor", "executor-ha", "scheduler", "scheduler-ha"):
        assert "ports" not in services[name], name
    assert services["executor"]["deploy"]["replicas"] >= 2
    assert services["executor-ha"]["deploy"]["replicas"] >= 2
    assert services["scheduler-ha"]["deploy"]["replicas"] == 2  # one active, one standing by
    grace = DEFAULTS.executor.shutdown_grace_seconds + DEFAULTS.executor.kill_grace_seconds
    for name in ("executor", "executor-ha"):
        assert int(services[name]["stop_grace_period"].removesuffix("s")) > grace


def test_cluster_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nodes = ["nats-1", "nats-2", "nats-3"]
    in_profile = {n for n, s in services.items() if "cluster" in s.get("profiles", [])}
    assert in_profile == {*nodes, "gateway-ha", "scheduler-ha", "executor-ha"}
    for name, service in services.items():  # the default stack never needs the profile
        if name not in in_profile:
            assert not set(service.get("depends_on") or {}) & in_profile, name

    for name in ("gateway-ha", "scheduler-ha", "executor-ha"):
        env = _environment(services[name])
        urls = env["NATS_URL"].split(",")
        assert urls == [f"nats://{node}:4222" for node in nodes], (name, urls)
        assert env["PROVISIONING_NATS_REPLICAS"] == "3"
        config = load_config(environ={**env, "XDG_CONFIG_HOME": "/nonexistent"})
        assert config.nats.replicas == 3
        depends = services[name]["depends_on"]
        assert all(depends[node]["condition"] == "service_healthy" for node in nodes), name

    for node in nodes:
        volumes = services[node]["volumes"]
        binds = [v for v in volumes if v.startswith("./")]
        assert binds == [f"./deploy/nats/cluster/{node}.conf:/etc/nats/nats.conf:ro"]
        assert f"{node}-data:/data" in volumes
        conf = (ROOT / "deploy" / "nats" / "cluster" / f"{node}.conf").read_text()
        assert re.search(rf"^server_name: {node}$", conf, re.MULTILINE)
        assert re.search(r"^port: 4222\b", conf, re.MULTILINE)
        assert re.search(r"^http: 8222\b", conf, re.MULTILINE)  # the health check's port
        assert 'store_dir: "/data"' in conf
        assert re.search(r"listen: 0\.0\.0\.0:6222", conf)
        routes = re.findall(r"nats-route://([\w-]+):6222", conf)
        assert routes == nodes, (node, routes)
        assert "8222/healthz" in " ".join(services[node]["healthcheck"]["test"])


def test_compose_files_and_volumes_exist(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).is_file(), (name, source)
            else:
                assert source in declared, (name, source)
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    assert (ROOT / "deploy" / "nats" / "single.conf").is_file()


def test_compose_commands_are_service_commands(compose: dict[str, Any]) -> None:
    for name, service in _app_services(compose).items():
        command = service["command"][0]
        assert command in runner.commands, (name, command)
        assert name.removesuffix("-ha") == command


# -- Dockerfile ------------------------------------------------------------------------------


def _dockerfile() -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Instructions of the final stage as ``(INSTRUCTION, arguments)``, continuation lines
    joined, and the here-documents (``COPY <<'EOF' target``) by target."""
    lines = DOCKERFILE.read_text().splitlines()
    instructions: list[tuple[str, str]] = []
    heredocs: dict[str, str] = {}
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        word, _, args = line.partition(" ")
        if word.upper() == "FROM":
            instructions = []  # a new stage
            heredocs = {}
        heredoc = re.search(r"<<-?'?(\w+)'?\s+(\S+)$", args)
        if heredoc:
            end = lines.index(heredoc.group(1), i)
            heredocs[heredoc.group(2)] = "\n".join(lines[i:end]) + "\n"
            i = end + 1
        instructions.append((word.upper(), args.strip()))
    return instructions, heredocs


def test_dockerfile_runtime_stage() -> None:
    instructions, heredocs = _dockerfile()
    last = {word: args for word, args in instructions}
    assert json.loads(last["ENTRYPOINT"]) == ["provisioning-orchestrator"]
    assert json.loads(last["CMD"])[0] in runner.commands
    user = last["USER"].split(":")[0]
    assert user not in ("root", "0"), last["USER"]
    assert last["EXPOSE"] == str(DEFAULTS.gateway.port)
    check = last["HEALTHCHECK"]
    assert json.loads(check.split(" CMD ", 1)[1]) == ["provisioning-healthcheck"]

    # the health check is the script the image installs, and it is valid Python
    script = heredocs["/usr/local/bin/provisioning-healthcheck"]
    compile(script, "provisioning-healthcheck", "exec")
    services = re.search(r"^SERVICES = \(([^)]*)\)", script, re.MULTILINE)
    assert services and {s.strip(' "') for s in services.group(1).split(",")} == set(
        runner.commands
    )
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'provisioning-orchestrator = "services.__main__:run"' in pyproject

    env = " ".join(args for word, args in instructions if word == "ENV")
    for var in re.findall(r"\b(PROVISIONING_[A-Z_]+)=", env):
        _check_variable(var)
    assert "PROVISIONING_GATEWAY_HOST=0.0.0.0" in env


# -- systemd ---------------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, list[str]]:
    """``Key: [values]`` of a unit file (keys may repeat)."""
    entries: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        entries.setdefault(key.strip(), []).append(value.strip())
    return entries


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_systemd_units_run_the_services(service: str) -> None:
    name = f"provisioning-{service}@.service" if service == "executor" else None
    path = SYSTEMD / (name or f"provisioning-{service}.service")
    unit = _unit(path)
    assert [shlex.split(cmd) for cmd in unit["ExecStart"]] == [
        ["/usr/local/bin/provisioning-orchestrator", service]
    ]
    assert service in runner.commands
    files = unit["EnvironmentFile"]
    assert files[0] == "-/etc/provisioning/env"  # installed from env.example
    instance = ["-/etc/provisioning/executor-%i.env"] if service == "executor" else []
    assert files == ["-/etc/provisioning/env", f"-/etc/provisioning/{service}.env", *instance]
    docs = (ROOT / "docs" / "deployment.md").read_text()
    for file in files:  # every optional file is documented
        basename = file.rsplit("/", 1)[1].replace("%i", "<instance>")
        assert f"`{basename}`" in docs or basename == "env", basename
    environment = dict(e.split("=", 1) for e in unit.get("Environment", []))
    for var in environment:
        _check_variable(var)
    assert environment["PROVISIONING_ORCHESTRATOR_DATA_DIR"] in unit["ReadWritePaths"][0].split()
    assert unit["User"] == ["provisioning"] and unit["Restart"] == ["on-failure"]
    stop = int(unit["TimeoutStopSec"][0])
    if service == "executor":
        executor = DEFAULTS.executor
        assert stop > executor.shutdown_grace_seconds + executor.kill_grace_seconds


def test_systemd_env_example_sets_only_variables_the_services_read() -> None:
    example = SYSTEMD / "env.example"
    assert example.is_file()
    assigned: dict[str, str] = {}
    mentioned = []
    for line in example.read_text().splitlines():
        match = re.match(r"^(#)?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            mentioned.append(match.group(2))
            if not match.group(1):
                assigned[match.group(2)] = match.group(3)
    assert "NATS_URL" in assigned and "PROVISIONING_NATS_REPLICAS" in mentioned
    for var in mentioned:
        _check_variable(var)
    config = load_config(environ={**assigned, "XDG_CONFIG_HOME": "/nonexistent"})
    assert config.warnings == []
    assert config.gateway.port == DEFAULTS.gateway.port


def test_systemd_nats_unit_uses_a_shipped_config() -> None:
    unit = _unit(SYSTEMD / "provisioning-nats.service")
    assert [shlex.split(c) for c in unit["ExecStart"]] == [
        ["/usr/local/bin/nats-server", "-c", "/etc/provisioning/nats.conf"]
    ]
    assert unit["EnvironmentFile"] == ["-/etc/provisioning/nats.env"]
    docs = (ROOT / "docs" / "deployment.md").read_text()
    assert "deploy/nats/single.conf" in docs and "/etc/provisioning/nats.conf" in docs
