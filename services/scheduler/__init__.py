"""The scheduler: turns workflows into DAGs, dispatches ready tasks, checkpoints every step."""

from .service import Scheduler

__all__ = ["Scheduler"]
