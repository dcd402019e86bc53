"""Real DeepSpeed (CPU, gloo) through real VAPO steps on the tiny model, in spawned ranks."""

from __future__ import annotations

import json
import math
import multiprocessing as mp

import pytest
import torch

from async_vapo.cluster.ports import free_port
from tests.learner_harness import rank_main
from tests.test_rows import update_metrics_have_fields

pytestmark = pytest.mark.slow


def run(job: dict, world: int, tmp_path, timeout=600) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = free_port()
    job = dict(job, out=str(tmp_path / "result"))
    procs = [ctx.Process(target=rank_main, args=(r, world, port, job)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    return [json.loads((tmp_path / f"result.rank{r}.json").read_text()) for r in range(world)]


def test_vapo_steps_move_parameters_and_fit_a_fixed_batch(tiny_model_dir, tmp_path):
    (out,) = run(
        {"kind": "train", "model_dir": str(tiny_model_dir), "groups": 8, "n": 8, "steps": 10}, 1, tmp_path
    )
    steps = out["steps"]
    assert out["moved"] > 0
    # on a fixed batch the critic fits its targets and the policy's surrogate goes down (10 steps: with a
    # freshly built tiny model 6 steps took the value loss to 0.55x, 9 to 0.35x; it is not monotone)
    assert steps[-1]["value_loss"] < 0.5 * steps[0]["value_loss"]
    assert steps[-1]["policy_loss"] < steps[0]["policy_loss"]
    for key in (
        "entropy",
        "explained_variance",
        "clip_frac_low",
        "clip_frac_high",
        "iw_mean",
        "nll_loss",
        "lambda_clamp_frac",
        "policy_grad_norm",
        "value_grad_norm",
    ):
        assert key in steps[0], key


@pytest.mark.parametrize("stage", [1, 3])
def test_two_ranks_stay_in_sync(tiny_model_dir, tmp_path, stage):
    outs = run(
        {
            "kind": "train",
            "model_dir": str(tiny_model_dir),
            "groups": 4,
            "n": 4,
            "steps": 2,
            "zero_stage": stage,
        },
        2,
        tmp_path,
    )
    assert outs[0]["moved"] > 0
    # the gathered weights are identical on both ranks (ZeRO-3: gathered from the shards)
    assert outs[0]["checksum"] == pytest.approx(outs[1]["checksum"], rel=1e-9)


def test_value_pretraining_raises_explained_variance(tiny_model_dir, tmp_path):
    (out,) = run(
        {"kind": "value_pretrain", "model_dir": str(tiny_model_dir), "groups": 8, "n": 8, "steps": 12},
        1,
        tmp_path,
    )
    ev = [s["explained_variance"] for s in out["steps"]]
    assert ev[-1] > ev[0] + 0.2, ev


RESUMED = {
    "full": {},
    # configs/vapo_qwen2.5_7b_lora.yaml's kind of learner: adapters on both models (and their Adam state)
    "lora": {"zero_stage": 2, "lora": {"rank": 4, "critic_rank": 4, "alpha": 8.0}},
    # configs/vapo_qwen2.5_7b.yaml's: ZeRO-3 with the optimizer (DeepSpeed's CPU Adam) offloaded, its state
    # written and read back by DeepSpeed's offload paths (the parameters' offload trains in test_offload.py)
    "offload": {"zero_stage": 3, "train": {"offload_optimizer": True}},
}


@pytest.mark.parametrize("kind", list(RESUMED))
def test_checkpoint_resume_reproduces_next_step_losses_exactly(tiny_model_dir, tmp_path, kind):
    """Also ``train.save_optimizer=false``: the same step saved as trained weights and LR schedule only
    resumes at the same weights and learning rate (the next step's losses, taken before its update, are
    equal), in a fraction of the files."""
    job = {
        "kind": "resume",
        "model_dir": str(tiny_model_dir),
        "groups": 4,
        "n": 4,
        "ckpt": str(tmp_path / "ckpt"),
        "warmup": 5,  # the schedule is mid-warm-up at the save: its state is visible in the resumed LR
    }
    (out,) = run(job | RESUMED[kind], 1, tmp_path)
    assert out["resumed_step"] == 2
    for a, b in zip(out["uninterrupted"], out["resumed"], strict=True):
        assert a["policy_loss"] == b["policy_loss"]
        assert a["value_loss"] == b["value_loss"]
        assert a["policy_loss"] != 0 and a["value_loss"] > 0
    # weights only: no DeepSpeed state, the trained parameters (LoRA: adapters and the value head)
    full, light = out["full_files"], out["weights_files"]
    assert not any(f.startswith(("policy/", "value/")) for f in light), sorted(light)
    assert {"weights/policy/model.safetensors", "weights/value/model.safetensors"} <= light.keys()
    assert any("optim_states" in f for f in full)
    ds_bytes = sum(n for f, n in full.items() if f.startswith(("policy/", "value/")))
    # fp32 here: 4 bytes a parameter against DeepSpeed's 12 (master weights and Adam's moments) and more
    assert sum(light.values()) < ds_bytes / (10 if kind == "lora" else 2.5), (sum(light.values()), ds_bytes)
    assert out["weights_only_lr"] == out["lr"] and 0 < out["lr"] < 1e-4  # mid-warm-up (peak 1e-4)
    first = out["uninterrupted"][0]
    assert out["weights_only"]["policy_loss"] == first["policy_loss"]
    assert out["weights_only"]["value_loss"] == first["value_loss"]
    assert "model.safetensors" in out["hf_files"] and "tokenizer.json" in out["hf_files"]
    assert out["optimizer"] == ("DeepSpeedCPUAdam" if kind == "offload" else "AdamW")
    assert (out["trained"] < out["total"] / 5) == (kind == "lora")  # adapters only under LoRA


@pytest.mark.parametrize(("world", "stage"), [(1, 1), (2, 3)])
def test_fused_targets_give_the_same_parameters(tiny_model_dir, tmp_path, world, stage):
    """One epoch, one mini-batch: old values and proximal log-probs from the updates' own forwards (no
    separate no-grad pass) give the parameters of the unfused step, two steps in a row."""
    job = {"kind": "fused", "model_dir": str(tiny_model_dir), "groups": 4, "n": 4, "steps": 2}
    outs = run(job | {"zero_stage": stage, "micro": 3}, world, tmp_path)
    for out in outs:
        assert out["moved"] > 1e-4  # training moved the policy
        assert out["max_diff"] < 1e-6, out["max_diff"]
        # the first step is on-policy (0 when the learner reproduces the sampler's log-probs exactly, as
        # the partitioned ZeRO-3 load does); after an update the batch is off-policy
        assert update_metrics_have_fields(out["steps"]) == []  # every fused metric has a row field
        seen = [(s["behaviour_kl"], s["entropy"]) for s in out["steps"]]
        assert all(0 <= kl < 1 and ent > 0 for kl, ent in seen) and all(kl > 0 for kl, _ in seen[1:]), seen


def test_vtrace_critic_targets_train(tiny_model_dir, tmp_path):
    """algo.value_correction=vtrace: the critic's targets use the truncated pi_prox / mu weights; the step
    runs unfused (the weights need pi_prox before the value update) and the critic still fits."""
    job = {"kind": "train", "model_dir": str(tiny_model_dir), "groups": 4, "n": 4, "steps": 4}
    (out,) = run(job | {"algo": {"value_correction": "vtrace", "vtrace_rho_bar": 1.0}}, 1, tmp_path)
    steps = out["steps"]
    assert update_metrics_have_fields(steps) == []  # the unfused update's metrics, V-trace's included
    assert all(0 < s["vtrace_rho_mean"] <= 1.0 for s in steps)
    assert steps[0]["vtrace_rho_mean"] > 0.99  # fresh samples: pi_prox = mu up to numerics
    assert steps[-1]["vtrace_rho_mean"] < steps[0]["vtrace_rho_mean"]  # the policy moved off mu
    assert steps[-1]["value_loss"] < steps[0]["value_loss"]


def _max_diff(a: dict, b: dict) -> float:
    return max(
        float((torch.tensor(x) - torch.tensor(y)).abs().max())
        for key in ("policy", "value")
        for x, y in zip(a[key], b[key], strict=True)
    )


@pytest.mark.parametrize(("world", "stage"), [(1, 1), (2, 2), (2, 3)])
def test_micro_batch_size_does_not_change_the_update(tiny_model_dir, tmp_path, world, stage):
    """Exact micro-batching: the whole mini-batch, a quarter of it, single sequences and packed micro-batches
    cut by a token budget (with and without a chunked LM head) give the same
    parameters (one optimiser step and one scheduler step per mini-batch, whatever the split). Two
    mini-batches per batch and a warm-up make both the step count and the schedule visible."""
    per_mini = 4 * 4 // world // 2  # 4 groups x 4 samples, over the ranks, 2 mini-batches
    micros: list = [per_mini, max(1, per_mini // 4), 1] if world == 1 else [per_mini, 2, 1]
    micros += ["160/0", "70/5"]  # packed by token budget ("tokens/LM-head chunk"; rows of ~20-100 tokens)
    outs = run(
        {
            "kind": "micro",
            "model_dir": str(tiny_model_dir),
            "groups": 4,
            "n": 4,
            "steps": 2,
            "mini_batches": 2,
            "warmup": 3,
            "micros": micros,
            "zero_stage": stage,
        },
        world,
        tmp_path,
    )
    params = outs[0]["params"]
    whole = params[str(micros[0])]
    assert whole["optimizer_steps"] == 4  # 2 steps x 2 mini-batches
    assert whole["lr"] == pytest.approx(1e-4)  # warm-up of 3 optimiser steps is over after 4
    assert _max_diff(whole, outs[0]["initial"]) > 1e-4  # training moved the parameters
    for micro in micros[1:]:
        other = params[str(micro)]
        assert other["optimizer_steps"] == 4 and other["lr"] == whole["lr"]
        # smaller micro-batches sum rows in another order (length-sorted, each at its own width), packed
        # ones also chunk the LM head: float rounding (Adam divides small gradients), same update
        assert _max_diff(whole, other) < 5e-6, micro
    if world == 2:  # ranks agree (ZeRO-3: gathered from the shards)
        assert _max_diff(whole, outs[1]["params"][str(micros[0])]) == 0.0


def test_two_ranks_train_like_one_rank_on_the_union(tiny_model_dir, tmp_path):
    """Global loss denominators, whitening statistics reduced over ranks, and padding passes for the
    rank with fewer sequences (group 0 keeps 2 of its 4 responses): 2 ranks reproduce 1 rank."""
    job = {
        "kind": "micro",
        "model_dir": str(tiny_model_dir),
        "groups": 4,
        "n": 4,
        "steps": 2,
        "micros": [1],
        "keep_responses": {"0": 2},
        "zero_stage": 1,
    }
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (one,) = run(job, 1, tmp_path / "one")
    two = run(job, 2, tmp_path / "two")
    # advantages of the first step: rank r holds groups r, r + 2 of the union (row order kept)
    adv1 = one["steps"][0]["advantages"]
    rows = {0: [0, 1, 6, 7, 8, 9], 1: [2, 3, 4, 5, 10, 11, 12, 13]}
    lengths = one["steps"][0]["lengths"]
    for r, out in enumerate(two):
        got = out["steps"][0]["advantages"]
        for i, row in enumerate(rows[r]):
            n = lengths[row]
            torch.testing.assert_close(
                torch.tensor(got[i][:n]), torch.tensor(adv1[row][:n]), atol=1e-5, rtol=1e-5
            )
    assert _max_diff(one["params"]["1"], two[0]["params"]["1"]) < 1e-5


def recipe_length_update(model_dir, tmp_path, response_tokens: int, packed: str) -> dict:
    """One group with a response cut at ``response_tokens`` and a short one, through a VAPO step under
    the recipe's learner settings (ZeRO-3, packed micro-batches, the LM head in chunks, gradient
    checkpointing: ``packed`` = "tokens/chunk/gc") and under one sequence per pass with none of them. Same
    parameters after the step; length-adaptive GAE at the recipe's alpha 0.05 gives the long row lambda
    1 - 1/(0.05 x response_tokens) and the short one 1 - 1/(0.05 x 40). Returns figures for a report."""
    job = {
        "kind": "micro",
        "model_dir": str(model_dir),
        "response_tokens": response_tokens,
        "steps": 1,
        "micros": [1, packed],
        "zero_stage": 3,
        "algo": {"alpha": 0.05},
        "threads": 2,  # one rank: both cores (attention over the long row dominates)
    }
    (out,) = run(job, 1, tmp_path, timeout=1800)
    plain, recipe = out["params"]["1"], out["params"][packed]
    moved, gap = _max_diff(plain, out["initial"]), _max_diff(plain, recipe)
    assert moved > 1e-5  # the step moved the parameters
    assert gap < 5e-6
    for s in out["steps"]:
        assert s["lengths"] == [response_tokens, 40]
        lam = [1 - 1 / (0.05 * response_tokens), 1 - 1 / (0.05 * 40)]
        assert s["lambda_policy_mean"] == pytest.approx(sum(lam) / 2, abs=1e-6)
        assert all(math.isfinite(x) for x in s["advantages"][0])
    return {"moved": moved, "max_param_gap": gap}


def test_a_long_response_updates_like_single_sequence_passes(tiny_model_dir, tmp_path):
    """The recipe's learner settings on a 4,096-token response: both rows packed into one micro-batch of
    up to 4,608 tokens, the LM head over 1,024 response tokens at a time (the recipe: 22,528 and 4,096 at
    20,480 tokens, ``bench/recipe_length.py --learner``, about three minutes here)."""
    recipe_length_update(tiny_model_dir, tmp_path, 4096, "4608/1024/gc")
