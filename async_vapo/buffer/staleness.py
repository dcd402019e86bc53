"""Admission control for asynchronous rollout, in the spirit of AReaL's staleness manager.

Let ``G`` be the number of groups the learner consumes per policy update (``groups_per_step``),
``eta`` = ``max_staleness``, and count the groups not yet turned into an update: ``running`` (assigned to
samplers, not back), ``accepted - consumed`` (back, queued or being trained on). A group started now is
sampled under the current version ``v`` and trained after every one of those groups, i.e. at version
``v + (accepted - consumed + running) // G`` at the latest. It is within the bound when

    capacity = (eta + 1) * G - (accepted - consumed + running)  >  0

so the learner side hands out at most ``capacity`` new prompts (credits), and at most ``max_concurrent``
in flight. ``consumed`` advances when an update has finished (after the version bump), so with eta = 0
this is synchronous RL: one step's prompts go out, the learner trains, the next step's go out once the
new weights are out. Unlike AReaL's ``(eta + v + 1) * G - (accepted + running)`` it does not assume that
every consumed batch bumps the version (Value-Pretraining consumes batches at version 0).

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
    consumed: int = 0
    running: int = 0

    def capacity(self) -> int:
        pending = self.accepted - self.consumed + self.running
        budget = (self.max_staleness + 1) * self.groups_per_step - pending
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

    def on_consumed(self, n: int = 1) -> None:
        """Accepted groups whose update has finished."""
        self.consumed += n

    def on_evicted(self, n: int = 1) -> None:
        """An accepted group went stale while queued and will not be trained."""
        self.accepted -= n

    def staleness(self, oldest_token_version: int) -> int:
        return self.versions.current_version() - oldest_token_version

    def is_fresh(self, oldest_token_version: int) -> bool:
        return self.staleness(oldest_token_version) <= self.max_staleness
