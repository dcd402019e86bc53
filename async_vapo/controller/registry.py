"""Who is connected: one ``WorkerState`` per rollout worker, and the questions asked about them.

Owned by the controller's event loop: only coroutines on that loop change a ``WorkerState``. The main
thread reads copies (``versions``, ``owners``, ``rollout_totals``), never the live objects' fields in
between awaits.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from async_vapo.protocol import Hello, WorkerStats
from async_vapo.weight_sync.broadcast import EngineLink


@dataclass
class WorkerState:
    worker_id: str
    pid: int
    version: int = -1  # weights known to the controller; -1 = unknown, never dispatched to
    last_seen: float = field(default_factory=time.monotonic)
    link: EngineLink | None = None  # the controller's own group with the engine (owner 0)
    updating: bool = False
    stats: WorkerStats | None = None  # the latest heartbeat's counters
    owner: int = 0  # the learner rank that feeds it under a streamed publish; 0 = the controller's link
    tp: int = 1  # vLLM workers of the engine: each one joins the engine's weight group
    store: Any = None  # the store the controller serves for a group owned by another rank
    owner_joined: bool = False
    last_group: float = 0.0  # when its last group (any verdict) arrived: progress, not just heartbeats

    @property
    def can_stream(self) -> bool:
        """Idle, and some learner rank can reach it (the controller's link, or an owner that will join)."""
        return not self.updating and (self.link is not None or self.owner != 0)


@dataclass(frozen=True)
class RolloutTotals:
    """Summed over live workers since each started: engine-busy and alive seconds, generated tokens."""

    busy_s: float = 0.0
    alive_s: float = 0.0
    tokens: int = 0


class WorkerRegistry:
    def __init__(self, fanout_ranks: int = 1, ranks_per_node: int = 0) -> None:
        self._workers: dict[str, WorkerState] = {}
        self.fanout_ranks = fanout_ranks
        self.ranks_per_node = ranks_per_node or fanout_ranks  # learner ranks on each node (0: one node)

    def __iter__(self) -> Iterator[WorkerState]:
        return iter(list(self._workers.values()))  # a copy: callers may drop workers while iterating

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, worker_id: str) -> WorkerState | None:
        return self._workers.get(worker_id)

    def ids(self) -> list[str]:
        return list(self._workers)

    def add(self, hello: Hello) -> tuple[WorkerState, WorkerState | None]:
        """Register the worker of ``hello``; returns it and the state it replaces (a reconnect)."""
        old = self._workers.get(hello.worker_id)
        w = WorkerState(hello.worker_id, hello.pid, owner=self._pick_owner(), tp=hello.tensor_parallel_size)
        self._workers[hello.worker_id] = w
        return w, old

    def remove(self, worker_id: str) -> WorkerState | None:
        return self._workers.pop(worker_id, None)

    def is_current(self, w: WorkerState) -> bool:
        """``w`` is still the registered state of its id (not replaced by a reconnect)."""
        return self._workers.get(w.worker_id) is w

    def _pick_owner(self) -> int:
        """The learner rank with the fewest engines; on ties the first rank of the next node, so that
        engines are fed from every node's network links, not all from node 0's (ranks 0, 8, 16, 24, 1, ...
        with 8 ranks per node)."""
        load = Counter(w.owner for w in self._workers.values())
        per = max(1, self.ranks_per_node)
        return min(range(self.fanout_ranks), key=lambda r: (load[r], r % per, r // per))

    def silent(self, now: float, timeout_s: float) -> list[WorkerState]:
        """Workers whose last message is older than ``timeout_s`` (one in a weight sync is waited for)."""
        return [w for w in self if now - w.last_seen > timeout_s and not w.updating]

    def ready(self) -> list[WorkerState]:
        """Workers with known weights and no update running: evaluation may use them."""
        return [w for w in self if w.version >= 0 and not w.updating]

    def versions(self) -> dict[str, int]:
        return {w.worker_id: w.version for w in self}

    def owners(self) -> dict[str, int]:
        return {w.worker_id: w.owner for w in self}

    def rollout_totals(self) -> RolloutTotals:
        stats = [w.stats for w in self if w.stats is not None]
        return RolloutTotals(
            sum(s.busy_seconds for s in stats),
            sum(s.alive_seconds for s in stats),
            sum(s.generated_tokens for s in stats),
        )
