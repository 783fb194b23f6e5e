"""The gateway: the stateless HTTP API (aiohttp) in front of JetStream."""

from .app import create_app

__all__ = ["create_app"]
