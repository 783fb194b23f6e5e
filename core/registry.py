"""The action registry: the allow-list that maps action names to Nushell functions.

Only registered actions run. A Nushell action names a module under the library root and a
function in it; both are checked to be plain identifiers, and the module's file must resolve
(symbolic links followed) inside the library, so an action can never point outside it.
Built-in actions run inside the executor.
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import msgspec

from shared.config import NushellConfig
from shared.errors import ActionNotFound, ConfigError
from shared.ids import ACTION_RE
from shared.keys import KeySpec
from shared.messages import Compensation

from . import NULIB_DIR

__all__ = [
    "BUILTIN_ACTIONS",
    "COMMAND_ACTION",
    "Action",
    "Registry",
    "load_registry",
    "registry_for",
]

BUILTIN_ACTIONS = ("builtin.noop", "builtin.echo", "builtin.sleep", "builtin.fail")
COMMAND_ACTION = "command.run"  # plain argv, no shell; off unless an executor allows it
_MODULE_RE = re.compile(r"^[a-z][a-z0-9_-]*(/[a-z][a-z0-9_-]*)*$")
_FUNCTION_RE = re.compile(r"^[a-z][a-z0-9-]*( [a-z][a-z0-9-]*)?$")
DEFAULT_REGISTRY = Path(__file__).parent / "registry.toml"
log = logging.getLogger(__name__)


class Action(msgspec.Struct, frozen=True):
    name: str
    kind: Literal["nushell", "builtin", "command"]
    module: str = ""
    function: str = ""
    description: str = ""
    timeout_seconds: float | None = None
    lib_dir: str = ""
    module_file: bool = False  # the module is ``<module>.nu``, not ``<module>/mod.nu``
    core_dir: str = ""  # the provisioning library ([nushell] provisioning_lib); "" = packaged
    concurrency: tuple[KeySpec, ...] = ()  # keys every task of this action holds
    plan_function: str = ""  # the read-only function that plans it
    read_only: bool = False
    compensate: Compensation | None = None  # how to undo it (a default for its tasks)

    @property
    def lib_dirs(self) -> list[str]:
        """``NU_LIB_DIRS`` for this action: its own library first, then the core library (so a
        user module can ``use lib_provisioning/progress.nu``, and a plain command that runs
        ``nu`` finds it too)."""
        core = self.core_dir or str(NULIB_DIR.resolve())
        return [core] if self.lib_dir in ("", core) else [self.lib_dir, core]

    def script(self, *, plan: bool = False) -> str:
        """The fixed Nushell program that calls this action (its plan function with ``plan``);
        arguments arrive on stdin as JSON.

        Only registry data (checked identifiers) appears in the program text, never user data.
        """
        module_name = self.module.rsplit("/", 1)[-1]
        target = f"{self.module}.nu" if self.module_file else self.module
        function = self.plan_function if plan else self.function
        return (
            f"use {target}\n"
            "let args = ($in | from json)\n"
            f"let result = ({module_name} {function} $args)\n"
            "$result | to json --raw | save --force $env.PROVISIONING_RESULT_FILE\n"
        )


class _Entry(msgspec.Struct, forbid_unknown_fields=True):
    module: str
    function: str
    description: str = ""
    timeout_seconds: float | None = None
    concurrency: list[KeySpec] = msgspec.field(default_factory=list)
    # the read-only function of the same module that plans the action; read_only: the action
    # changes nothing (it plans as "none"); compensate: how to undo it
    plan: str = ""
    read_only: bool = False
    compensate: Compensation | None = None


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

    def compensation(self, name: str) -> Compensation | None:
        """How the action's work is undone by default (None: it is not)."""
        action = self._actions.get(name)
        return action.compensate if action is not None else None

    def key_defaults(self, name: str) -> tuple[KeySpec, ...]:
        """The concurrency keys every task of the action holds (none for an unknown one)."""
        action = self._actions.get(name)
        return action.concurrency if action is not None else ()


def _load_file(path: Path, lib_dir: Path, core_dir: Path) -> list[Action]:
    try:
        raw = msgspec.convert(tomllib.loads(path.read_text("utf-8")), _File)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"cannot load action registry {path}: {exc}", path=str(path)) from None
    root = lib_dir.resolve()
    actions = []
    for name, entry in raw.actions.items():
        if not ACTION_RE.match(name) or name.startswith(("builtin.", "command.")):
            raise ConfigError(f"{path}: invalid action name {name!r}", path=str(path))
        if (
            not _MODULE_RE.match(entry.module)
            or not _FUNCTION_RE.match(entry.function)
            or (entry.plan and not _FUNCTION_RE.match(entry.plan))
        ):
            raise ConfigError(
                f"{path}: action {name!r}: module {entry.module!r} or function "
                f"{entry.function!r} is not a plain name (module: lowercase words joined by '/', "
                "relative to the library; function: one or two lowercase words)",
                path=str(path),
            )
        module_dir = root / entry.module
        candidates = [(module_dir / "mod.nu", False), (module_dir.with_suffix(".nu"), True)]
        found = [(file, is_file) for file, is_file in candidates if file.is_file()]
        if not found:
            raise ConfigError(
                f"{path}: action {name!r}: module {entry.module!r} not found in {root} "
                f"(expected {entry.module}/mod.nu or {entry.module}.nu)",
                path=str(path),
            )
        file, module_file = found[0]
        # Every step resolved, symbolic links included: the module's directory (Nushell loads
        # its siblings through it) and the file itself must stay inside the library.
        for step in (file.parent, file):
            if not step.resolve().is_relative_to(root):
                raise ConfigError(
                    f"{path}: action {name!r} points outside {root} ({step} -> {step.resolve()})",
                    path=str(path),
                )
        actions.append(
            Action(
                name=name,
                kind="nushell",
                module=entry.module,
                function=entry.function,
                description=entry.description,
                timeout_seconds=entry.timeout_seconds,
                lib_dir=str(root),
                module_file=module_file,
                core_dir=str(core_dir),
                concurrency=tuple(entry.concurrency),
                plan_function=entry.plan,
                read_only=entry.read_only,
                compensate=entry.compensate,
            )
        )
    return actions


def load_registry(
    extra: str | Path | None = None,
    extra_lib: str | Path | None = None,
    *,
    core_lib: str | Path | None = None,
) -> Registry:
    """The packaged registry, its modules in ``core_lib`` (``[nushell] provisioning_lib``; the
    library shipped in the package when None), plus a user registry whose modules live in
    ``extra_lib``. Every module must resolve: a wrong path fails here, at start, not in every
    task."""
    core = Path(core_lib).expanduser().resolve() if core_lib else NULIB_DIR.resolve()
    if not core.is_dir():
        raise ConfigError(
            f"[nushell] provisioning_lib {core} is not a directory: point it at the provisioning "
            "library (the directory holding servers/, taskservs/, clusters/, lib_provisioning/), "
            "or leave it empty for the one shipped in the package",
            path=str(core),
        )
    actions = [
        Action(name="builtin.noop", kind="builtin", description="Do nothing; returns {}"),
        Action(name="builtin.echo", kind="builtin", description="Return its arguments"),
        Action(name="builtin.sleep", kind="builtin", description='Sleep {"seconds": x}'),
        Action(name="builtin.fail", kind="builtin", description='Fail with {"message": "..."}'),
        Action(name=COMMAND_ACTION, kind="command", description='Run {"argv": [...]}, no shell'),
    ]
    actions += _load_file(DEFAULT_REGISTRY, core, core)
    if extra:
        extra_path = Path(extra).expanduser()
        lib = Path(extra_lib).expanduser() if extra_lib else extra_path.parent / "nulib"
        if not lib.is_dir():
            raise ConfigError(
                f"action registry {extra_path}: library directory {lib} does not exist",
                path=str(extra_path),
            )
        known = {a.name for a in actions}
        for action in _load_file(extra_path, lib, core):
            if action.name in known:
                log.warning("action %s from %s replaces the packaged one", action.name, extra_path)
            actions.append(action)
    return Registry(actions)


def registry_for(config: NushellConfig) -> Registry:
    """The registry a service or the CLI runs with, from the ``[nushell]`` configuration."""
    return load_registry(
        config.registry or None,
        config.registry_lib or None,
        core_lib=config.provisioning_lib or None,
    )
