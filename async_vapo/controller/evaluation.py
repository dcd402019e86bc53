"""Evaluation rounds: held-out prompts sampled by the rollout workers with evaluation settings.

A round has a number (``Assign.eval_round``, copied by the worker into ``TrajectoryGroup.eval_round``;
0 means training), so its groups never enter the training buffer and never need their uids rewritten.
Every prompt of a round is sent with a fresh ticket to one worker (``issued``); its group must come from
that worker with that ticket (``controller.admission``). A prompt whose worker is gone is sent again to
another (``orphans`` / ``assign``); one that failed is given up (``give_up``), and a round that runs out of
time ends with what came back (the controller logs it as partial): an evaluation never ends a run.
A group of a round that already ended or never existed is counted (``late``) and dropped.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field

import msgspec

from async_vapo.config import Config
from async_vapo.protocol import Prompt, Sampling, TrajectoryGroup

EVAL_TIMEOUT_FLOOR_S = 300.0  # a derived timeout is never shorter (engine start-up, a slow first batch)
EVAL_TIMEOUT_MARGIN = 3.0  # times the round's expected generation time (engines also serve training)
UNMEASURED_TOKENS_PER_S = 200.0  # per engine, before any rate was measured: a slow engine, not a fast one
EVAL_GRACE_S = 60.0  # the learner's own wait beyond a round's timeout (the round ends itself before)


def eval_timeout_s(cfg: Config, n_prompts: int, tokens_per_s: float | None) -> float:
    """How long an evaluation round may take: ``train.eval_timeout_s`` when set, else the round's worst
    case (every sample ``rollout.max_tokens`` long) at ``tokens_per_s`` (the engines' measured generation
    rate; None: ``UNMEASURED_TOKENS_PER_S`` per engine) times ``EVAL_TIMEOUT_MARGIN``, at least
    ``EVAL_TIMEOUT_FLOOR_S``. The measured rate comes from the workers' own counters, so it may shorten the
    timeout but never lengthen it past the unmeasured assumption. The 32B recipe, 8 engines of 2,000 tokens/s each: 30 x 32 x 20,480 tokens
    take about 20 minutes at 16,000 tokens/s, so the round may take an hour."""
    if cfg.train.eval_timeout_s > 0:
        return cfg.train.eval_timeout_s
    rate = max(tokens_per_s or 0.0, UNMEASURED_TOKENS_PER_S * max(1, cfg.rollout.num_workers))
    work = n_prompts * cfg.rollout.eval_samples * cfg.rollout.max_tokens
    return max(EVAL_TIMEOUT_FLOOR_S, EVAL_TIMEOUT_MARGIN * work / rate)


@dataclass
class _Round:
    done: asyncio.Future
    sampling: Sampling
    expected: dict[str, tuple[str, Prompt]] = field(default_factory=dict)  # uid -> (worker, prompt sent)
    groups: list[TrajectoryGroup] = field(default_factory=list)
    given_up: int = 0

    def settle(self) -> None:
        if not self.expected and not self.done.done():
            self.done.set_result(None)


class EvalRounds:
    """Open rounds, owned by the controller's event loop."""

    def __init__(self) -> None:
        self._next = 1
        self._open: dict[int, _Round] = {}
        self.late = 0  # groups of a round no longer open (or never opened): eval_group_unexpected

    def open(self, sampling: Sampling, done: asyncio.Future) -> int:
        """A new, empty round; ``done`` resolves when every prompt assigned to it is back or given up."""
        number = self._next
        self._next += 1
        self._open[number] = _Round(done, sampling)
        return number

    def assign(self, number: int, prompts: list[Prompt], worker_id: str) -> list[Prompt]:
        """Record ``prompts`` as sent to ``worker_id`` in round ``number``; returns them with their
        tickets, as they must be sent."""
        r = self._open[number]
        sent = [msgspec.structs.replace(p, ticket=secrets.token_hex(8)) for p in prompts]
        for p in sent:
            r.expected[p.uid] = (worker_id, p)
        return sent

    def orphans(self, number: int, live: set[str]) -> list[Prompt]:
        """The prompts of round ``number`` still expected from workers no longer in ``live``."""
        r = self._open.get(number)
        if r is None:
            return []
        return [p for w, p in r.expected.values() if w not in live]

    def issued(self, number: int, uid: str) -> tuple[str, Prompt, Sampling] | None:
        """The worker and prompt ``uid`` was sent to in round ``number``, and the round's sampling."""
        r = self._open.get(number)
        entry = r.expected.get(uid) if r is not None else None
        return None if entry is None or r is None else (entry[0], entry[1], r.sampling)

    def collect(self, group: TrajectoryGroup) -> bool:
        """Take a group of an evaluation round; False (and counted) when no open round expects it."""
        r = self._open.get(group.eval_round)
        if r is None or r.expected.pop(group.prompt.uid, None) is None:
            self.late += 1
            return False
        r.groups.append(group)
        r.settle()
        return True

    def give_up(self, number: int, uid: str) -> None:
        """Prompt ``uid`` of round ``number`` will not come back (its worker failed it)."""
        r = self._open.get(number)
        if r is not None and r.expected.pop(uid, None) is not None:
            r.given_up += 1
            r.settle()

    def groups(self, number: int) -> list[TrajectoryGroup]:
        r = self._open.get(number)
        return list(r.groups) if r is not None else []

    def missing(self, number: int) -> int:
        """Prompts of round ``number`` not back: still expected, or given up."""
        r = self._open.get(number)
        return len(r.expected) + r.given_up if r is not None else 0

    def close(self, number: int) -> None:
        self._open.pop(number, None)
