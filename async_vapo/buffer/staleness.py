"""Admission control for asynchronous rollout, in the spirit of AReaL's staleness manager.

Let ``G`` be the number of groups the learner consumes per policy version (``groups_per_step``),
``v`` the learner's current version, ``eta`` = ``max_staleness``, ``accepted`` the groups that came back
and were kept and ``running`` the groups assigned to samplers but not yet back. A group started now is
sampled under version >= v and, in the worst case, trained once ``accepted / G`` versions have passed. It
stays within the bound as long as

    capacity = (eta + v + 1) * G - (accepted + running)  >  0

so the learner side hands out at most ``capacity`` new prompts (credits), and at most
``max_concurrent`` in flight. With eta = 0 this is synchronous RL: one step's prompts go out, the learner
trains on them, the next step's go out after the new version.

The version source is injected (a ``Protocol``), so tests drive it with a fake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class VersionSource(Protocol):
    def current_version(self) -> int: ...


@dataclass
class StalenessManager:
    groups_per_step: int
    max_staleness: int
    versions: VersionSource
    max_concurrent: int | None = None
    accepted: int = 0
    running: int = 0

    def capacity(self) -> int:
        v = self.versions.current_version()
        budget = (self.max_staleness + v + 1) * self.groups_per_step - (self.accepted + self.running)
        if self.max_concurrent is not None:
            budget = min(budget, self.max_concurrent - self.running)
        return max(0, budget)

    def on_started(self, n: int = 1) -> None:
        self.running += n

    def on_accepted(self, n: int = 1) -> None:
        self.running -= n
        self.accepted += n

    def on_dropped(self, n: int = 1) -> None:
        """A started group that will not be trained (stale, filtered, lost): frees its slot."""
        self.running -= n

    def on_evicted(self, n: int = 1) -> None:
        """An accepted group went stale while queued and will not be trained."""
        self.accepted -= n

    def staleness(self, oldest_token_version: int) -> int:
        return self.versions.current_version() - oldest_token_version

    def is_fresh(self, oldest_token_version: int) -> bool:
        return self.staleness(oldest_token_version) <= self.max_staleness
