"""The verifier interface. A verifier maps (response text, reference answer) to a ``Verdict``.

Verifiers run inside ``VerifierPool`` worker processes with a hard per-sample timeout, so they may be
slow, hang or raise: the pool turns that into reward ``wrong_reward`` and a counted verdict.
"""

from __future__ import annotations

from typing import Protocol

import msgspec


class Verdict(msgspec.Struct, frozen=True):
    correct: bool
    detail: str  # a protocol.VerdictKind, optionally followed by ": detail"


class Verifier(Protocol):
    name: str

    def __call__(self, response: str, answer: str) -> Verdict: ...


def reward_of(verdict: Verdict, correct_reward: float = 1.0, wrong_reward: float = 0.0) -> float:
    return correct_reward if verdict.correct else wrong_reward
