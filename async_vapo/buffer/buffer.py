"""The staleness-aware buffer between the data road and the learner.

Groups come in (``put``), whole groups go out in batches (``take_batch``, Group-Sampling keeps a prompt's
samples together). A group is judged twice: on arrival and again when the learner takes it, since the
learner's version may have moved while it waited. Too stale: counted, its prompt requeued. All rewards
equal and dynamic sampling on: counted as filtered (no learning signal), the prompt is spent; a long
unbroken run of such groups means the policy solves (or fails) every prompt, and stops the run with a
clear error instead of leaving the learner waiting for a batch that never comes.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

from async_vapo.buffer.ledger import PromptLedger, Requeue
from async_vapo.buffer.staleness import StalenessManager
from async_vapo.protocol.messages import TrajectoryGroup

Verdict = Literal["admitted", "stale", "filtered", "duplicate"]


class SamplingStarved(RuntimeError):
    """Dynamic sampling filtered every group for too long: there is nothing left to learn from."""


@dataclass
class BufferMetrics:
    admitted: int = 0
    stale: int = 0
    filtered: int = 0
    duplicate: int = 0
    staleness_hist: Counter[int] = field(default_factory=Counter)


class GroupBuffer:
    def __init__(
        self,
        ledger: PromptLedger,
        staleness: StalenessManager,
        filter_uniform_rewards: bool = False,
        max_groups: int = 1024,
        filter_patience: int = 1000,
    ) -> None:
        self.ledger = ledger
        self.staleness = staleness
        self.filter_uniform_rewards = filter_uniform_rewards
        self.filter_patience = filter_patience
        self.filtered_in_a_row = 0
        self.max_groups = max_groups
        self.queue: deque[TrajectoryGroup] = deque()
        self.metrics = BufferMetrics()

    def __len__(self) -> int:
        return len(self.queue)

    def put(self, group: TrajectoryGroup) -> Verdict:
        uid = group.prompt.uid
        if not self.ledger.returned(uid):
            self.metrics.duplicate += 1
            return "duplicate"
        if not self.staleness.is_fresh(group.oldest_version):
            self._drop_stale(group, was_accepted=False)
            return "stale"
        rewards = {r.reward for r in group.responses}
        if self.filter_uniform_rewards and len(rewards) == 1:
            self.metrics.filtered += 1
            self.ledger.finish(uid, "filtered")
            self.staleness.on_dropped()
            self.filtered_in_a_row += 1
            if self.filter_patience and self.filtered_in_a_row >= self.filter_patience:
                raise SamplingStarved(
                    f"the last {self.filtered_in_a_row} groups all had uniform rewards (every response "
                    f"{rewards.pop()}): the policy solves or fails every prompt, so dynamic sampling "
                    "(train.filter_uniform_rewards) leaves nothing to train on"
                )
            return "filtered"
        if len(self.queue) >= self.max_groups:
            raise OverflowError(
                f"buffer holds {len(self.queue)} groups (limit {self.max_groups}); admission control "
                "should have prevented this"
            )
        self.queue.append(group)
        self.filtered_in_a_row = 0
        self.metrics.admitted += 1
        self.staleness.on_accepted()
        return "admitted"

    def _drop_stale(self, group: TrajectoryGroup, was_accepted: bool) -> None:
        self.metrics.stale += 1
        self.ledger.requeue(group.prompt.uid, Requeue.STALE)
        if was_accepted:
            self.staleness.on_evicted()
        else:
            self.staleness.on_dropped()

    def take_batch(self, n_groups: int) -> list[TrajectoryGroup] | None:
        """``n_groups`` fresh groups, oldest first, or None (nothing taken) if fewer are ready.

        Groups found too stale at this point are requeued and uncounted from ``accepted``.
        """
        kept: deque[TrajectoryGroup] = deque()
        while self.queue:
            g = self.queue.popleft()
            if self.staleness.is_fresh(g.oldest_version):
                kept.append(g)
            else:
                self._drop_stale(g, was_accepted=True)
        self.queue = kept
        if len(self.queue) < n_groups:
            return None
        batch = [self.queue.popleft() for _ in range(n_groups)]
        for g in batch:
            self.metrics.staleness_hist[self.staleness.staleness(g.oldest_version)] += 1
        return batch

    def mark_trained(self, batch: list[TrajectoryGroup]) -> None:
        """The update on ``batch`` is done (and the version bumped): frees admission capacity."""
        for g in batch:
            self.ledger.finish(g.prompt.uid, "trained")
        self.staleness.on_consumed(len(batch))
