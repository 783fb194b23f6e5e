"""Per-task overhead of the runner: trivial ``nu`` tasks through :class:`core.runner.Runner`
against the same program spawned bare (``subprocess.run``, no supervision).

    .venv/bin/python -m bench.runner_overhead [--tasks 200] [--parallel 1] [--executor]

Prints, per task: wall time, CPU of this process (the runner's share: spawning, pipes,
sweeps), CPU of the children (``nu`` and whatever the runner adds around it), for the runner
and for bare spawns. ``--executor`` sets the runner up as the executor does: a child
subreaper (cheap, exact sweeps) keeping footprints, and as root a task user. Run it on a quiet
machine; two runs side by side say more than one.

``--bench-task`` runs `make bench`'s own Nushell task instead (``server.list``, as the stack
runs it) through the runner at ``--parallel``, against the same bare ``nu`` runs at the same
parallelism that `make bench` compares the whole stack with, and prints both rates and their
ratio: the runner's share of the Nushell figure without the message path around it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.registry import Action, load_registry
from core.runner import Runner, resolve_binary

from .__main__ import bare_nushell

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def _cpu() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _adopts(runner: Runner) -> bool:
    family = getattr(runner, "family", None)  # None: the runner before subreapers (a baseline)
    return bool(family and family.adopts)


def _figures(n: int, wall: float, before: tuple[float, float]) -> dict[str, float]:
    after = _cpu()
    return {
        "wall_ms": round(1000 * wall / n, 2),
        "self_cpu_ms": round(1000 * (after[0] - before[0]) / n, 2),
        "children_cpu_ms": round(1000 * (after[1] - before[1]) / n, 2),
    }


async def _through_runner(
    runner: Runner,
    action: Action,
    args: Callable[[int], dict[str, Any]],
    n: int,
    parallel: int,
) -> dict[str, float]:
    slots = asyncio.Semaphore(parallel)

    async def nothing(*_: Any) -> None:
        return None

    async def one(i: int) -> None:
        async with slots:
            done = await runner.run(
                action,
                args(i),
                task_env={"PROVISIONING_TASK_ID": f"bench.t{i}"},
                timeout_s=60,
                on_line=nothing,
                on_progress=nothing,
            )
            if done.outcome != "completed":
                raise RuntimeError(f"task {i}: {done}")

    if _adopts(runner):  # as the executor does
        asyncio.get_running_loop().add_signal_handler(signal.SIGCHLD, runner.reap_adopted)
    await one(-1)  # warm caches (the binary, the library)
    before, t0 = _cpu(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return _figures(n, time.perf_counter() - t0, before)


def _bare(nu: str, action: Action, n: int, data_dir: Path) -> dict[str, float]:
    env = {
        "PATH": f"{Path(nu).parent}:/usr/bin:/bin",
        "NU_LIB_DIRS": ":".join(action.lib_dirs),
        "HOME": str(data_dir),
        "PROVISIONING_RESULT_FILE": str(data_dir / "r.json"),
    }
    argv = [nu, "-n", "--no-std-lib", "--stdin", "-c", action.script()]
    before, t0 = _cpu(), time.perf_counter()
    for i in range(n):
        subprocess.run(argv, input=json.dumps({"i": i}).encode(), env=env, check=True,
                       capture_output=True)  # fmt: skip
    return _figures(n, time.perf_counter() - t0, before)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.runner_overhead")
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--executor", action="store_true", help="set up as the executor does")
    parser.add_argument(
        "--bench-task",
        action="store_true",
        help="make bench's Nushell task, against bare runs at the same parallelism",
    )
    opts = parser.parse_args()
    nu = resolve_binary("nu")
    with tempfile.TemporaryDirectory(prefix="bench-runner-") as tmp:
        data_dir = Path(tmp) / "data"
        kwargs: dict[str, Any] = {}
        if opts.executor:
            from core.processes import become_subreaper, watch_children_by_pidfd
            from services.executor import isolation

            os.chmod(tmp, 0o711)  # noqa: S103 - the task user passes through, as in /tmp
            kwargs["task_user"] = task_user = isolation.resolve_task_user("")
            _, kwargs["runtime_dir"] = isolation.prepare_data_dir(data_dir, task_user)
            become_subreaper()
            watch_children_by_pidfd()
        runner = Runner(nu_binary=nu, data_dir=data_dir, **kwargs)
        if opts.bench_task:  # make bench's Nushell task, with its arguments
            bare_dir = Path(tmp) / "bare"
            bare_dir.mkdir()
            # bare runs on either side of the runner's, so a drift of the machine evens out
            bare_first = bare_nushell(opts.tasks, opts.parallel, bare_dir)
            through = asyncio.run(
                _through_runner(
                    runner,
                    load_registry().get("server.list"),
                    lambda _: {"infra": "bench"},
                    opts.tasks,
                    opts.parallel,
                )
            )
            bare_per_s = (bare_first + bare_nushell(opts.tasks, opts.parallel, bare_dir)) / 2
            runner_per_s = 1000 / through["wall_ms"]
            print(json.dumps({"tasks": opts.tasks, "parallel": opts.parallel,
                              "executor": opts.executor, "runner_per_s": round(runner_per_s, 1),
                              "bare_per_s": round(bare_per_s, 1),
                              "ratio": round(runner_per_s / bare_per_s, 3)}))  # fmt: skip
            return 0
        probe = load_registry(FIXTURES / "registry.toml", FIXTURES / "nulib").get("probe.echo")
        bare = _bare(nu, probe, opts.tasks, Path(tmp))
        through = asyncio.run(
            _through_runner(runner, probe, lambda i: {"i": i}, opts.tasks, opts.parallel)
        )
    overhead = {k: round(through[k] - bare[k], 2) for k in through}
    print(json.dumps({"tasks": opts.tasks, "parallel": opts.parallel, "executor": opts.executor,
                      "bare": bare, "runner": through, "runner_minus_bare": overhead}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
