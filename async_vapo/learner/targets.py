"""What the updates treat as constants, computed once per batch: the proximal log-probs, the old values,
the critic's targets and the policy's advantages (Decoupled-GAE, Length-adaptive GAE, V-trace or
group-normalised advantages). The math is ``async_vapo.algo``'s; this module wires it to a batch.

Two functions make the targets, each used by both the unfused and the fused update (``learner/update.py``):
``critic_targets`` (the critic's half of Decoupled-GAE, or V-trace; row by row, so the fused value update
builds them from its own forward) and ``policy_advantages`` (the policy's half, or group-normalised).
Advantage whitening uses statistics reduced over all data-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from async_vapo import algo, distributed
from async_vapo.config import AlgoConfig
from async_vapo.learner.batch import Batch
from async_vapo.learner.forward import Micro, as_micro, policy_forward, value_forward
from async_vapo.learner.schedule import sweep


@dataclass
class Targets:
    advantages: torch.Tensor  # [B, T], whitened when configured
    returns: torch.Tensor  # [B, T] the critic's targets
    old_values: torch.Tensor | None  # [B, T]; None without a critic (algo.estimator=group_norm)
    prox_logprobs: torch.Tensor  # [B, T] log pi_prox of each response token
    loss_mask: torch.Tensor  # [B, T]
    metrics: dict[str, float]


def lambdas(lengths: torch.Tensor, cfg: AlgoConfig) -> tuple[Any, Any]:
    """(lambda_critic, lambda_policy) for rows of these response ``lengths`` (long [B]): per-row policy
    lambdas when length-adaptive; the critic's is ``lam_critic`` when decoupled, else the policy's."""
    lam_policy: float | torch.Tensor = cfg.lam_policy
    if cfg.length_adaptive:
        lam_policy = algo.length_adaptive_lambda(lengths, alpha=cfg.alpha)
    return (cfg.lam_critic if cfg.decoupled_gae else lam_policy), lam_policy


def lambda_metrics(lengths: torch.Tensor, cfg: AlgoConfig) -> dict[str, float]:
    if not cfg.length_adaptive:
        return {}
    return {
        "lambda_clamp_frac": float(
            algo.length_adaptive_lambda_clamped(lengths, alpha=cfg.alpha).float().mean()
        ),
        "lambda_policy_mean": float(algo.length_adaptive_lambda(lengths, alpha=cfg.alpha).mean()),
    }


def log_ratio(prox: torch.Tensor, b: Batch) -> torch.Tensor:
    """log pi_prox - log mu per valid response token, 0 elsewhere."""
    return torch.where(b.mask, prox - b.behaviour_logprobs, torch.zeros_like(prox))


def critic_targets(
    b: Batch, old_values: torch.Tensor, cfg: AlgoConfig, prox: torch.Tensor | None = None
) -> torch.Tensor:
    """The critic's targets of ``b``'s rows (row-wise: any subset of rows) from their old values [B, T]:
    GAE returns with lambda_critic (Decoupled-GAE's critic half), or with ``algo.value_correction=vtrace``
    V-trace targets, which need the proximal log-probs ``prox`` [B, T]. float [B, T]."""
    lam_critic, _ = lambdas(b.response_lengths, cfg)
    rewards = algo.terminal_rewards(b.scores, b.mask)
    if cfg.value_correction != "vtrace":
        return algo.gae(rewards, old_values, b.mask, gamma=cfg.gamma, lam=lam_critic)[1]
    if prox is None:
        raise ValueError("V-trace targets need the proximal log-probs")
    return algo.vtrace(
        rewards,
        old_values,
        b.mask,
        log_ratio(prox, b),
        gamma=cfg.gamma,
        lam=lam_critic,
        rho_bar=cfg.vtrace_rho_bar,
        c_bar=cfg.vtrace_c_bar,
    )[1]


def policy_advantages(b: Batch, old_values: torch.Tensor | None, cfg: AlgoConfig) -> torch.Tensor:
    """The policy's raw advantages [B, T] of the whole batch: GAE with lambda_policy (Decoupled-GAE's
    policy half, per-row when length-adaptive) from the old values, or group-normalised rewards without
    a critic (``old_values`` None)."""
    if old_values is None:
        return algo.group_normalized_advantages(b.scores, b.group_ids, b.mask)
    _, lam_policy = lambdas(b.response_lengths, cfg)
    rewards = algo.terminal_rewards(b.scores, b.mask)
    return algo.gae(rewards, old_values, b.mask, gamma=cfg.gamma, lam=lam_policy)[0]


def _whiten_across_ranks(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``masked_whiten`` with the mean and variance of every rank's valid entries (two passes)."""
    total, count = distributed.all_sum(algo.masked_sum_count(x, mask)).unbind()
    mean = total / count.clamp(min=1)
    sq = distributed.all_sum(algo.masked_sq_dev(x, mask, mean))
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.zeros_like(sq))
    return algo.whiten_with(x, mask, mean, var)


def advantages(
    b: Batch, cfg: AlgoConfig, old_values: torch.Tensor | None, returns: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(advantages, loss mask, metrics) of the whole batch: ``policy_advantages``, whitened over every
    rank's valid tokens when configured; ``returns``: the critic's targets, for the critic's metrics."""
    adv = policy_advantages(b, old_values, cfg)
    metrics: dict[str, float] = {}
    if old_values is not None:
        metrics["explained_variance"] = float(algo.explained_variance(old_values, returns, b.mask))
        metrics["value_mean"] = float(algo.masked_mean(old_values, b.mask))
    loss_mask = algo.truncation_mask(b.mask, b.truncated, cfg.drop_truncated)
    if cfg.whiten_advantages and old_values is not None:
        adv = _whiten_across_ranks(adv, loss_mask)
    metrics["advantage_abs_mean"] = float(algo.masked_mean(adv.abs(), loss_mask))
    return adv, loss_mask, metrics


def behaviour_kl(prox: torch.Tensor, b: Batch) -> float:
    """Mean over valid tokens of (log pi_prox - log mu)^2 / 2: how far the batch is off-policy."""
    return float(algo.masked_mean(0.5 * log_ratio(prox, b) ** 2, b.mask))


def vtrace_metrics(prox: torch.Tensor, b: Batch, cfg: AlgoConfig) -> dict[str, float]:
    if cfg.value_correction != "vtrace":
        return {}
    rho = log_ratio(prox, b).exp().clamp(max=cfg.vtrace_rho_bar)
    return {"vtrace_rho_mean": float(algo.masked_mean(rho, b.mask))}


@torch.no_grad()
def compute_targets(
    policy: Any, value_model: Any | None, b: Batch, cfg: AlgoConfig, temperature: float, micro: Micro | int
) -> Targets:
    """Everything the updates treat as constants, computed once per batch before any update."""
    micro = as_micro(micro)
    was_training = policy.training
    policy.eval()

    def logprobs_and_entropy(ub: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logp, ent = policy_forward(policy, ub, temperature, micro, with_entropy=True)
        assert ent is not None
        return logp, ent

    prox_logprobs, entropy = sweep(b, micro, logprobs_and_entropy)
    if was_training:
        policy.train()
    metrics: dict[str, float] = {"entropy": float(algo.masked_mean(entropy, b.mask))}
    old_values = None
    returns = torch.zeros_like(prox_logprobs)
    if cfg.estimator == "gae" and value_model is not None:
        value_model.eval()
        (old_values,) = sweep(b, micro, lambda ub: (value_forward(value_model, ub, micro),))
        value_model.train()
        returns = critic_targets(b, old_values, cfg, prox_logprobs)
        metrics |= lambda_metrics(b.response_lengths, cfg) | vtrace_metrics(prox_logprobs, b, cfg)
    adv, loss_mask, m = advantages(b, cfg, old_values, returns)
    metrics |= m
    metrics["behaviour_kl"] = behaviour_kl(prox_logprobs, b)
    return Targets(adv, returns, old_values, prox_logprobs, loss_mask, metrics)
