"""What every command shares: the CLI's state (configuration, registry, client, runner), exit
codes, the mapping of errors to them, and the common options."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from core.providers import Providers
from core.registry import Registry, registry_for
from core.runner import Runner, resolve_binary
from shared.api_client import ApiClient, ApiError, OrchestratorUnavailable
from shared.config import Config
from shared.errors import DefinitionError, ProvisioningError

__all__ = [
    "EXIT_API",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "State",
    "fail",
    "mode_options",
    "output_option",
    "param_option",
    "parse_params",
    "user_errors",
    "wait_option",
]

EXIT_OK = 0
EXIT_FAILED = 1  # a workflow or task ended failed or cancelled
EXIT_USAGE = 2  # click's own code for bad usage
EXIT_UNAVAILABLE = 3  # no orchestrator answers
EXIT_API = 4  # the orchestrator refused the request (4xx)
EXIT_NOT_FOUND = 5
EXIT_CONFIG = 6
EXIT_INTERRUPTED = 130


class State:
    """The CLI's context object: configuration, and what is built from it on first use."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = registry_for(self.config.nushell)
        return self._registry

    def client(self, timeout_s: float | None = None) -> ApiClient:
        token = self.config.orchestrator.auth_token or self.config.gateway.auth_token
        return ApiClient(
            self.config.orchestrator.endpoint,
            token=token,
            timeout_s=timeout_s or self.config.orchestrator.timeout_seconds,
        )

    def runner(self) -> Runner:
        data_dir = self.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        return Runner(
            nu_binary=resolve_binary(self.config.nushell.binary),
            data_dir=data_dir,
            extra_env=self.config.nushell.env_vars,
            kill_grace_s=self.config.executor.kill_grace_seconds,
            result_limit_bytes=self.config.executor.result_limit_bytes,
            providers=Providers.from_config(self.config),
        )


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn known errors into one line on stderr and a distinct exit code."""
    try:
        yield
    except OrchestratorUnavailable as exc:
        fail(exc.message, EXIT_UNAVAILABLE)
    except ApiError as exc:
        fail(
            f"{exc.message} ({exc.status} {exc.api_code})",
            EXIT_NOT_FOUND if exc.status == 404 else EXIT_API,
        )
    except DefinitionError as exc:
        fail(exc.message, EXIT_API)
    except ProvisioningError as exc:
        fail(exc.message, EXIT_CONFIG if exc.code == "config_error" else EXIT_API)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        sys.exit(EXIT_OK)


def output_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--output",
        "-o",
        type=click.Choice(["table", "json"]),
        default="table",
        show_default=True,
        help="Output format.",
    )(f)


def mode_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--direct", "mode", flag_value="direct", help="Run here, without the orchestrator."
    )(f)
    return click.option(
        "--orchestrated", "mode", flag_value="orchestrated", help="Run through the orchestrator."
    )(f)


def wait_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--wait/--no-wait", default=False, help="Wait for the workflow, showing live progress."
    )(f)


param_option = click.option(
    "--param",
    "-p",
    "params",
    multiple=True,
    help="KEY=VALUE passed to the actions (JSON values allowed).",
)


def parse_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--param")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params
