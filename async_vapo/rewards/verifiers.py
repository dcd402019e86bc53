"""Concrete verifiers: math (math-verify, DAPO-style answer extraction) and the built-in addition task.

Math answers are taken from the last ``Answer:`` line when there is one (DAPO's format), else from the last
``\\boxed{}``; both sides are parsed by math-verify and compared symbolically (so ``\\frac{1}{2}`` matches
``0.5``). math-verify's own timeouts use ``signal.alarm`` and only work in a main thread; we disable them
and rely on the pool's hard timeout instead.
"""

from __future__ import annotations

import re

from async_vapo.rewards.base import Verdict
from async_vapo.tasks.arithmetic import extract_answer

_ANSWER_LINE = re.compile(r"Answer\s*:\s*(.+)", re.IGNORECASE)


def extract_math_answer(response: str) -> str | None:
    """DAPO style: the last "Answer: ..." line, else the content of the last \\boxed{...}."""
    lines = _ANSWER_LINE.findall(response)
    if lines:
        return lines[-1].strip().rstrip(".").strip().strip("$").strip()
    start = response.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(response)):
        if response[j] == "{":
            depth += 1
        elif response[j] == "}":
            depth -= 1
            if depth == 0:
                return response[i:j].strip()
    return None


class MathVerifier:
    name = "math"

    def __init__(self) -> None:
        """Imports math-verify and parses once here, at load time, which the pool does not charge to any
        sample: done lazily in the first call, 16 fresh verifier processes importing at once on a busy
        machine timed out their first samples (and each replacement its own first)."""
        from math_verify import parse, verify

        self._parse, self._verify = parse, verify
        verify(parse("$1$", parsing_timeout=None), parse("$1$", parsing_timeout=None), timeout_seconds=None)

    def __call__(self, response: str, answer: str) -> Verdict:
        parse, verify = self._parse, self._verify
        extracted = extract_math_answer(response)
        if extracted is None:
            return Verdict(False, "no_answer")
        gold = parse(f"${answer}$", parsing_timeout=None)
        pred = parse(f"${extracted}$", parsing_timeout=None)
        if not pred:
            return Verdict(False, "no_answer")
        ok = bool(verify(gold, pred, timeout_seconds=None))
        return Verdict(ok, "ok" if ok else "wrong")


class AdditionVerifier:
    name = "addition"

    def __call__(self, response: str, answer: str) -> Verdict:
        got = extract_answer(response)
        if got is None:
            return Verdict(False, "no_answer")
        ok = got.lstrip("0") == answer.lstrip("0")
        return Verdict(ok, "ok" if ok else "wrong")


REGISTRY = {"math": MathVerifier, "addition": AdditionVerifier}
