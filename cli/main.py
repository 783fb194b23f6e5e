"""``provisioning``: the user's command line, in the seed's three modes.

Direct mode runs a workflow here, on the same engine as the scheduler and through the same
action runner as the executors; orchestrated mode submits it to the gateway; workflow mode
submits a whole definition. ``--output json`` prints only JSON on stdout; errors are one line
on stderr with a distinct exit code (:mod:`cli.context`). Commands live in ``cli/commands``,
mode selection in :mod:`cli.modes`, rendering in :mod:`cli.render`, the local stack in
:mod:`cli.localstack`.
"""

from __future__ import annotations

import click

from shared import __version__
from shared.config import load_config
from shared.errors import ProvisioningError

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
    ctx.obj = State(cfg)


for command in (server, taskserv, cluster, workflow, batch, task, health, env, version, trace):
    main.add_command(command)
main.add_command(orchestrator)
main.add_command(concurrency)


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script, e.g. `eval "$(provisioning completion bash)"`."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(main, {}, "provisioning", "_PROVISIONING_COMPLETE").source())
