"""``python -m async_vapo.eval``: the README's evaluation command, run as a user runs it (real vLLM)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_eval_on_the_built_in_task_reports_avg_pass_and_accuracy_by_digits(tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--data", "addition", "--k", "3", "--n-addition", "40"]
    res = subprocess.run(
        [sys.executable, "-m", "async_vapo.eval", *args],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["problems"] == 40 and out["k"] == 3
    assert sum(out["verifier_outcomes"].values()) == 120  # every sample scored, none lost
    assert 0 < out["avg@3"] <= out["pass@3"] <= 1  # the warm-started model solves some, not all
    digits = {int(d): v for d, v in out["avg@3_by_digits"].items()}
    assert set(digits) <= set(range(1, 8)) and sum(v["problems"] for v in digits.values()) == 40
    weighted = sum(v["problems"] * v["accuracy"] for v in digits.values()) / 40
    assert weighted == pytest.approx(out["avg@3"], abs=1e-3)  # the breakdown partitions the same samples
    assert digits[min(digits)]["accuracy"] > digits[max(digits)]["accuracy"]  # fewer digits are easier
