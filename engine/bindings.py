"""What the engine needs to know of the registry and the configuration, as plain functions:
each task's timeout and each task's concurrency keys. Shared by the scheduler and direct mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core.registry import Registry
from shared.config import Config
from shared.keys import Claim, claims, parse_rate
from shared.messages import Compensation, TaskSpec, WorkflowDefinition

from .engine import ClaimsFor, CompensationFor

__all__ = ["check_keys", "claims_for", "compensation_for", "timeout_for"]


def timeout_for(registry: Registry, config: Config) -> Callable[[TaskSpec], float]:
    """A task's timeout: its own, else its action's, else ``[executor] task_timeout_seconds``."""

    def timeout(spec: TaskSpec) -> float:
        if spec.timeout_seconds is not None:
            return spec.timeout_seconds
        if spec.action in registry:
            action_timeout = registry.get(spec.action).timeout_seconds
            if action_timeout:
                return action_timeout
        return config.executor.task_timeout_seconds

    return timeout


def claims_for(registry: Registry, config: Config) -> ClaimsFor:
    """A task's concurrency keys: its action's defaults and its own, with the configured
    rates (``[concurrency] rates``)."""
    rates = {key: parse_rate(text) for key, text in config.concurrency.rates.items()}

    def claims_of(spec: TaskSpec, args: dict[str, Any]) -> list[Claim]:
        return claims(
            registry.key_defaults(spec.action), spec.concurrency, args, rates, task=spec.id
        )

    return claims_of


def check_keys(definition: WorkflowDefinition, claims_of: ClaimsFor) -> None:
    """Every task's concurrency keys can be made from its arguments and are acceptable keys;
    raises :class:`~shared.errors.DefinitionError` (a 422) naming the task and the key or
    argument at fault."""
    for spec in definition.tasks:
        claims_of(spec, spec.args)


def compensation_for(registry: Registry) -> CompensationFor:
    """How to undo a task: its own ``compensate``, else its action's default
    (``compensate`` in the registry: ``server.create`` -> ``server.delete`` of that host...)."""

    def undo(spec: TaskSpec) -> Compensation | None:
        if spec.compensate is not None:
            return spec.compensate
        return registry.compensation(spec.action)

    return undo
