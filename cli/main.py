"""``provisioning``: the user's command line, in the seed's three modes.

Direct mode runs a workflow here, on the same engine as the scheduler and through the same
action runner as the executors; orchestrated mode submits it to the gateway; workflow mode
submits a whole definition. ``--output json`` prints only JSON on stdout; errors are one line
on stderr with a distinct exit code (:mod:`cli.context`). Commands live in ``cli/commands``,
mode selection in :mod:`cli.modes`, rendering in :mod:`cli.render`, the local stack in
:mod:`cli.localstack`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import click

from shared import __version__
from shared.config import Config, load_config
from shared.errors import ProvisioningError
from shared.localstack import read_stack_state

from .commands.resources import cluster, server, taskserv
from .commands.system import concurrency, env, health, orchestrator, trace, version
from .commands.workflows import batch, task, workflow
from .context import EXIT_CONFIG, State, fail

__all__ = ["main"]


@click.group()
@click.option("--config", type=click.Path(dir_okay=False), help="User configuration file.")
@click.option("--endpoint", help="Orchestrator URL (default [orchestrator] endpoint).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data directory.")
@click.version_option(__version__, prog_name="provisioning", message="%(prog)s %(version)s")
@click.pass_context
def main(
    ctx: click.Context, config: str | None, endpoint: str | None, data_dir: str | None
) -> None:
    """Provision servers, task services and clusters: directly, or through the orchestrator."""
    try:
        cfg = load_config(
            config, overrides={"orchestrator.endpoint": endpoint, "orchestrator.data_dir": data_dir}
        )
    except ProvisioningError as exc:
        fail(exc.message, EXIT_CONFIG)
    for warning in cfg.warnings:
        click.echo(f"warning: {warning}", err=True)
    _join_local_stack(cfg)
    ctx.obj = State(cfg)


def _same_endpoint(a: str, b: str) -> bool:
    local = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
    ua, ub = urlsplit(a), urlsplit(b)
    hosts_match = ua.hostname == ub.hostname or {ua.hostname, ub.hostname} <= local
    return hosts_match and ua.port == ub.port


def _join_local_stack(config: Config) -> None:
    """One world: left at its defaults, the CLI uses the data and infra directories of the
    local stack (``up``) that answers at its endpoint."""
    state = read_stack_state()
    if state is None or not _same_endpoint(state["endpoint"], config.orchestrator.endpoint):
        return
    origin = f"the local stack (pid {state['pid']})"
    if config.sources.get("orchestrator.data_dir") == "default":
        config.orchestrator.data_dir = state["data_dir"]
        config.sources["orchestrator.data_dir"] = origin
    if config.sources.get("orchestrator.infra_dir") == "default" and state.get("infra_dir"):
        config.orchestrator.infra_dir = state["infra_dir"]
        config.sources["orchestrator.infra_dir"] = origin


@click.command(name="help")
@click.argument("command", nargs=-1)
@click.pass_context
def help_command(ctx: click.Context, command: tuple[str, ...]) -> None:
    """Help on the CLI, or on one command: `provisioning help workflow submit`."""
    target: click.Command = main
    sub_ctx = ctx.parent or ctx
    for name in command:
        if not isinstance(target, click.Group) or (found := target.get_command(ctx, name)) is None:
            raise click.UsageError(f"no command {' '.join(command)!r}")
        sub_ctx = click.Context(found, info_name=name, parent=sub_ctx)
        target = found
    click.echo(target.get_help(sub_ctx))


for command in (server, taskserv, cluster, workflow, batch, task, health, env, version, trace):
    main.add_command(command)
main.add_command(orchestrator)
main.add_command(concurrency)
main.add_command(help_command)


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script, e.g. `eval "$(provisioning completion bash)"`."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(main, {}, "provisioning", "_PROVISIONING_COMPLETE").source())
