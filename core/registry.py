"""The action registry: the allow-list that maps action names to Nushell functions.

Only registered actions run. A Nushell action names a module under the library root and a
function in it; both are checked to be plain identifiers that resolve inside the library, so
an action can never point outside it. Built-in actions run inside the executor.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import msgspec

from shared.errors import ActionNotFound, ConfigError
from shared.ids import ACTION_RE

from . import NULIB_DIR

__all__ = ["BUILTIN_ACTIONS", "COMMAND_ACTION", "Action", "Registry", "load_registry"]

BUILTIN_ACTIONS = ("builtin.noop", "builtin.sleep", "builtin.fail")
COMMAND_ACTION = "command.run"  # plain argv, no shell; off unless an executor allows it
_MODULE_RE = re.compile(r"^[a-z][a-z0-9_-]*(/[a-z][a-z0-9_-]*)*$")
_FUNCTION_RE = re.compile(r"^[a-z][a-z0-9-]*( [a-z][a-z0-9-]*)?$")
DEFAULT_REGISTRY = Path(__file__).parent / "registry.toml"


class Action(msgspec.Struct, frozen=True):
    name: str
    kind: Literal["nushell", "builtin", "command"]
    module: str = ""
    function: str = ""
    description: str = ""
    timeout_seconds: float | None = None
    lib_dir: str = ""

    def script(self) -> str:
        """The fixed Nushell program that calls this action; arguments arrive on stdin as JSON.

        Only registry data (checked identifiers) appears in the program text, never user data.
        """
        module_name = self.module.rsplit("/", 1)[-1]
        return (
            f"use {self.module}\n"
            "let args = ($in | from json)\n"
            f"let result = ({module_name} {self.function} $args)\n"
            "$result | to json --raw | save --force $env.PROVISIONING_RESULT_FILE\n"
        )


class _Entry(msgspec.Struct, forbid_unknown_fields=True):
    module: str
    function: str
    description: str = ""
    timeout_seconds: float | None = None


class _File(msgspec.Struct):
    actions: dict[str, _Entry] = msgspec.field(default_factory=dict)


class Registry:
    """Action name -> :class:`Action`. Immutable once loaded."""

    def __init__(self, actions: Iterable[Action]) -> None:
        self._actions = {a.name: a for a in actions}

    def get(self, name: str, *, task: str | None = None) -> Action:
        try:
            return self._actions[name]
        except KeyError:
            raise ActionNotFound(name, task=task) from None

    def __contains__(self, name: object) -> bool:
        return name in self._actions

    def names(self) -> list[str]:
        return sorted(self._actions)

    def lib_dirs(self) -> list[str]:
        return sorted({a.lib_dir for a in self._actions.values() if a.lib_dir})


def _load_file(path: Path, lib_dir: Path) -> list[Action]:
    try:
        raw = msgspec.convert(tomllib.loads(path.read_text("utf-8")), _File)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"cannot load action registry {path}: {exc}", path=str(path)) from None
    root = lib_dir.resolve()
    actions = []
    for name, entry in raw.actions.items():
        if not ACTION_RE.match(name) or name.startswith(("builtin.", "command.")):
            raise ConfigError(f"{path}: invalid action name {name!r}", path=str(path))
        if not _MODULE_RE.match(entry.module) or not _FUNCTION_RE.match(entry.function):
            raise ConfigError(f"{path}: action {name!r} has an invalid module or function")
        target = (root / entry.module).resolve()
        if not target.is_relative_to(root):
            raise ConfigError(f"{path}: action {name!r} points outside {root}")
        if not (target / "mod.nu").is_file() and not target.with_suffix(".nu").is_file():
            raise ConfigError(f"{path}: action {name!r}: module {entry.module!r} not in {root}")
        actions.append(
            Action(
                name=name,
                kind="nushell",
                module=entry.module,
                function=entry.function,
                description=entry.description,
                timeout_seconds=entry.timeout_seconds,
                lib_dir=str(root),
            )
        )
    return actions


def load_registry(extra: str | Path | None = None, extra_lib: str | Path | None = None) -> Registry:
    """The packaged registry, plus a user registry whose modules live in ``extra_lib``."""
    actions = [
        Action(name="builtin.noop", kind="builtin", description="Do nothing; returns {}"),
        Action(name="builtin.sleep", kind="builtin", description='Sleep {"seconds": x}'),
        Action(name="builtin.fail", kind="builtin", description='Fail with {"message": "..."}'),
        Action(name=COMMAND_ACTION, kind="command", description='Run {"argv": [...]}, no shell'),
    ]
    actions += _load_file(DEFAULT_REGISTRY, NULIB_DIR)
    if extra:
        extra_path = Path(extra).expanduser()
        lib = Path(extra_lib).expanduser() if extra_lib else extra_path.parent / "nulib"
        actions += _load_file(extra_path, lib)
    return Registry(actions)
