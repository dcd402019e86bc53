"""Prompt dispatch as pure functions: who may sample now, and how many prompts each one gets.

The controller calls them every ``dispatch_interval_s`` with the staleness manager's capacity (see
``async_vapo.buffer.staleness``); nothing here touches a socket or a lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from async_vapo.controller.registry import WorkerState


def eligible(
    workers: Iterable[WorkerState], learner_version: int, newest_sent: int | None, max_staleness: int
) -> list[WorkerState]:
    """Workers that may get prompts: weights known, no update running, and at most ``max_staleness``
    versions behind both the learner and the newest weights sent out (``None``: nothing sent yet)."""
    floor = learner_version - max_staleness
    if newest_sent is not None:
        floor = max(floor, newest_sent - max_staleness)
    return [w for w in workers if not w.updating and w.version >= 0 and w.version >= floor]


def share_out(
    capacity: int, worker_ids: Sequence[str], outstanding: Mapping[str, int], max_per_worker: int
) -> list[tuple[str, int]]:
    """Split ``capacity`` prompts over ``worker_ids`` as evenly as possible, the least loaded first (they
    get the remainder), never lifting a worker above ``max_per_worker`` outstanding prompts.

    Returns ``(worker_id, n)`` for every worker with ``n > 0``, least loaded first."""
    if capacity <= 0 or not worker_ids:
        return []
    order = sorted(worker_ids, key=lambda wid: outstanding.get(wid, 0))
    base, extra = divmod(capacity, len(order))
    plan = []
    for i, wid in enumerate(order):
        n = min(base + (1 if i < extra else 0), max_per_worker - outstanding.get(wid, 0))
        if n > 0:
            plan.append((wid, n))
    return plan
