"""Rewards from verifiers, run in a process pool with hard timeouts."""

from async_vapo.rewards.base import Verdict, Verifier, reward_of
from async_vapo.rewards.pool import VerifierPool
from async_vapo.rewards.verifiers import AdditionVerifier, MathVerifier, extract_math_answer

__all__ = [
    "AdditionVerifier",
    "MathVerifier",
    "Verdict",
    "Verifier",
    "VerifierPool",
    "extract_math_answer",
    "reward_of",
]
