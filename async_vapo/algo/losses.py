"""VAPO losses: clip-higher policy loss (decoupled off-policy form), clipped value loss,
positive-example NLL, explained variance, entropy.

Shapes: log-probs, advantages, values, returns: float [B, T]; mask: bool [B, T].

Deviation from the paper: the policy loss is AReaL's decoupled PPO objective (arXiv 2505.24298) so that
stale samples can be trained on. The clipped ratio is taken against the proximal policy ``pi_prox``
(learner weights before this update) and every token is weighted by the truncated behaviour importance
weight ``w = min(pi_prox / mu, iw_cap)``, ``mu`` being the sampler's log-prob. With fresh samples and
matching numerics ``w = 1`` and this is exactly VAPO's loss.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from async_vapo.algo.masked import masked_mean, masked_sum, masked_var

LossAgg = Literal["token", "sample"]


def aggregate_loss(
    loss_mat: Tensor, mask: Tensor, mode: LossAgg, denominator: Tensor | float | None = None
) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    token:  sum_{b,t in mask} loss / N, N = ``denominator`` if given (the global token count across
            data-parallel ranks and micro-batches) else mask.sum(). Every token weighs the same, so long
            responses weigh more (VAPO component 5).
    sample: mean over sequences of (sum_t loss / l_b); with ``denominator`` the sum over sequences is
            divided by it (the global sequence count). Empty rows contribute 0.
    """
    if mode == "token":
        total = masked_sum(loss_mat, mask)
        n = mask.sum().clamp(min=1).to(loss_mat.dtype) if denominator is None else denominator
        return total / n
    if mode == "sample":
        per_seq = masked_mean(loss_mat, mask, dim=1)
        n = torch.tensor(float(loss_mat.shape[0])).clamp(min=1) if denominator is None else denominator
        return per_seq.sum() / n
    raise ValueError(f"unknown loss aggregation {mode!r}; valid: 'token', 'sample'")


def policy_loss(  # noqa: PLR0913 (four tensors, then the loss's keyword-only tuning parameters)
    logprobs: Tensor,
    proximal_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    behaviour_logprobs: Tensor | None = None,
    iw_cap: float | None = None,
    agg: LossAgg = "token",
    denominator: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip-higher PPO loss, decoupled for off-policy samples.

        rho_t = exp(log pi_theta - log pi_prox)
        w_t   = min(exp(log pi_prox - log mu), iw_cap)          (1 when behaviour_logprobs is None)
        L     = - agg( w_t * min(rho_t * A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_t) )

    logprobs carries the gradient; proximal/behaviour log-probs and advantages are treated as constants.
    Returns (loss, metrics), metrics being 0-dim tensors: clip fractions (low/high), approx KL to the
    proximal policy, importance-weight mean/max and the fraction truncated.
    """
    prox = proximal_logprobs.detach()
    adv = advantages.detach()
    log_ratio = torch.where(mask, logprobs - prox, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    surrogate = torch.minimum(ratio * adv, clipped * adv)

    if behaviour_logprobs is None:
        weight = torch.ones_like(prox)
        truncated = torch.zeros_like(mask)
    else:
        log_w = torch.where(mask, prox - behaviour_logprobs.detach(), torch.zeros_like(prox))
        weight = torch.exp(log_w)
        truncated = mask & (weight > iw_cap) if iw_cap is not None else torch.zeros_like(mask)
        if iw_cap is not None:
            weight = weight.clamp(max=iw_cap)

    loss = aggregate_loss(-weight * surrogate, mask, agg, denominator)
    with torch.no_grad():
        metrics = {
            "clip_frac_low": masked_mean(((ratio < 1.0 - eps_low) & (adv < 0)).float(), mask),
            "clip_frac_high": masked_mean(((ratio > 1.0 + eps_high) & (adv > 0)).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "iw_mean": masked_mean(weight, mask),
            "iw_max": torch.where(mask, weight, torch.zeros_like(weight)).max(),
            "iw_truncated_frac": masked_mean(truncated.float(), mask),
        }
    return loss, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: float | None,
    denominator: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """Clipped value loss:

        L_V = 0.5 * token-mean( max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2) )

    values carries the gradient; ``clip_range`` None disables clipping. Returns (loss, clip_frac).
    """
    ret = returns.detach()
    unclipped = (values - ret) ** 2
    if clip_range is None:
        per_token = unclipped
        clip_frac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        old = old_values.detach()
        v_clipped = old + (values - old).clamp(-clip_range, clip_range)
        clipped = (v_clipped - ret) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clip_frac = masked_mean((clipped > unclipped).float().detach(), mask)
    return 0.5 * aggregate_loss(per_token, mask, "token", denominator), clip_frac


def positive_nll_loss(
    logprobs: Tensor, mask: Tensor, correct: Tensor, denominator: Tensor | float | None = None
) -> Tensor:
    """Positive-example LM loss: L_NLL = - sum_{correct b, t in mask} log pi_theta / N_pos.

    correct: bool [B]. N_pos is ``denominator`` when given (the global count of correct-sample tokens
    across ranks and micro-batches, so the value does not depend on how the batch is split) else the
    local count. Exactly 0, with zero gradient, when no sample is correct.
    """
    pos_mask = mask & correct.bool().unsqueeze(1)
    total = masked_sum(logprobs, pos_mask)
    n = pos_mask.sum().clamp(min=1).to(logprobs.dtype) if denominator is None else denominator
    if isinstance(n, Tensor):
        n = n.clamp(min=1)
    else:
        n = max(n, 1.0)
    return -total / n


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, rel_tol: float = 1e-6) -> Tensor:
    """1 - Var(G - V) / Var(G) over valid tokens (scalar); defined as 0 when the returns have no spread,
    Var(G) <= (rel_tol * max(1, max |G|))^2. GAE's returns are A + V, so a batch whose rewards are all
    equal has returns equal up to float rounding (Var(G) ~ 1e-17, not 0), and the plain ratio would be
    ~ -1e14 (seen in runs where every response of a step was wrong)."""
    var_g = masked_var(returns, mask)
    var_res = masked_var(returns - values, mask)
    scale = torch.where(mask.bool(), returns.abs(), torch.zeros_like(returns)).max().clamp(min=1.0)
    spread = var_g > (rel_tol * scale) ** 2
    safe = torch.where(spread, var_g, torch.ones_like(var_g))
    return torch.where(spread, 1.0 - var_res / safe, torch.zeros_like(var_g))


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-position entropy of the categorical distribution. logits [..., V] -> [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token] per position. logits [B, T, V], tokens long [B, T] -> [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
