"""Configuration: packaged TOML defaults, a user file, environment overrides, then flags.

Every key can be overridden from the environment as ``PROVISIONING_<SECTION>_<KEY>``; the
standard ``NATS_URL`` and ``OTEL_EXPORTER_OTLP_ENDPOINT`` are honoured too. :func:`load_config`
remembers where each value came from (``default``, ``file:<path>``, ``env:<VAR>``, ``flag``).
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from .errors import ConfigError
from .keys import parse_rate

__all__ = [
    "ConcurrencyConfig",
    "Config",
    "ExecutionConfig",
    "ExecutorConfig",
    "GatewayConfig",
    "NatsConfig",
    "NushellConfig",
    "OrchestratorConfig",
    "PlansConfig",
    "ProvidersConfig",
    "SchedulerConfig",
    "TracingConfig",
    "load_config",
    "user_config_path",
]

ENV_PREFIX = "PROVISIONING_"


class OrchestratorConfig(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool
    endpoint: str
    timeout_seconds: float
    auto_start: bool
    data_dir: str
    auth_token: str
    infra_dir: str


class ExecutionConfig(msgspec.Struct, forbid_unknown_fields=True):
    default_mode: Literal["direct", "orchestrated", "auto"]
    fallback_to_direct: bool
    force_orchestrated: list[str]
    force_direct: list[str]


class NatsConfig(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    user: str
    password: str
    token: str
    creds_file: str
    tls_ca_file: str
    connect_timeout_seconds: float
    replicas: int
    events_max_age_seconds: float
    logs_max_bytes: int
    queue_max_messages: int


class GatewayConfig(msgspec.Struct, forbid_unknown_fields=True):
    host: str
    port: int
    auth_token: str
    max_body_bytes: int
    max_tasks_per_workflow: int
    request_timeout_seconds: float
    # name -> bearer token of each person who may call the API (approvers among them)
    users: dict[str, str]
    allow_self_approval: bool
    # Definitions other than small JSON are parsed in worker processes, bounded in size per
    # format (at most max_body_bytes: that one bounds JSON) and in time (shared/parsing.py).
    max_yaml_bytes: Annotated[int, msgspec.Meta(gt=0)]
    max_toml_bytes: Annotated[int, msgspec.Meta(gt=0)]
    max_nickel_bytes: Annotated[int, msgspec.Meta(gt=0)]
    parse_timeout_seconds: Annotated[float, msgspec.Meta(gt=0)]
    parse_workers: Annotated[int, msgspec.Meta(ge=1, le=64)]


class PlansConfig(msgspec.Struct, forbid_unknown_fields=True):
    max_age_seconds: float  # an older plan is refused at apply
    check_timeout_seconds: float  # how long an apply waits for the plan to be checked again


class SchedulerConfig(msgspec.Struct, forbid_unknown_fields=True):
    dispatch_headroom: float
    recovery_batch: int
    report_batch: int
    max_fanout: Annotated[int, msgspec.Meta(ge=0, le=100_000)]


class ExecutorConfig(msgspec.Struct, forbid_unknown_fields=True):
    pool: str
    max_concurrent_tasks: int
    task_timeout_seconds: float
    kill_grace_seconds: float
    ack_wait_seconds: float
    max_deliveries: int
    # the heartbeat bucket forgets an executor after 60 s: three beats must fit in that
    heartbeat_interval_seconds: Annotated[float, msgspec.Meta(gt=0, le=20)]
    shutdown_grace_seconds: float
    log_limit_bytes: int
    log_attempts_kept: Annotated[int, msgspec.Meta(ge=1, le=100)]
    result_limit_bytes: int
    allow_commands: bool


class NushellConfig(msgspec.Struct, forbid_unknown_fields=True):
    binary: str
    provisioning_lib: str
    registry: str
    registry_lib: str
    env_vars: dict[str, str]


class ConcurrencyConfig(msgspec.Struct, forbid_unknown_fields=True):
    # key -> rate ("20/minute"): how many tasks holding the key may start per window
    rates: dict[str, str]


class ProvidersConfig(msgspec.Struct, forbid_unknown_fields=True):
    enabled: list[str]
    env: dict[str, list[str]]  # provider -> the variables its tasks receive
    secrets: list[str]  # variables whose values are masked in everything a task reports


class TracingConfig(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool
    exporter: Literal["none", "otlp-http", "otlp-grpc", "console"]
    endpoint: str
    jaeger_ui: str
    ui_url: str = ""


class Config(msgspec.Struct, forbid_unknown_fields=True):
    orchestrator: OrchestratorConfig
    execution: ExecutionConfig
    nats: NatsConfig
    gateway: GatewayConfig
    scheduler: SchedulerConfig
    executor: ExecutorConfig
    nushell: NushellConfig
    providers: ProvidersConfig
    tracing: TracingConfig
    concurrency: ConcurrencyConfig
    plans: PlansConfig
    # where each "section.key" came from; not part of the file format
    sources: dict[str, str] = msgspec.field(default_factory=dict)
    # things worth telling the operator, such as an unknown PROVISIONING_<SECTION>_<KEY>
    warnings: list[str] = msgspec.field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return Path(self.orchestrator.data_dir).expanduser()

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for every key, for display."""
        raw = msgspec.to_builtins(self)
        raw.pop("sources", None)
        raw.pop("warnings", None)
        return {f"{s}.{k}": v for s, keys in raw.items() for k, v in keys.items()}


def user_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "provisioning" / "config.toml"


def _defaults() -> dict[str, dict[str, Any]]:
    text = resources.files("shared").joinpath("config.defaults.toml").read_text("utf-8")
    return tomllib.loads(text)


def _parse_env(var: str, text: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            lowered = text.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(f"expected a boolean, got {text!r}")
        if isinstance(default, int):  # a float where the key takes one: checked by its type
            return int(text) if text.strip().lstrip("+-").isdigit() else float(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, list):
            stripped = text.strip()
            if stripped.startswith("["):
                return json.loads(stripped)
            return [item.strip() for item in stripped.split(",") if item.strip()]
        if isinstance(default, dict):
            return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{var}: {exc}", variable=var) from None
    return text


def load_config(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective configuration.

    ``path``: a user file (else ``$PROVISIONING_CONFIG``, else the per-user file if it exists).
    ``overrides``: ``{"section.key": value}`` from command-line flags; ``None`` values are ignored.
    """
    env = os.environ if environ is None else environ
    merged = _defaults()
    sources = {f"{s}.{k}": "default" for s, keys in merged.items() for k in keys}

    explicit = path or env.get("PROVISIONING_CONFIG")
    file = Path(explicit).expanduser() if explicit else user_config_path()
    if explicit and not file.is_file():
        raise ConfigError(f"configuration file not found: {file}", path=str(file))
    if file.is_file():
        try:
            data = tomllib.loads(file.read_text("utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {file}: {exc}", path=str(file)) from None
        for section, keys in data.items():
            if section not in merged or not isinstance(keys, dict):
                raise ConfigError(f"{file}: unknown section [{section}]", path=str(file))
            for key, value in keys.items():
                if key not in merged[section]:
                    raise ConfigError(f"{file}: unknown key {section}.{key}", path=str(file))
                merged[section][key] = value
                sources[f"{section}.{key}"] = f"file:{file}"

    for section, keys in merged.items():
        for key, default in keys.items():
            var = f"{ENV_PREFIX}{section}_{key}".upper()
            if var in env:
                keys[key] = _parse_env(var, env[var], default)
                sources[f"{section}.{key}"] = f"env:{var}"
    known = {f"{ENV_PREFIX}{s}_{k}".upper() for s, keys in merged.items() for k in keys}
    sections = tuple(f"{ENV_PREFIX}{s}_".upper() for s in merged)
    warnings = [
        f"{var} is not a configuration key (typo?); it is ignored"
        for var in sorted(env)
        if var.startswith(sections) and var not in known
    ]
    if env.get("NATS_URL"):
        merged["nats"]["url"] = env["NATS_URL"]
        sources["nats.url"] = "env:NATS_URL"
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        merged["tracing"]["endpoint"] = env["OTEL_EXPORTER_OTLP_ENDPOINT"]
        sources["tracing.endpoint"] = "env:OTEL_EXPORTER_OTLP_ENDPOINT"
        if merged["tracing"]["exporter"] == "none":
            merged["tracing"]["exporter"] = "otlp-http"
            sources["tracing.exporter"] = "env:OTEL_EXPORTER_OTLP_ENDPOINT"

    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if section not in merged or key not in merged[section]:
            raise ConfigError(f"unknown configuration key {dotted!r}")
        merged[section][key] = value
        sources[dotted] = "flag"

    try:
        config = msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    if config.gateway.users and not config.gateway.auth_token:
        raise ConfigError(
            "[gateway] users needs [gateway] auth_token too (the operators' token, and the "
            "secret that tasks' own tokens are made from)"
        )
    for key, text in config.concurrency.rates.items():
        try:
            parse_rate(text)
        except ValueError as exc:
            raise ConfigError(f"[concurrency] rates: {key!r}: {exc}", key=key) from None
    config.sources = sources
    config.warnings = warnings
    return config
