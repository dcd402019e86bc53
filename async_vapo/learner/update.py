"""The VAPO updates of one batch: mini-batch updates of the policy (clip-higher, token-level, decoupled
off-policy, + mu * positive-example NLL) and of the value model (clipped value loss), on the skeleton
``run_update`` shares between them (``learner/schedule.py`` says how a batch becomes optimiser steps).

Gradient accounting: every loss is a global token (or sequence) mean over the whole mini-batch, however it
is split into micro-batches and data-parallel ranks: each micro-batch loss is divided by the global count
(summed across ranks) and multiplied by the world size because DeepSpeed averages gradients over ranks.
DeepSpeed's accumulation boundary is driven explicitly, so how a mini-batch is cut into micro-batches
never changes the update.

Fused (``train.fused_targets``, one epoch and one mini-batch): the constants ``learner/targets.py``
computes in a separate no-grad sweep are taken from the updates' own forwards instead (``OwnForwards``),
with the same parameters as a result (``tests/test_learner.py``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from async_vapo import algo, distributed
from async_vapo.config import AlgoConfig
from async_vapo.learner.batch import Batch
from async_vapo.learner.forward import policy_forward, value_forward
from async_vapo.learner.schedule import (
    SEEDS_PER_STEP,
    VALUE_SHUFFLE_OFFSET,
    UpdateSchedule,
    length_order,
    rank_slices,
    split_mini_batches,
)
from async_vapo.learner.targets import Targets, advantages, behaviour_kl, critic_targets, lambda_metrics


@dataclass
class PolicyTargets:
    """The policy update's constants: advantages and loss mask [B, T]; ``prox_logprobs`` [B, T], or None
    to take them from the update's own forward (fused)."""

    advantages: torch.Tensor
    loss_mask: torch.Tensor
    prox_logprobs: torch.Tensor | None


@dataclass
class OwnForwards:
    """What a fused update's own forwards gave, detached, before the parameters moved: row-aligned with the
    batch, [B, T] each (None: not taken)."""

    old_values: torch.Tensor | None = None
    prox_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


# A micro-batch loss: (rows of the batch, micro-batch) -> (loss already divided by the global count,
# logged loss parts, per-micro metrics). ``prepare`` builds one for a mini-batch (global counts).
MicroLoss = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]]


def run_update(
    engine: Any, b: Batch, sched: UpdateSchedule, prepare: Callable[[torch.Tensor, Batch], MicroLoss]
) -> dict[str, list[float]]:
    """The epoch / mini-batch / micro-batch skeleton shared by the policy and the value update: one
    optimiser step per mini-batch, whatever ``micro_batch_size`` is."""
    acc: dict[str, list[float]] = defaultdict(list)
    world = distributed.world_size()
    device = b.input_ids.device
    for epoch in range(sched.epochs):
        for rows in split_mini_batches(
            b.group_ids, sched.mini_batches, sched.seed * SEEDS_PER_STEP + sched.shuffle_offset + epoch
        ):
            rows = rows[length_order(b.attention_mask[rows].sum(1), sched.micro)]
            mb = b.select(rows)
            loss_of = prepare(rows, mb)
            slices = rank_slices(mb, sched.micro)
            parts: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
            for i, sl in enumerate(slices):
                engine.set_gradient_accumulation_boundary(i == len(slices) - 1)
                sub = rows[sl] if sl is not None else rows[:1]
                loss, logged, m = loss_of(sub, b.select(sub))
                weight = 1.0 if sl is not None else 0.0  # padding pass: same collectives, no gradient
                engine.backward(loss * (weight * world), scale_wrt_gas=False)
                if sl is None:
                    continue
                for k, v in logged.items():
                    parts[k] = parts[k] + v.detach()
                for k, v in m.items():
                    acc[k].append(float(v))
            engine.step()
            if parts:  # each rank holds its share of the global mean: the sum is the mini-batch's loss
                names = sorted(parts)
                totals = distributed.all_sum(torch.stack([parts[k].float() for k in names]))
                for k, v in zip(names, totals.tolist(), strict=True):
                    acc[k].append(v)
            gn = engine.get_global_grad_norm()
            if gn is not None:
                acc["grad_norm"].append(float(gn))
    return acc


def _summary(acc: dict[str, list[float]], grad_norm_key: str) -> dict[str, float]:
    out = {k: (max(v) if k.endswith("_max") else sum(v) / len(v)) for k, v in acc.items() if v}
    if "grad_norm" in out:
        out[grad_norm_key] = out.pop("grad_norm")
    return out


def _policy_pass(
    engine: Any,
    b: Batch,
    t: PolicyTargets,
    cfg: AlgoConfig,
    temperature: float,
    sched: UpdateSchedule,
    own: OwnForwards | None = None,
) -> dict[str, float]:
    fused = t.prox_logprobs is None
    if fused and (own is None or own.prox_logprobs is None or own.entropy is None):
        raise ValueError("a fused policy update needs OwnForwards with room for prox_logprobs and entropy")

    def prepare(rows: torch.Tensor, mb: Batch) -> MicroLoss:
        mask = t.loss_mask[rows]
        pos = mask & mb.correct.unsqueeze(1)
        counts = distributed.all_sum(
            torch.stack([mask.sum(), torch.tensor(mb.size, device=mask.device), pos.sum()]).float()
        )
        n_tok, n_seq, n_pos = counts.unbind()
        denom = n_tok if cfg.loss_agg == "token" else n_seq

        def loss_of(sub: torch.Tensor, ub: Batch):
            logp, ent = policy_forward(engine, ub, temperature, sched.micro, with_entropy=fused)
            if t.prox_logprobs is None:
                prox_own = logp.detach()
                assert own is not None and own.prox_logprobs is not None and own.entropy is not None
                assert ent is not None
                own.prox_logprobs[sub], own.entropy[sub] = prox_own, ent
            else:
                prox_own = t.prox_logprobs[sub]
            umask = t.loss_mask[sub]
            behaviour = ub.behaviour_logprobs if cfg.decoupled else None
            prox = prox_own if cfg.decoupled else ub.behaviour_logprobs
            pg_loss, m = algo.policy_loss(
                logp,
                prox,
                t.advantages[sub],
                umask,
                eps_low=cfg.eps_low,
                eps_high=cfg.eps_high,
                behaviour_logprobs=behaviour,
                iw_cap=cfg.iw_cap,
                agg=cfg.loss_agg,
                denominator=denom,
            )
            nll = algo.positive_nll_loss(logp, umask, ub.correct, n_pos) if cfg.nll_coef > 0 else pg_loss * 0
            return pg_loss + cfg.nll_coef * nll, {"policy_loss": pg_loss, "nll_loss": nll}, m

        return loss_of

    return _summary(run_update(engine, b, sched, prepare), "policy_grad_norm")


def _value_pass(
    engine: Any,
    b: Batch,
    fixed: tuple[torch.Tensor, torch.Tensor] | None,
    cfg: AlgoConfig,
    sched: UpdateSchedule,
    own: OwnForwards | None = None,
) -> dict[str, float]:
    """``fixed``: (old values, critic targets) [B, T] each; None (fused): the old values are this pass's
    forward, detached, the targets are built from them row by row (``critic_targets``), and the old
    values go to ``own.old_values``."""
    if fixed is None and (own is None or own.old_values is None):
        raise ValueError("a fused value update needs OwnForwards with room for old_values")

    def prepare(rows: torch.Tensor, mb: Batch) -> MicroLoss:
        n_tok = distributed.all_sum(mb.mask.sum().to(torch.float32))

        def loss_of(sub: torch.Tensor, ub: Batch):
            values = value_forward(engine, ub, sched.micro)
            if fixed is None:
                old = values.detach()
                returns = critic_targets(ub, old, cfg)
                assert own is not None and own.old_values is not None
                own.old_values[sub] = old
            else:
                old, returns = fixed[0][sub], fixed[1][sub]
            vl, clip_frac = algo.value_loss(
                values, old, returns, ub.mask, clip_range=cfg.value_clip, denominator=n_tok
            )
            return vl, {"value_loss": vl}, {"value_clip_frac": clip_frac}

        return loss_of

    # the critic's mini-batches are shuffled independently of the policy's
    return _summary(
        run_update(engine, b, replace(sched, shuffle_offset=VALUE_SHUFFLE_OFFSET), prepare), "value_grad_norm"
    )


def policy_update(
    engine: Any, b: Batch, t: Targets, cfg: AlgoConfig, temperature: float, sched: UpdateSchedule
) -> dict[str, float]:
    """The policy's mini-batch updates on ``b`` with the batch's precomputed targets."""
    return _policy_pass(
        engine, b, PolicyTargets(t.advantages, t.loss_mask, t.prox_logprobs), cfg, temperature, sched
    )


def value_update(
    engine: Any, b: Batch, t: Targets, cfg: AlgoConfig, sched: UpdateSchedule
) -> dict[str, float]:
    """The critic's mini-batch updates on ``b`` towards the batch's precomputed targets."""
    if t.old_values is None:
        raise ValueError("the targets were computed without a critic (algo.estimator=group_norm)")
    return _value_pass(engine, b, (t.old_values, t.returns), cfg, sched)


def can_fuse(sched: UpdateSchedule, cfg: AlgoConfig) -> bool:
    """One pass over one mini-batch: the update's first forward is the targets' forward (V-trace
    targets need the proximal log-probs before the value update: not fused)."""
    return sched.epochs == 1 and sched.mini_batches == 1 and cfg.value_correction == "none"


def fused_update(
    policy: Any, value_model: Any | None, b: Batch, cfg: AlgoConfig, temperature: float, sched: UpdateSchedule
) -> dict[str, float]:
    """``compute_targets`` + ``value_update`` + ``policy_update`` without the separate no-grad forwards
    (``can_fuse`` schedules only): the value update's forward gives the old values (and, row by row, the
    critic's targets), then the advantages are built from them, then the policy update's forward gives
    the proximal log-probs. Same parameters as the unfused sequence (``tests/test_learner.py``)."""
    if not can_fuse(sched, cfg):
        raise ValueError("fused targets need one epoch, one mini-batch and algo.value_correction=none")
    shape, device = b.mask.shape, b.mask.device
    own = OwnForwards(
        prox_logprobs=torch.zeros(shape, device=device), entropy=torch.zeros(shape, device=device)
    )
    metrics: dict[str, float] = {}
    returns = torch.zeros(shape, device=device)
    if cfg.estimator == "gae" and value_model is not None:
        own.old_values = torch.zeros(shape, device=device)
        metrics |= _value_pass(value_model, b, None, cfg, sched, own)
        returns = critic_targets(b, own.old_values, cfg)  # row-wise: what the value update used
        metrics |= lambda_metrics(b.response_lengths, cfg)
    adv, loss_mask, m = advantages(b, cfg, own.old_values, returns)
    metrics |= m
    metrics |= _policy_pass(policy, b, PolicyTargets(adv, loss_mask, None), cfg, temperature, sched, own)
    assert own.entropy is not None and own.prox_logprobs is not None
    metrics["entropy"] = float(algo.masked_mean(own.entropy, b.mask))
    metrics["behaviour_kl"] = behaviour_kl(own.prox_logprobs, b)
    return metrics
