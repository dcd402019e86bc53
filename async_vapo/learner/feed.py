"""Rank 0's batches, shared with the other learner ranks.

Only rank 0 runs the controller, so only rank 0 knows when a batch is ready. While it waits, it tells every
rank once a second what comes next (``Command``), so that no rank sits in a collective longer than that
however long the data takes: a batch (each rank then receives its share of the groups), a streamed publish
for engines that hold no current weights (a collective, so every rank must take part), a stop, or nothing
yet. A stop is raised on every rank as ``StopRun``; each rank then checkpoints, and rank 0 re-raises the
controller's failure if that was the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import Any

import structlog
import torch
import torch.distributed as dist

from async_vapo.learner.batch import Batch, collate, recv_batch, send_batch

log = structlog.get_logger(__name__)
POLL_S = 1.0  # rank 0 waits this long for a batch between two commands


class Command(IntEnum):
    """What rank 0 tells the other learner ranks while it waits for data."""

    WAIT = 0
    BATCH = 1
    PUBLISH = 2
    STOP = 3


class StopRun(Exception):
    """Every rank stops at the same command: a stop was requested (SIGTERM, SIGINT) or the controller
    failed (``RankFeed.failure``)."""


def share(value: int, world: int, device: torch.device) -> int:
    """Rank 0's ``value``, on every rank (a broadcast; ``world`` 1: the value itself)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.broadcast(t, 0)
    return int(t.item())


class RankFeed:
    """One learner rank's end of the feed. ``controller``: rank 0's (None on the others); ``pad_id``: the
    tokenizer's padding id; ``engines_behind``: whether a streamed publish is due for engines without
    current weights (rank 0; always False for a snapshot publish, which joining engines are sent whole)."""

    def __init__(
        self,
        rank: int,
        world: int,
        device: torch.device,
        controller: Any | None,
        groups_per_step: int,
        pad_id: int,
    ) -> None:
        self.rank, self.world, self.device = rank, world, device
        self.controller, self.groups_per_step, self.pad_id = controller, groups_per_step, pad_id
        self.stop_requested = False  # set by the signal handlers: rank 0 turns it into a STOP
        self.failure: BaseException | None = (
            None  # the controller failed: every rank saves, then it is raised
        )

    def share(self, value: int) -> int:
        return share(value, self.world, self.device)

    def next_batch(
        self, publish: Callable[[], None], engines_behind: Callable[[], bool]
    ) -> tuple[Batch, list[Any]]:
        """This rank's share of the next batch and, on rank 0, the groups it was made of. Group i goes to
        rank i % world; each share is padded to its own longest row. Raises ``StopRun``."""
        got: list[Any] | None = None
        while True:
            cmd, got = self._poll(engines_behind) if self.rank == 0 else (Command.WAIT, None)
            cmd = Command(self.share(cmd))
            if cmd == Command.STOP:
                raise StopRun
            if cmd == Command.PUBLISH:
                publish()
            if cmd == Command.BATCH:
                break
        if self.rank != 0:
            return recv_batch(self.device), []
        assert got is not None
        shares = [collate(got[r :: self.world], self.pad_id) for r in range(self.world)]
        for r in range(1, self.world):
            send_batch(shares[r], r, self.device)
        return shares[0].to(self.device), got

    def _poll(self, engines_behind: Callable[[], bool]) -> tuple[Command, list[Any] | None]:
        assert self.controller is not None
        try:
            got = self.controller.take_batch(self.groups_per_step, timeout_s=POLL_S)
        except RuntimeError as exc:  # the controller failed (e.g. dynamic sampling starved): stop everyone
            self.failure = exc
            log.error(
                "the controller failed; checkpointing before the run ends", error=repr(exc.__cause__ or exc)
            )
            return Command.STOP, None
        if got is not None:
            return Command.BATCH, got
        if self.stop_requested:
            return Command.STOP, None
        if engines_behind():
            return Command.PUBLISH, None
        return Command.WAIT, None
