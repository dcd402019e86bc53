"""Evaluation rounds: held-out prompts sampled by the rollout workers with evaluation settings.

A round has a number (``Assign.eval_round``, copied by the worker into ``TrajectoryGroup.eval_round``;
0 means training), so its groups never enter the training buffer and never need their uids rewritten.
A group of a round that already ended (timed out) or never existed is counted and dropped.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from async_vapo.protocol import TrajectoryGroup


@dataclass
class _Round:
    done: asyncio.Future
    expected: set[str]  # prompt uids not back yet
    groups: list[TrajectoryGroup] = field(default_factory=list)


class EvalRounds:
    """Open rounds, owned by the controller's event loop."""

    def __init__(self) -> None:
        self._next = 1
        self._open: dict[int, _Round] = {}
        self.late = 0  # groups of a round no longer open (or never opened): eval_group_unexpected

    def open(self, uids: list[str], done: asyncio.Future) -> int:
        """A new round over prompts ``uids``; ``done`` gets its groups when all are back."""
        number = self._next
        self._next += 1
        self._open[number] = _Round(done, set(uids))
        if not uids and not done.done():
            done.set_result([])
        return number

    def collect(self, group: TrajectoryGroup) -> bool:
        """Take a group of an evaluation round; False (and counted) when no open round expects it."""
        r = self._open.get(group.eval_round)
        if r is None or group.prompt.uid not in r.expected:
            self.late += 1
            return False
        r.expected.discard(group.prompt.uid)
        r.groups.append(group)
        if not r.expected and not r.done.done():
            r.done.set_result(list(r.groups))
        return True

    def close(self, number: int) -> None:
        self._open.pop(number, None)
