"""``provisioning-orchestrator``: run one service, or the whole local stack (``up``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
from aiohttp import web

from core.processes import become_subreaper, watch_children_by_pidfd
from core.providers import Providers
from core.registry import check_modules, registry_for
from core.runner import Runner, resolve_binary
from shared import __version__
from shared.bus import Bus
from shared.config import Config, load_config, user_config_path
from shared.errors import ProvisioningError
from shared.gcpolicy import settle_heap
from shared.localstack import port_args, start_detached
from shared.logs import setup_logging
from shared.tracing import setup_tracing, shutdown_tracing

from . import shutdown

__all__ = ["main"]

log = logging.getLogger(__name__)
EXIT_CONFIG = 2
EXIT_STARTUP = 3


def _stop_event() -> asyncio.Event:
    """Set on SIGTERM or SIGINT: the service stops taking work and drains."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in shutdown.SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    if shutdown.requested():  # a signal came while the service was starting
        stop.set()
    return stop


async def _with_bus(
    config: Config, name: str, body: Callable[[Bus, asyncio.Event], Awaitable[None]]
) -> None:
    stop = _stop_event()
    bus = Bus(config.nats, name=name)

    async def start() -> None:  # both wait for NATS (a cluster may need a while to be ready)
        await bus.connect()
        await bus.bootstrap()

    starting = asyncio.create_task(start())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        await bus.drain()
        return
    stopper.cancel()
    async with bus:
        await starting
        bus.ready = True
        await body(bus, stop)


async def _stop_if_requested(_app: web.Application) -> None:
    """aiohttp has its own signal handlers by now; honour a signal that came before them."""
    if shutdown.requested():
        log.info("stop requested while starting; not serving")
        raise web.GracefulExit


def _load(ctx: click.Context, **overrides: Any) -> Config:
    params = ctx.find_root().params
    flags = {"orchestrator.data_dir": params.get("data_dir"), **overrides}
    if params.get("nats_url"):
        flags["nats.url"] = params["nats_url"]
    try:
        return load_config(params.get("config"), overrides=flags)
    except ProvisioningError as exc:
        raise click.ClickException(exc.message) from None


def _warn(config: Config) -> None:
    for warning in config.warnings:
        log.warning("%s", warning)


def _config_files(ctx: click.Context) -> list[Path]:
    """The configuration file this service read, if any (it may hold secrets)."""
    explicit = ctx.find_root().params.get("config") or os.environ.get("PROVISIONING_CONFIG")
    return [Path(explicit).expanduser() if explicit else user_config_path()]


def _registry(config: Config) -> Any:
    try:
        return registry_for(config.nushell)
    except ProvisioningError as exc:
        raise click.ClickException(exc.message) from None


@click.group(invoke_without_command=True)
@click.option("--config", type=click.Path(dir_okay=False), help="User configuration file (TOML).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data directory.")
@click.option("--nats-url", help="NATS server URL(s), comma-separated (default $NATS_URL).")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR.")
@click.option(
    "--daemon",
    is_flag=True,
    help="Start the local stack (`up`) in the background and return (the seed's form).",
)
@click.version_option(__version__, prog_name="provisioning-orchestrator")
@click.pass_context
def main(
    ctx: click.Context,
    config: str | None,
    data_dir: str | None,
    nats_url: str | None,
    log_level: str | None,
    daemon: bool,
) -> None:
    """Run the provisioning orchestrator's services."""
    ctx.ensure_object(dict)
    ctx.obj["log_level"] = log_level
    if daemon:
        if ctx.invoked_subcommand is not None:
            raise click.UsageError("--daemon starts the local stack: give no command with it")
        settings = _load(ctx)
        args = port_args(settings.orchestrator.endpoint)
        pid = start_detached(settings.data_dir, *args, config_path=config)
        click.echo(
            f"orchestrator starting in the background (pid {pid}); "
            f"logs in {settings.data_dir / 'logs' / 'orchestrator.log'}"
        )
    elif ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@main.command()
@click.option("--host", default=None, help="Listen address (default from [gateway] host).")
@click.option("--port", type=int, default=None, help="Listen port (default 9090).")
@click.pass_context
def gateway(ctx: click.Context, host: str | None, port: int | None) -> None:
    """The HTTP API."""
    from services.gateway import create_app

    config = _load(ctx, **{"gateway.host": host, "gateway.port": port})
    setup_logging(ctx.obj["log_level"], service="gateway")
    _warn(config)
    setup_tracing("provisioning-gateway", config.tracing)
    app = create_app(config, _registry(config))
    app.on_startup.append(_stop_if_requested)
    log.info("gateway listening on http://%s:%d", config.gateway.host, config.gateway.port)
    settle_heap()
    try:
        web.run_app(
            app,
            host=config.gateway.host,
            port=config.gateway.port,
            print=None,
            shutdown_timeout=5,
            access_log=None,
            handle_signals=True,
        )
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.gateway.host, config.gateway.port, exc)
        sys.exit(EXIT_STARTUP)
    finally:
        shutdown_tracing()


@main.command()
@click.pass_context
def scheduler(ctx: click.Context) -> None:
    """The DAG engine. Run several for high availability: one is active (it holds a lease in
    JetStream), the others stand by and take over within seconds when it dies."""
    from services.scheduler import Scheduler

    config = _load(ctx)
    setup_logging(ctx.obj["log_level"], service="scheduler")
    _warn(config)
    setup_tracing("provisioning-scheduler", config.tracing)
    registry = _registry(config)

    async def body(bus: Bus, stop: asyncio.Event) -> None:
        await Scheduler(config, bus, registry).run(stop)

    settle_heap()
    try:
        asyncio.run(_with_bus(config, "scheduler", body))
    finally:
        shutdown_tracing()


@main.command()
@click.option("--max-concurrent-tasks", type=int, default=None, help="Slots on this executor.")
@click.option("--pool", default=None, help="The pool of executors to serve.")
@click.pass_context
def executor(ctx: click.Context, max_concurrent_tasks: int | None, pool: str | None) -> None:
    """Run tasks (start as many as you like)."""
    from services.executor import Executor, isolation

    config = _load(
        ctx, **{"executor.max_concurrent_tasks": max_concurrent_tasks, "executor.pool": pool}
    )
    setup_logging(ctx.obj["log_level"], service="executor")
    _warn(config)
    setup_tracing("provisioning-executor", config.tracing)
    registry = _registry(config)
    try:
        nu = resolve_binary(config.nushell.binary)
        check_modules(registry, nu)  # nu runs and every module loads: fail fast otherwise
        task_user = isolation.resolve_task_user(config.executor.task_user)
        state_dir, runtime_dir = isolation.prepare_data_dir(config.data_dir, task_user)
        needs = isolation.task_needs(nu, registry.lib_dirs(), state_dir)
        isolation.check_access(task_user, needs)
    except (ProvisioningError, OSError) as exc:
        raise click.ClickException(getattr(exc, "message", None) or str(exc)) from None
    isolation.warn_readable(task_user, _config_files(ctx))
    isolation.warn_unreachable_tools(task_user)
    adopts = become_subreaper()  # before the runner: it finds task processes accordingly
    watch_children_by_pidfd()
    runner = Runner(
        nu_binary=nu,
        data_dir=config.data_dir,
        extra_env=config.nushell.env_vars,
        kill_grace_s=config.executor.kill_grace_seconds,
        result_limit_bytes=config.executor.result_limit_bytes,
        providers=Providers.from_config(config),  # the environment is captured now, once
        task_user=task_user,
        runtime_dir=runtime_dir,
    )
    # Everything that reads the environment has (the providers' credentials were captured
    # just above): secrets leave it, and /proc/self/environ.
    dropped = isolation.scrub_environment()
    log.info(
        "tasks run as %s, started by %s; %s; %d variables dropped from this process's environment",
        f"{task_user.name} (uid {task_user.uid})" if task_user else "this executor's user",
        runner.launcher,
        "child subreaper" if adopts else "not a child subreaper",
        len(dropped),
    )

    async def body(bus: Bus, stop: asyncio.Event) -> None:
        await Executor(config, bus, registry, runner).run(stop)

    settle_heap()
    try:
        asyncio.run(_with_bus(config, "executor", body))
    finally:
        shutdown_tracing()


@main.command()
@click.option(
    "--nats-port",
    type=int,
    default=4222,
    show_default=True,
    help="Port of the embedded NATS (0: any free port).",
)
@click.option("--port", type=int, default=None, help="Gateway port (default 9090).")
@click.option("--executors", type=int, default=1, show_default=True, help="Executor processes.")
@click.option("--demo", is_flag=True, help="Run the sample server creation once the stack is up.")
@click.option("--nats-url", "up_nats_url", help="Use this running NATS instead of starting one.")
@click.option("--data-dir", "up_data_dir", type=click.Path(file_okay=False), help="Data directory.")
@click.pass_context
def up(
    ctx: click.Context,
    nats_port: int,
    port: int | None,
    executors: int,
    demo: bool,
    up_nats_url: str | None,
    up_data_dir: str | None,
) -> None:
    """The embedded local stack: NATS with JetStream plus every service, until Ctrl-C."""
    from .stack import Stack

    root = ctx.find_root().params
    if up_nats_url:
        root["nats_url"] = up_nats_url
    if up_data_dir:
        root["data_dir"] = up_data_dir
    config = _load(ctx, **{"gateway.port": port})
    setup_logging(ctx.obj["log_level"], service="up")
    _warn(config)
    stack = Stack(
        config,
        data_dir=Path(config.data_dir),
        nats_port=nats_port,
        nats_url=root.get("nats_url"),
        executors=executors,
        config_path=root.get("config"),
    )
    try:
        code = asyncio.run(stack.run(demo=demo))
    except ProvisioningError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(EXIT_STARTUP)
    sys.exit(code)
