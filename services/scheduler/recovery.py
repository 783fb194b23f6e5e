"""Rebuilding the engine's memory from checkpoints, and repairing what a crash left half done.

On taking over (and after a step could not be written) the scheduler lists the active
workflows, loads each one's records and hands them to the engine (:meth:`Engine.adopt`), which
puts ready tasks back in their heaps, re-arms retry timers and ends workflows whose tasks have
all ended. A task whose attempt is out with an executor (``queued``, ``running``,
``cancelling``) is checked: if neither its dispatch message is still in ``PROV_DISPATCH`` nor a
report of it waits in ``PROV_REPORTS`` (alone or in an executor's batch), the dispatch was lost
between its checkpoint and its publish, and is sent again (same attempt, same message id: it
cannot be stored twice).
Workflows are loaded ``[scheduler] recovery_batch`` at a time.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from engine import Engine, WorkflowState
from shared import subjects
from shared.bus import DUPLICATE_WINDOW_S
from shared.messages import TERMINAL_WORKFLOW
from shared.store import Store
from shared.streams import Streams

from .flush import Flusher

__all__ = ["REPLAY_S", "Recovery"]

log = logging.getLogger(__name__)

# ends checkpointed this recently are told again on a take-over: well inside the duplicate
# window, so one that was told is not stored twice
REPLAY_S = DUPLICATE_WINDOW_S / 2


class Recovery:
    def __init__(
        self, engine: Engine, store: Store, streams: Streams, flusher: Flusher, *, batch: int
    ) -> None:
        self.engine = engine
        self.store = store
        self.streams = streams
        self.flusher = flusher
        self.batch = max(1, batch)

    async def load(
        self,
        workflow_id: str,
        *,
        active: bool = False,
        lost: list[tuple[str, str]] | None = None,
    ) -> WorkflowState | None:
        """Bring one workflow back from its checkpoints; None if it is unknown or has ended.

        ``active``: listed in the active index (a take-over). Its recent ends are told again
        (:meth:`Engine.replay_ends`): the step that checkpointed them may have died before
        publishing their events. One that has ended is ended again, after them.

        A busy task whose dispatch is gone from JetStream is sent again unless its report
        waits; given ``lost``, those tasks are added to it instead, for the caller to check
        against one read of the reports (:meth:`load_all`)."""
        if (state := self.engine.get(workflow_id)) is not None:
            return state
        found = await self.store.workflow(workflow_id)
        if found is None:
            return None
        record, revision = found
        now = datetime.now(UTC)
        since = now - timedelta(seconds=REPLAY_S)
        ended = record.status in TERMINAL_WORKFLOW
        if ended and not active:
            await self.store.unmark_active(workflow_id)  # ended, but the marker stayed
            return None
        loaded = await self.store.tasks(workflow_id)
        tasks = {task_id: rec for task_id, (rec, _) in loaded.items()}
        if active:
            self.engine.replay_ends(record, tasks, since)
        if ended:
            return None
        busy = self.engine.adopt(record, tasks, now)
        state = self.engine.get(workflow_id)
        if state is None:
            return None
        self.flusher.remember(state, revision, {t: rev for t, (_, rev) in loaded.items()})
        # the dispatches first, then the reports: an executor reports before it acks
        gone = [
            task_id
            for task_id in busy
            if not await self.streams.dispatch_waits(
                state.tasks[task_id].spec.pool, workflow_id, task_id
            )
        ]
        if lost is not None:
            lost.extend((workflow_id, task_id) for task_id in gone)
        elif gone:
            await self._redispatch([(workflow_id, task_id) for task_id in gone], now)
        return state

    async def _redispatch(self, gone: list[tuple[str, str]], now: datetime) -> None:
        """Send again the dispatches that are gone, but not those whose report waits (read
        after the dispatches: an executor reports before it acks)."""
        pending = await self.streams.pending_reports()
        for workflow_id, task_id in gone:
            state = self.engine.get(workflow_id)
            if state is None or subjects.task_key(workflow_id, task_id) in pending:
                continue
            log.info(
                "re-publishing dispatch of %s.%s attempt %d",
                workflow_id,
                task_id,
                state.tasks[task_id].attempt,
            )
            self.engine.redispatch(workflow_id, task_id, now)

    async def load_all(self) -> int:
        """Load the concurrency keys' rate windows, then every active workflow (whose tasks
        say who holds and who waits for each key); returns how many are active."""
        if not self.engine.workflows:
            for state, revision in await self.store.key_states():
                self.engine.restore_key(state)
                self.flusher.key_revisions[state.key] = revision
        ids = [i for i in await self.store.active_ids() if self.engine.get(i) is None]
        lost: list[tuple[str, str]] = []
        for start in range(0, len(ids), self.batch):
            await asyncio.gather(
                *(self.load(i, active=True, lost=lost) for i in ids[start : start + self.batch])
            )
        if lost:  # one read of the reports for them all
            await self._redispatch(lost, datetime.now(UTC))
        return len(self.engine.workflows)
