"""Providers: which exist, which are enabled, and what the tasks of each one receive.

A server's provider is a Nushell module, ``core/nulib/lib_provisioning/providers/<name>.nu``;
``servers/mod.nu`` dispatches the ``server.*`` actions to it. ``local`` is the development
provider (JSON files, nothing is provisioned); ``aws`` runs EC2 through the ``aws`` command line.

- **Submission**: :func:`check_providers` refuses (422) a workflow whose ``server.*`` task names
  a provider that does not exist or is not in ``[providers] enabled``; it is never replaced by
  another. The gateway, the shortcuts and direct mode all call it.
- **Credentials**: a task receives the variables of ``[providers.env]`` of the providers its
  arguments name, and only if its action runs a provider (``server.*``): a ``taskserv.create``
  never sees AWS keys. They come from a snapshot of the environment taken once, when the
  executor (or the CLI) starts: :class:`Providers`.
- **Secrets**: the values of the ``[providers] secrets`` variables (and of the credentials in
  an AWS credentials file, and the orchestrator's own tokens) feed the :class:`Redactor` the
  runner applies to everything a task reports.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from shared.config import Config, ProvidersConfig
from shared.errors import DefinitionError
from shared.messages import WorkflowDefinition

from .redact import Redactor

__all__ = [
    "DEVELOPMENT_PROVIDER",
    "KNOWN_PROVIDERS",
    "Providers",
    "check_providers",
    "effective_provider",
    "provider_env",
    "task_providers",
]

KNOWN_PROVIDERS = ("local", "aws")  # each has lib_provisioning/providers/<name>.nu
DEVELOPMENT_PROVIDER = "local"
PROVIDER_ACTIONS = "server."  # the actions that run a provider
# Profile files a provider reads when no variable names others (a task's HOME is a fresh
# directory, so the CLI's own lookup of ~/.aws would find nothing).
_PROFILE_FILES = {
    "aws": {
        "AWS_CONFIG_FILE": ".aws/config",
        "AWS_SHARED_CREDENTIALS_FILE": ".aws/credentials",
    },
}
# Variables that say a provider is set up in an environment: a listing without an infra asks
# the providers that are (region alone is not enough: without credentials the aws command line
# would go looking for an instance role).
_SET_UP_BY = {
    "aws": (
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_CONFIG_FILE",
    ),
}
_CREDENTIAL_KEYS = ("aws_secret_access_key", "aws_session_token")


def effective_provider(server: Mapping[str, Any], default: str = DEVELOPMENT_PROVIDER) -> str:
    """A server's own ``provider``, else the infra's ``default``."""
    value = server.get("provider")
    return str(value) if value not in (None, "") else default


def task_providers(action: str, args: Mapping[str, Any]) -> list[str]:
    """The providers a task runs, read from its arguments as ``servers/mod.nu`` reads them:
    ``server.provider`` or ``provider`` (default ``local``); ``server.list`` takes a list,
    ``providers``. Empty for an action that runs no provider."""
    if not action.startswith(PROVIDER_ACTIONS):
        return []
    if action == "server.list" and "providers" in args:
        listed = args["providers"]
        items = listed if isinstance(listed, list) else [listed]
        return [str(p) for p in items]
    server = args.get("server")
    if isinstance(server, Mapping) and server.get("provider") not in (None, ""):
        return [str(server["provider"])]
    return [effective_provider(args)]


def _server_of(args: Mapping[str, Any]) -> str | None:
    server = args.get("server")
    if isinstance(server, Mapping) and isinstance(server.get("hostname"), str):
        return str(server["hostname"])
    hostname = args.get("hostname")
    return hostname if isinstance(hostname, str) else None


def check_providers(definition: WorkflowDefinition, config: Config) -> None:
    """Refuse a workflow whose server tasks name a provider that does not exist or is not
    enabled: :class:`DefinitionError` (422) naming the task, the server and the provider."""
    enabled = config.providers.enabled
    for task in definition.tasks:
        for provider in task_providers(task.action, task.args):
            if provider in KNOWN_PROVIDERS and provider in enabled:
                continue
            server = _server_of(task.args)
            what = f"server {server!r}" if server else task.action
            if provider not in KNOWN_PROVIDERS:
                why = f"is unknown (known providers: {', '.join(KNOWN_PROVIDERS)})"
            else:
                why = f"is not enabled here ([providers] enabled = {', '.join(enabled) or 'none'})"
            raise DefinitionError(
                f"task {task.id!r}: {what}: provider {provider!r} {why}",
                task=task.id,
                reason="unknown_provider",
                provider=provider,
                server=server,
            )


def provider_env(
    action: str, args: Mapping[str, Any], settings: ProvidersConfig, environ: Mapping[str, str]
) -> dict[str, str]:
    """The variables a task receives for its providers: those of ``[providers.env]`` for each
    enabled provider its arguments name, as found in ``environ``; nothing for other actions."""
    env: dict[str, str] = {}
    for provider in task_providers(action, args):
        if provider not in settings.enabled:
            continue
        for var in settings.env.get(provider, ()):
            if var in environ:
                env[var] = environ[var]
    return env


def _capture(settings: ProvidersConfig, environ: Mapping[str, str], home: Path) -> dict[str, str]:
    """The variables of every enabled provider (and the secret ones) present in ``environ``, plus
    the profile files of the user that exist when no variable names others."""
    wanted = {var for p in settings.enabled for var in settings.env.get(p, ())}
    captured = {
        var: environ[var] for var in sorted(wanted | set(settings.secrets)) if var in environ
    }
    for provider in settings.enabled:
        names = settings.env.get(provider, ())
        for var, relative in _PROFILE_FILES.get(provider, {}).items():
            path = home / relative
            if var in names and var not in captured and path.is_file():
                captured[var] = str(path)
    return captured


def _file_secrets(path: str) -> list[str]:
    """The secret values of an AWS credentials file (every profile)."""
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (OSError, configparser.Error, UnicodeDecodeError):
        return []
    return [
        parser.get(section, key)
        for section in parser.sections()
        for key in _CREDENTIAL_KEYS
        if parser.has_option(section, key)
    ]


class Providers:
    """What the tasks of each provider receive, from an environment captured once, at start.

    Nothing reads ``os.environ`` per task: a process that later scrubs its own environment (or
    runs tasks as another user) keeps working from this snapshot.
    """

    def __init__(
        self,
        settings: ProvidersConfig,
        captured: Mapping[str, str],
        extra_secrets: Iterable[str] = (),
    ) -> None:
        self.settings = settings
        self._captured = dict(captured)
        secrets = [self._captured[v] for v in settings.secrets if v in self._captured]
        if credentials := self._captured.get("AWS_SHARED_CREDENTIALS_FILE"):
            secrets += _file_secrets(credentials)
        self.redactor = Redactor([*secrets, *extra_secrets])

    @classmethod
    def from_config(
        cls, config: Config, environ: Mapping[str, str] | None = None, home: Path | None = None
    ) -> Providers:
        """Capture, now, what the enabled providers need from ``environ`` (default: this
        process's environment) and the user's profile files under ``home``."""
        env = os.environ if environ is None else environ
        captured = _capture(config.providers, env, home or Path.home())
        own = [
            config.gateway.auth_token,
            config.orchestrator.auth_token,
            config.nats.password,
            config.nats.token,
        ]
        return cls(config.providers, captured, [s for s in own if s])

    @classmethod
    def none(cls) -> Providers:
        """No provider receives anything; only AWS-key-shaped text is masked."""
        return cls(ProvidersConfig(enabled=[DEVELOPMENT_PROVIDER], env={}, secrets=[]), {})

    def env_for(self, action: str, args: Mapping[str, Any]) -> dict[str, str]:
        return provider_env(action, args, self.settings, self._captured)

    def set_up(self, provider: str) -> bool:
        """Whether ``provider`` is enabled and the captured environment has what it needs (the
        development provider always is)."""
        if provider not in self.settings.enabled:
            return False
        if provider == DEVELOPMENT_PROVIDER:
            return True
        return any(var in self._captured for var in _SET_UP_BY.get(provider, ()))
