"""The workflow engine: every rule of a workflow's life as plain code, with no I/O.

The scheduler service (``services/scheduler``) feeds it the inputs that arrive over JetStream and
performs the effects it returns; direct mode (:mod:`engine.local`) runs the same engine in
memory, so the two modes agree by construction.
"""

from .effects import Effects, Timer
from .engine import ClaimsFor, Engine, Verdict
from .state import WorkflowState

__all__ = ["ClaimsFor", "Effects", "Engine", "Timer", "Verdict", "WorkflowState"]
