"""The executor: pulls task attempts from a pool's durable consumer and runs them."""

from .executor import Executor

__all__ = ["Executor"]
