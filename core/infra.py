"""Infra definitions (Nickel) and the workflows the seed's shortcuts build from them.

``POST /workflows/servers/create {"infra": "wuji"}`` becomes one ``server.create`` task per
server of the infra, all in parallel; ``taskserv/create`` installs task services on every server
(in the infra's order, chained per server); ``cluster/create`` is the whole seed Example 3:
servers in parallel, then task services, then the cluster, then its applications.

Every ``server.create`` task carries its server's effective provider (the server's own, else the
infra's): the gateway and direct mode refuse an unknown or disabled one
(:func:`core.providers.check_providers`), and the executor gives the task that provider's
credentials only. :func:`server_list_args` and :func:`server_delete_args` do the same for the
CLI's ``server list`` and ``server delete``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nickel

from shared.config import Config
from shared.errors import DefinitionError
from shared.ids import NAME_RE
from shared.messages import TaskSpec, WorkflowDefinition
from shared.priority import parse_priority

from . import INFRA_DIR
from .providers import DEVELOPMENT_PROVIDER, Providers, effective_provider

__all__ = [
    "KNOBS",
    "PARAMS",
    "check_params",
    "cluster_workflow",
    "infra_hashes",
    "load_infra",
    "server_delete_args",
    "server_list_args",
    "servers_workflow",
    "strip_ansi",
    "taskserv_workflow",
]

# Arguments passed through from "params" to every task (the local provider's test knobs).
KNOBS = ("delay_seconds", "fail", "fail_at")
# Every key of "params" the builders read; any other is refused, never dropped silently.
PARAMS = ("servers", "taskserv", "apps", "retries", "priority", *KNOBS)
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    return _ANSI_RE.sub("", text)


def infra_root(infra_dir: str = "") -> Path:
    return Path(infra_dir).expanduser() if infra_dir else INFRA_DIR


@functools.lru_cache(maxsize=64)
def _evaluate(path: Path, mtime: float) -> dict[str, Any]:
    try:
        value = json.loads(nickel.run(path.read_text("utf-8"), import_paths=[str(path.parent)]))
    except nickel.NickelException as exc:
        raise DefinitionError(
            f"infra {path.parent.name!r}: {strip_ansi(str(exc)).strip()}", reason="invalid_infra"
        ) from None
    if not isinstance(value, dict):
        raise DefinitionError(f"infra {path.parent.name!r} is not a record", reason="invalid_infra")
    return value


def load_infra(name: str, infra_dir: str = "") -> dict[str, Any]:
    """Evaluate ``<infra_dir>/<name>/settings.ncl`` to plain data."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise DefinitionError(f"invalid infra name {name!r}", reason="unknown_infra")
    path = infra_root(infra_dir) / name / "settings.ncl"
    if not path.is_file():
        raise DefinitionError(f"unknown infra {name!r} (no {path})", reason="unknown_infra")
    return _evaluate(path, path.stat().st_mtime)


def check_params(params: Mapping[str, Any]) -> None:
    """Refuse (422, ``unknown_field``) any key of ``params`` the builders do not read."""
    unknown = [str(k) for k in params if k not in PARAMS]
    if unknown:
        fields = [f"params.{k[:100]}" for k in unknown[:20]]
        raise DefinitionError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, fields))} "
            f"(params takes {', '.join(PARAMS)})",
            reason="unknown_field",
            fields=fields,
        )


def _priority(params: dict[str, Any]) -> int:
    """``params.priority``: the workflow's, a number or a named level (shared.priority)."""
    if "priority" not in params:
        return 0
    return parse_priority(params["priority"], field="params.priority")


def _retries(params: dict[str, Any]) -> int:
    value = params.get("retries", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise DefinitionError(
            "params.retries must be an integer from 0 to 100", reason="wrong_field"
        )
    return value


def _knobs(params: dict[str, Any]) -> dict[str, Any]:
    return {k: params[k] for k in KNOBS if k in params}


def _servers(infra: dict[str, Any], params: dict[str, Any]) -> list[dict[str, Any]]:
    default = str(infra.get("provider") or DEVELOPMENT_PROVIDER)
    servers = [
        {**s, "provider": effective_provider(s, default)}
        for s in infra.get("servers", [])
        if isinstance(s, dict)
    ]
    wanted = params.get("servers")
    if wanted is not None:
        if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
            raise DefinitionError(
                "params.servers must be a list of hostnames", reason="wrong_field"
            )
        known = {s.get("hostname") for s in servers}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise DefinitionError(
                f"servers not in infra {infra.get('name')!r}: {', '.join(unknown)}",
                reason="unknown_server",
            )
        servers = [s for s in servers if s.get("hostname") in wanted]
    if not servers:
        raise DefinitionError(f"infra {infra.get('name')!r} defines no servers", reason="empty")
    return servers


def _server_tasks(name: str, infra: dict[str, Any], params: dict[str, Any]) -> list[TaskSpec]:
    return [
        TaskSpec(
            id=f"server-{s['hostname']}",
            action="server.create",
            args={"infra": name, "server": s, **_knobs(params)},
            retries=_retries(params),
        )
        for s in _servers(infra, params)
    ]


def servers_workflow(name: str, params: dict[str, Any], infra_dir: str = "") -> WorkflowDefinition:
    check_params(params)
    infra = load_infra(name, infra_dir)
    return WorkflowDefinition(
        name=f"{name}: create servers",
        tasks=_server_tasks(name, infra, params),
        on_failure="continue",
        priority=_priority(params),
    )


def _taskserv_tasks(
    name: str, infra: dict[str, Any], params: dict[str, Any], *, after_servers: bool
) -> list[TaskSpec]:
    only = params.get("taskserv")
    taskservs = [only] if only else list(infra.get("taskservs", []))
    if not taskservs or not all(isinstance(t, str) and NAME_RE.match(t) for t in taskservs):
        raise DefinitionError("no valid task services to install", reason="wrong_field")
    tasks = []
    for server in _servers(infra, params):
        host = server["hostname"]
        previous = f"server-{host}" if after_servers else None
        for ts in taskservs:
            task_id = f"{ts}-{host}"
            tasks.append(
                TaskSpec(
                    id=task_id,
                    action="taskserv.create",
                    args={"infra": name, "taskserv": ts, "server": host, **_knobs(params)},
                    depends_on=[previous] if previous else [],
                    retries=_retries(params),
                )
            )
            previous = task_id
    return tasks


def taskserv_workflow(name: str, params: dict[str, Any], infra_dir: str = "") -> WorkflowDefinition:
    check_params(params)
    infra = load_infra(name, infra_dir)
    return WorkflowDefinition(
        name=f"{name}: install task services",
        tasks=_taskserv_tasks(name, infra, params, after_servers=False),
        priority=_priority(params),
    )


def cluster_workflow(name: str, params: dict[str, Any], infra_dir: str = "") -> WorkflowDefinition:
    """Servers in parallel -> task services per server -> the cluster -> its applications."""
    check_params(params)
    infra = load_infra(name, infra_dir)
    servers = _server_tasks(name, infra, params)
    taskservs = _taskserv_tasks(name, infra, params, after_servers=True)
    cluster = infra.get("cluster") or {}
    cluster_name = str(cluster.get("name") or f"{name}-cluster")
    hosts = [s.args["server"]["hostname"] for s in servers]
    last_per_host = {t.args["server"]: t.id for t in taskservs}
    cluster_task = TaskSpec(
        id="cluster",
        action="cluster.create",
        args={
            "infra": name,
            "cluster": {
                "name": cluster_name,
                "type": cluster.get("type", "kubernetes"),
                "servers": hosts,
            },
            **_knobs(params),
        },
        depends_on=sorted(set(last_per_host.values())) or [s.id for s in servers],
    )
    apps = params.get("apps", cluster.get("apps", []))
    if not isinstance(apps, list):
        raise DefinitionError("params.apps must be a list of names", reason="wrong_field")
    app_tasks = [
        TaskSpec(
            id=f"app-{app}",
            action="app.deploy",
            args={"infra": name, "cluster": cluster_name, "app": app, **_knobs(params)},
            depends_on=["cluster"],
        )
        for app in apps
        if isinstance(app, str) and NAME_RE.match(app)
    ]
    return WorkflowDefinition(
        name=f"{name}: create cluster {cluster_name}",
        tasks=[*servers, *taskservs, cluster_task, *app_tasks],
        priority=_priority(params),
    )


def server_list_args(
    name: str | None,
    config: Config,
    infra_dir: str = "",
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``server.list`` arguments: the enabled providers the infra's servers use (and their AWS
    regions); without an infra, the development provider and every enabled provider that the
    environment sets up (credentials, a profile or an endpoint: see ``Providers.set_up``)."""
    enabled = config.providers.enabled
    if name is None:
        providers = Providers.from_config(config, environ)
        return {"providers": [p for p in enabled if providers.set_up(p)]}
    infra = load_infra(name, infra_dir)
    default = str(infra.get("provider") or DEVELOPMENT_PROVIDER)
    servers = [s for s in infra.get("servers", []) if isinstance(s, dict)]
    used = {effective_provider(s, default) for s in servers} | {DEVELOPMENT_PROVIDER}
    args: dict[str, Any] = {"infra": name, "providers": [p for p in enabled if p in used]}
    regions = sorted(
        {
            str(s["region"])
            for s in servers
            if effective_provider(s, default) == "aws" and s.get("region")
        }
    )
    if regions:
        args["regions"] = regions
    return args


def server_delete_args(hostname: str, name: str | None, infra_dir: str = "") -> dict[str, Any]:
    """``server.delete`` arguments: with an infra that defines the server, its provider (and
    region), so the task goes to the provider that made it; otherwise the development provider."""
    args: dict[str, Any] = {"hostname": hostname}
    if name is None:
        return args
    args["infra"] = name
    try:
        infra = load_infra(name, infra_dir)
    except DefinitionError as exc:
        if exc.reason == "unknown_infra":  # servers of ad-hoc workflows have no infra file
            return args
        raise
    default = str(infra.get("provider") or DEVELOPMENT_PROVIDER)
    for server in infra.get("servers", []):
        if isinstance(server, dict) and server.get("hostname") == hostname:
            args["provider"] = effective_provider(server, default)
            if server.get("region"):
                args["region"] = server["region"]
            break
    else:
        args["provider"] = default
    return args


def infra_hashes(definition: WorkflowDefinition, infra_dir: str = "") -> dict[str, str]:
    """sha256 of the settings file of every infra the definition's tasks name (``args.infra``),
    by infra name: what a plan was made from, compared again when it is applied."""
    names = sorted(
        {
            t.args["infra"]
            for t in definition.tasks
            if isinstance(t.args.get("infra"), str) and NAME_RE.match(t.args["infra"])
        }
    )
    out = {}
    for name in names:
        path = infra_root(infra_dir) / name / "settings.ncl"
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"
    return out
