"""Peer baselines, run in their own virtual environment: Celery and Dramatiq on Redis.

The same workloads as the orchestrator's (N no-op tasks; a chain of 40 sleeps of 10 ms) with two
worker processes. Celery keeps results in Redis (as we keep ours in JetStream); Dramatiq keeps
none, so completion is counted with a Redis counter the task increments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["PeerEnv", "redis_server"]

PEER_REQUIREMENTS = ["celery[redis]==5.7.0", "dramatiq[redis]==2.2.1", "redis==8.1.0"]

CELERY_APP = """
import time
from celery import Celery
app = Celery("bench", broker="redis://127.0.0.1:{port}/0", backend="redis://127.0.0.1:{port}/1")
app.conf.update(
    worker_prefetch_multiplier=16, task_acks_late=True, broker_connection_retry_on_startup=True
)

@app.task
def noop():
    return {{}}

@app.task
def sleep(_prev=None, seconds=0.01):
    time.sleep(seconds)
    return {{"slept": seconds}}
"""

CELERY_DRIVER = """
import json, sys, time
from celery import chain
from bench_celery import noop, sleep
n = int(sys.argv[1])
t0 = time.perf_counter()
results = [noop.delay() for _ in range(n)]
for r in results:
    r.get(timeout=600)
noop_s = time.perf_counter() - t0
t0 = time.perf_counter()
chain(*[sleep.s(seconds=0.01) for _ in range(40)]).apply_async().get(timeout=600)
chain_s = time.perf_counter() - t0
print(json.dumps({"noop_s": noop_s, "chain_s": chain_s}))
"""

DRAMATIQ_APP = """
import time, dramatiq, redis
from dramatiq.brokers.redis import RedisBroker
broker = RedisBroker(url="redis://127.0.0.1:{port}/2")
dramatiq.set_broker(broker)
counter = redis.Redis(port={port}, db=3)

@dramatiq.actor(max_retries=0)
def noop():
    counter.incr("done")

@dramatiq.actor(max_retries=0)
def sleep(step, total):
    time.sleep(0.01)
    if step + 1 < total:
        sleep.send(step + 1, total)
    else:
        counter.incr("chain")
"""

DRAMATIQ_DRIVER = """
import json, sys, time
from bench_dramatiq import noop, sleep, counter, broker
n = int(sys.argv[1])
counter.delete("done", "chain")
t0 = time.perf_counter()
for _ in range(n):
    noop.send()
while int(counter.get("done") or 0) < n:
    time.sleep(0.005)
noop_s = time.perf_counter() - t0
t0 = time.perf_counter()
sleep.send(0, 40)
while int(counter.get("chain") or 0) < 1:
    time.sleep(0.002)
chain_s = time.perf_counter() - t0
print(json.dumps({"noop_s": noop_s, "chain_s": chain_s}))
"""


def redis_server() -> str | None:
    """The redis-server binary, installed from the distribution when absent and possible."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing redis-server from the distribution ...", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "redis-server"], check=False, capture_output=True
        )
    return shutil.which("redis-server")


class PeerEnv:
    """A virtual environment with Celery and Dramatiq, and a Redis server on a free port."""

    def __init__(self, root: Path, redis_bin: str, port: int) -> None:
        self.root = root
        self.venv = root / "venv"
        self.redis_bin = redis_bin
        self.port = port
        self.redis: subprocess.Popen[bytes] | None = None

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def install(self) -> None:
        if not (self.venv / "bin" / "celery").exists():
            subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
            subprocess.run(
                [self.python, "-m", "pip", "install", "-q", *PEER_REQUIREMENTS],
                check=True,
                capture_output=True,
            )
        work = self.root / "work"
        work.mkdir(parents=True, exist_ok=True)
        (work / "bench_celery.py").write_text(CELERY_APP.format(port=self.port))
        (work / "bench_dramatiq.py").write_text(DRAMATIQ_APP.format(port=self.port))
        (work / "drive_celery.py").write_text(CELERY_DRIVER)
        (work / "drive_dramatiq.py").write_text(DRAMATIQ_DRIVER)

    def start_redis(self) -> None:
        self.redis = subprocess.Popen(
            [
                self.redis_bin,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)

    def stop(self) -> None:
        if self.redis:
            self.redis.terminate()
            self.redis.wait(10)

    def _run(self, worker: list[str], driver: str, n: int) -> dict[str, Any]:
        work = self.root / "work"
        env = {**os.environ, "PYTHONPATH": str(work)}
        proc = subprocess.Popen(
            worker, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            time.sleep(3)  # workers up
            out = subprocess.run(
                [self.python, driver, str(n)],
                cwd=work,
                env=env,
                check=True,
                capture_output=True,
                text=True,
                timeout=900,
            )
            return dict(json.loads(out.stdout.strip().splitlines()[-1]))
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def celery(self, n: int) -> dict[str, Any]:
        worker = [
            str(self.venv / "bin" / "celery"),
            "-A",
            "bench_celery",
            "worker",
            "-c",
            "2",
            "-P",
            "prefork",
            "--loglevel",
            "WARNING",
        ]
        return self._run(worker, "drive_celery.py", n)

    def dramatiq(self, n: int) -> dict[str, Any]:
        worker = [str(self.venv / "bin" / "dramatiq"), "bench_dramatiq", "-p", "2", "-t", "8"]
        return self._run(worker, "drive_dramatiq.py", n)
