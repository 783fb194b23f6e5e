"""Logging set-up for services and the CLI: one compact line per record, on stderr."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logging"]


def setup_logging(level: str | None = None, *, service: str = "") -> None:
    name = (level or os.environ.get("PROVISIONING_LOG_LEVEL") or "INFO").upper()
    prefix = f"{service} " if service else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s.%(msecs)03d %(levelname)-7s {prefix}%(name)s: %(message)s", "%H:%M:%S"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, name, logging.INFO))
    for noisy in ("nats", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
