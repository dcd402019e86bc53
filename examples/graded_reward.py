"""A graded reward for your own task: partial credit, the prompt and the row's fields as keyword arguments.

Use it (from the repository root, or with this directory on PYTHONPATH) with

    python -m async_vapo.launch data.task=math data.train_file=my_rows.jsonl \\
        data.prompt_field=question data.answer_field=answer data.extra_fields=[unit] \\
        'data.verifiers=[examples.graded_reward:make, math]' 'data.verifier_weights=[0.7, 0.3]'

The factory (``make``) is called once in every verifier process; the object it returns is called for every
sampled response. Its first two arguments are the response text and the row's answer; any of ``prompt``
(the prompt's text) and the fields named in ``data.extra_fields`` that its signature names are passed as
keyword arguments (``**kwargs`` takes them all). It may return a ``bool`` (right / wrong: the run's
``rollout.correct_reward`` / ``wrong_reward``), a number within ``reward_range`` (a graded reward; the
response counts as correct when it reaches the top of the range) or an ``async_vapo.rewards.Verdict``.
Anything else, an exception or a hang past ``rollout.verifier_timeout_s`` gives the wrong reward and is
counted (``controller_counters`` in ``metrics.jsonl``); the launcher refuses to start when the factory
cannot be imported or its ``reward_range`` is not an interval. The learner refuses any reward outside the
declared ranges (``group_rejected_reward``).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class NumericCloseness:
    """Full marks for the exact answer, partial credit for a near miss, a small bonus for naming the unit
    the row asks for."""

    name = "numeric_closeness"
    reward_range = (0.0, 1.0)

    def __call__(self, response: str, answer: str, prompt: str = "", unit: str | None = None) -> float:
        numbers = _NUMBER.findall(response)
        if not numbers:
            return 0.0
        got, want = float(numbers[-1]), float(answer)
        if got == want:
            return 1.0
        closeness = max(0.0, 1.0 - abs(got - want) / max(1.0, abs(want)))
        bonus = 0.1 if unit and unit in response else 0.0
        return min(0.9, 0.8 * closeness + bonus)  # a miss never earns full marks


def make() -> NumericCloseness:
    return NumericCloseness()
