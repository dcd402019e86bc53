"""``python -m async_vapo.eval``: the README's evaluation command, run as a user runs it (real vLLM), here
with a run's config: its held-out prompts, sampling and lengths, and every sample written out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml


def test_eval_with_a_runs_config_reports_avg_pass_by_digits_and_writes_every_sample(tiny_model_dir, tmp_path):
    run_cfg = tmp_path / "config.yaml"
    run_cfg.write_text(
        yaml.safe_dump({"data": {"n_eval": 40}, "rollout": {"eval_samples": 3, "eval_temperature": 1.0,
                                                            "eval_top_p": 0.9, "max_tokens": 90}})
    )  # fmt: skip
    samples = tmp_path / "samples.jsonl"
    args = ["--model", str(tiny_model_dir), "--config", str(run_cfg), "--output", str(samples)]
    res = subprocess.run(
        [sys.executable, "-m", "async_vapo.eval", *args],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["problems"] == 40 and out["k"] == 3  # the run's n_eval and eval_samples
    assert out["sampling"] == {"temperature": 1.0, "top_p": 0.9, "max_tokens": 90, "max_model_len": 256}
    assert sum(out["verifier_outcomes"].values()) == 120  # every sample scored, none lost
    assert 0 < out["avg@3"] <= out["pass@3"] <= 1  # the warm-started model solves some, not all
    digits = {int(d): v for d, v in out["avg@3_by_digits"].items()}
    assert set(digits) <= set(range(1, 8)) and sum(v["problems"] for v in digits.values()) == 40
    weighted = sum(v["problems"] * v["accuracy"] for v in digits.values()) / 40
    assert weighted == pytest.approx(out["avg@3"], abs=1e-3)  # the breakdown partitions the same samples
    assert digits[min(digits)]["accuracy"] > digits[max(digits)]["accuracy"]  # fewer digits are easier
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 120 and {r["sample"] for r in rows} == {0, 1, 2}
    assert sum(r["correct"] for r in rows) / 120 == pytest.approx(out["avg@3"])
    assert all(r["reward"] == (1.0 if r["correct"] else 0.0) and r["prompt"].endswith("=") for r in rows)
