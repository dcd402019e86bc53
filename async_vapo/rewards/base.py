"""The verifier interface.

A verifier is made by a zero-argument factory (a registry name, or ``module:factory``) and called as
``verifier(response, answer, **context)`` for every sampled response. ``context`` holds what the verifier's
signature asks for (all of it if it takes ``**kwargs``): ``prompt`` (the prompt's text) and the dataset
row's fields named in ``data.extra_fields``. It returns one of:

- a ``bool``: right or wrong; the reward is ``rollout.correct_reward`` / ``rollout.wrong_reward``;
- a number: a graded reward, within the verifier's ``reward_range`` attribute (default ``(0.0, 1.0)``);
  the response counts as correct when it reaches the top of the range;
- a ``Verdict``: ``correct``, ``detail`` (a ``protocol.VerdictKind``, optionally ``": why"``) and an
  optional graded ``reward`` (within ``reward_range``).

Anything else, or a number outside the declared range, is ``bad_output`` (reward: the wrong reward).
Verifiers run inside ``VerifierPool`` worker processes with a hard per-sample timeout, so they may be slow,
hang or raise: the pool turns that into the wrong reward and a counted verdict. Several verifiers
(``data.verifiers``) give the weighted sum of their rewards (``data.verifier_weights``); the first one
decides ``correct``. ``examples/graded_reward.py`` is a complete example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from async_vapo.protocol.messages import verdict_kind

DEFAULT_RANGE = (0.0, 1.0)
SPEC_SEP, WEIGHT_SEP = "|", "@"  # a prompt's ``task``: "name@weight|name@weight" for several verifiers


class Verdict(msgspec.Struct, frozen=True):
    correct: bool
    detail: str  # a protocol.VerdictKind, optionally followed by ": detail"
    reward: float | None = None  # a graded reward (within the verifier's reward_range); None: binary


class Verifier(Protocol):
    name: str

    def __call__(self, response: str, answer: str) -> Verdict | bool | float: ...


def reward_of(verdict: Verdict, correct_reward: float = 1.0, wrong_reward: float = 0.0) -> float:
    if verdict.reward is not None:
        return verdict.reward
    return correct_reward if verdict.correct else wrong_reward


def declared_range(verifier: Any) -> tuple[float, float]:
    """The ``reward_range`` a verifier declares for its graded rewards (``DEFAULT_RANGE`` if none)."""
    lo, hi = getattr(verifier, "reward_range", DEFAULT_RANGE)
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"reward_range {(lo, hi)} is not a finite interval lo < hi")
    return lo, hi


def normalise(out: Any, reward_range: tuple[float, float]) -> Verdict:
    """What a verifier returned, as a ``Verdict`` (``bad_output`` for anything outside the interface)."""
    lo, hi = reward_range
    if isinstance(out, Verdict):
        if out.reward is not None and not (math.isfinite(out.reward) and lo <= out.reward <= hi):
            return Verdict(False, "bad_output")
        return out
    if isinstance(out, bool):
        return Verdict(out, "ok" if out else "wrong")
    if isinstance(out, (int, float)) and math.isfinite(out) and lo <= out <= hi:
        return Verdict(out >= hi, "ok" if out >= hi else "wrong", float(out))
    return Verdict(False, "bad_output")


@dataclass(frozen=True)
class Scoring:
    """The verifiers of a prompt (its wire ``task``: one name, or ``name@weight|...``) and their weights."""

    names: tuple[str, ...]
    weights: tuple[float, ...]

    @staticmethod
    def parse(task: str) -> Scoring:
        names, weights = [], []
        for part in task.split(SPEC_SEP):
            name, _, w = part.partition(WEIGHT_SEP)
            names.append(name)
            weights.append(float(w) if w else 1.0)
        return Scoring(tuple(names), tuple(weights))

    @staticmethod
    def spec(names: list[str], weights: list[float]) -> str:
        """The wire ``task`` of ``names`` weighted by ``weights`` (one unweighted name stays as it is)."""
        if len(names) == 1 and (not weights or weights[0] == 1.0):
            return names[0]
        return SPEC_SEP.join(f"{n}{WEIGHT_SEP}{w!r}" for n, w in zip(names, weights, strict=True))

    def combine(self, verdicts: list[Verdict], correct_reward: float, wrong_reward: float) -> Verdict:
        """One verdict per verifier -> the response's: the weighted sum of rewards, ``correct`` from the
        first, the detail of the first that failed to give an answer (timeout, error, bad output), so it
        is counted."""
        if len(verdicts) == 1 and self.weights == (1.0,):
            return verdicts[0]
        total = sum(
            w * reward_of(v, correct_reward, wrong_reward)
            for w, v in zip(self.weights, verdicts, strict=True)
        )
        broken = [v for v in verdicts if verdict_kind(v.detail) not in ("ok", "wrong", "no_answer")]
        return Verdict(verdicts[0].correct, (broken or verdicts)[0].detail, total)
