"""Configuration: packaged defaults, user file, PROVISIONING_<SECTION>_<KEY>, flags; sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import load_config
from shared.errors import ConfigError


def test_defaults_have_the_seed_sections() -> None:
    config = load_config(environ={"XDG_CONFIG_HOME": "/nonexistent"})
    assert config.orchestrator.endpoint == "http://localhost:9090"
    assert config.execution.default_mode in ("direct", "orchestrated", "auto")
    assert "*.list" in config.execution.force_direct
    assert config.executor.max_concurrent_tasks == 10
    assert config.nushell.binary == "nu"
    assert config.gateway.port == 9090
    assert set(config.sources.values()) == {"default"}


def test_precedence_file_env_flag(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text('[executor]\nmax_concurrent_tasks = 3\npool = "gpu"\n[gateway]\nport = 8000\n')
    env = {
        "PROVISIONING_GATEWAY_PORT": "8100",
        "PROVISIONING_EXECUTION_FORCE_DIRECT": "a.*, b.list",
        "PROVISIONING_EXECUTOR_ALLOW_COMMANDS": "yes",
        "NATS_URL": "nats://n1:4222,nats://n2:4222",
    }
    config = load_config(
        file, environ=env, overrides={"executor.pool": "fast", "gateway.host": None}
    )
    assert config.executor.max_concurrent_tasks == 3
    assert config.sources["executor.max_concurrent_tasks"] == f"file:{file}"
    assert config.gateway.port == 8100
    assert config.sources["gateway.port"] == "env:PROVISIONING_GATEWAY_PORT"
    assert config.execution.force_direct == ["a.*", "b.list"]
    assert config.executor.allow_commands is True
    assert config.nats.url == "nats://n1:4222,nats://n2:4222"
    assert config.sources["nats.url"] == "env:NATS_URL"
    assert config.executor.pool == "fast"
    assert config.sources["executor.pool"] == "flag"
    assert config.sources["gateway.host"] == "default"


def test_provisioning_config_variable_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('[orchestrator]\nendpoint = "http://example:1"\n')
    assert (
        load_config(environ={"PROVISIONING_CONFIG": str(file)}).orchestrator.endpoint
        == "http://example:1"
    )


def test_otel_endpoint_enables_otlp() -> None:
    config = load_config(
        environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318", "XDG_CONFIG_HOME": "/x"}
    )
    assert config.tracing.exporter == "otlp-http"
    assert config.tracing.endpoint == "http://jaeger:4318"


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        ("[nope]\nx = 1\n", {}, "unknown section [nope]"),
        ("[gateway]\nnope = 1\n", {}, "unknown key gateway.nope"),
        ("[gateway]\nport = 'x'\n", {}, "invalid configuration"),
        ("not toml = = =", {}, "cannot read"),
        ("", {"PROVISIONING_GATEWAY_PORT": "abc"}, "PROVISIONING_GATEWAY_PORT"),
        ("", {"PROVISIONING_EXECUTOR_ALLOW_COMMANDS": "maybe"}, "expected a boolean"),
        ("", {"PROVISIONING_EXECUTION_DEFAULT_MODE": "sideways"}, "invalid configuration"),
        (
            "[executor]\nheartbeat_interval_seconds = 90\n",
            {},
            "float` <= 20.0 - at `.*executor.heartbeat_interval_seconds",
        ),
    ],
)
def test_bad_configuration_is_a_clear_error(
    tmp_path: Path, content: str, env: dict[str, str], message: str
) -> None:
    file = tmp_path / "config.toml"
    file.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(file, environ=env)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml", environ={})


def test_unknown_flag_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown configuration key"):
        load_config(environ={}, overrides={"gateway.nope": 1})


def test_unknown_section_variable_is_reported() -> None:
    config = load_config(environ={"PROVISIONING_NATS_REPLICA": "3", "PROVISIONING_TASK_ID": "x"})
    assert config.warnings == [
        "PROVISIONING_NATS_REPLICA is not a configuration key (typo?); it is ignored"
    ]
    assert config.nats.replicas == 1


def test_providers_section_defaults_and_overrides(tmp_path: Path) -> None:
    config = load_config(environ={"XDG_CONFIG_HOME": "/nonexistent"})
    assert config.providers.enabled == ["local", "aws"]
    assert "AWS_SECRET_ACCESS_KEY" in config.providers.env["aws"]
    assert "AWS_ENDPOINT_URL" in config.providers.env["aws"]
    assert config.providers.secrets == ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]

    file = tmp_path / "config.toml"
    file.write_text('[providers]\nsecrets = ["MY_TOKEN"]\n[providers.env]\naws = ["AWS_PROFILE"]\n')
    config = load_config(
        file,
        environ={
            "PROVISIONING_PROVIDERS_ENABLED": "local",
            "PROVISIONING_PROVIDERS_SECRETS": '["A", "B"]',
        },
    )
    assert config.providers.enabled == ["local"]
    assert config.providers.env == {"aws": ["AWS_PROFILE"]}
    assert config.providers.secrets == ["A", "B"]
    assert config.sources["providers.env"] == f"file:{file}"
    assert config.sources["providers.enabled"] == "env:PROVISIONING_PROVIDERS_ENABLED"

    file.write_text("[providers]\nenabeld = []\n")
    with pytest.raises(ConfigError, match=r"unknown key providers\.enabeld"):
        load_config(file, environ={})
    file.write_text('[providers.env]\naws = "AWS_PROFILE"\n')
    with pytest.raises(ConfigError, match=r"providers\.env"):
        load_config(file, environ={})
