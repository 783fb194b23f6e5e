"""CPU per task of every process of the stack during a no-op fan-out, optionally with py-spy.

    .venv/bin/python -m bench.services_cpu [--tasks 10000] [--traced] [--spy DIR]

Starts the benchmark's stack (nats-server, gateway, scheduler, two executors of 10 slots),
warms it up with 500 tasks, then runs one fan-out of ``--tasks`` no-op tasks and prints one
JSON line: the rate, and per process the CPU it used per task (user + system, and system
alone) from ``/proc/<pid>/stat``. CPU per task moves much less than the rate when other work
shares the machine, which makes it the figure to compare a change by.

``--spy DIR`` records each Python service with py-spy (``--format raw``, 200 Hz) into
``DIR/<service>.txt``; py-spy is not a dependency of the project: install it anywhere and put
it on PATH. Its samples include time a process spends waiting for a core, so read them beside
the CPU figures. ``--traced`` exports spans over OTLP/HTTP to a receiver in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from testkit.otlp import Receiver

from .__main__ import _close, _stack, noop_throughput


def _cpu(pid: int) -> tuple[float, float]:
    """(user + system, system) seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, int(fields[12]) / tick


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.services_cpu")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--traced", action="store_true", help="export spans (OTLP/HTTP)")
    parser.add_argument("--spy", type=Path, help="record each service with py-spy into DIR")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    env = {"PROVISIONING_LOG_LEVEL": "WARNING", "PROVISIONING_TRACING_ENABLED": "false"}
    with ExitStack() as stack_of, tempfile.TemporaryDirectory(prefix="prov-cpu-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o711)  # executors run as root run tasks as a user that must pass through
        if args.traced:
            receiver = stack_of.enter_context(Receiver())
            env |= {
                "PROVISIONING_TRACING_ENABLED": "true",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            }
        stack = _stack(tmp, env)
        try:
            pids = {s.name: s.proc.pid for s in stack.services if s.proc is not None}
            assert stack.nats.proc is not None
            pids["nats"] = stack.nats.proc.pid
            noop_throughput(stack, 500, None)  # warm-up
            spies = []
            if args.spy:
                spy = shutil.which("py-spy")
                if spy is None:
                    raise SystemExit("py-spy is not on PATH (pip install py-spy anywhere)")
                args.spy.mkdir(parents=True, exist_ok=True)
                spies = [
                    subprocess.Popen(
                        [
                            *(spy, "record", "-p", str(pid), "-r", "200", "--format", "raw"),
                            *("--nonblocking", "-o", str(args.spy / f"{name}.txt")),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for name, pid in pids.items()
                    if name != "nats"
                ]
                time.sleep(1)
            before = {name: _cpu(pid) for name, pid in pids.items()}
            rate = noop_throughput(stack, args.tasks, None)
            after = {name: _cpu(pid) for name, pid in pids.items()}
            for spy_proc in spies:
                spy_proc.send_signal(signal.SIGINT)
            for spy_proc in spies:
                spy_proc.wait(timeout=60)
        finally:
            _close(stack)
    per_task = {n: round(1e6 * (after[n][0] - before[n][0]) / args.tasks) for n in pids}
    system = {n: round(1e6 * (after[n][1] - before[n][1]) / args.tasks) for n in pids}
    print(
        json.dumps(
            {
                "tasks": args.tasks,
                "traced": args.traced,
                "tasks_per_s": round(rate),
                "cpu_us_per_task": per_task,
                "total_us": sum(per_task.values()),
                "of_which_system_us": system,
                "load_before": load_before,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
