"""Generalised Advantage Estimation, Decoupled-GAE and Length-adaptive GAE (VAPO Sec. 4.1-4.2).

Shapes: rewards, values: float [B, T]; mask: bool [B, T], right padded (a response occupies
positions 0 .. l_b - 1). Positions where ``mask`` is False are never read: their rewards and values
may hold anything, and advantages/returns there are 0.

    delta_t = r_t + gamma * V_{t+1} - V_t            with V_{l_b} = 0 (a finished response is terminal)
    A_t     = delta_t + gamma * lambda * A_{t+1}     computed backwards over valid positions
    G_t     = A_t + V_t                              (the critic target when lambda = 1: reward-to-go)

Truncated responses (max length hit, no EOS) are treated as terminal with the verifier's reward, like
finished ones; the learner may instead drop them from the policy loss (see ``truncation_mask``). We do not
bootstrap from V at the cut: the verifier's verdict on a cut answer is final.
"""

from __future__ import annotations

import torch
from torch import Tensor


def terminal_rewards(scores: Tensor, mask: Tensor) -> Tensor:
    """Place each sequence's scalar score on its last valid token.

    scores: float [B]; mask: bool [B, T] -> rewards float [B, T] (0 elsewhere; all 0 for empty rows).
    """
    lengths = mask.sum(dim=1)
    last = (lengths - 1).clamp(min=0)
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rewards.scatter_(1, last.unsqueeze(1), scores.unsqueeze(1))
    return torch.where(mask, rewards, torch.zeros_like(rewards))


def _as_per_sequence(lam: float | Tensor, batch: int, like: Tensor) -> Tensor:
    if isinstance(lam, Tensor):
        if lam.dim() == 0:
            return lam.to(like).expand(batch)
        if lam.shape != (batch,):
            raise ValueError(f"per-sequence lambda must have shape [{batch}], got {tuple(lam.shape)}")
        return lam.to(like)
    return torch.full((batch,), float(lam), dtype=like.dtype, device=like.device)


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    lam: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """GAE advantages and returns.

    Args:
        rewards: float [B, T], per-token rewards (see ``terminal_rewards``).
        values: float [B, T], V(s_t) from the value model (detached).
        mask: bool [B, T], True on valid response tokens.
        gamma: discount.
        lam: a float, or a float tensor [B] (one lambda per sequence, for Length-adaptive GAE).

    Returns:
        advantages [B, T] and returns = advantages + values [B, T], both 0 under the mask.
    """
    lam_b = _as_per_sequence(lam, rewards.shape[0], rewards).unsqueeze(1)
    return _scan(rewards, values, mask, gamma, None, lam_b.expand_as(rewards))


def _scan(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, rho: Tensor | None, c: Tensor
) -> tuple[Tensor, Tensor]:
    """The backward recursion shared by ``gae`` and ``vtrace``:
    ``A_t = rho_t * delta_t + gamma * c_t * A_{t+1}`` (``rho`` None: 1), ``delta_t = r_t + gamma * V_{t+1} -
    V_t``; returns (advantages, values + advantages), both 0 under the mask."""
    mask = mask.bool()
    batch, length = rewards.shape
    zeros = torch.zeros_like(rewards)
    r = torch.where(mask, rewards, zeros)
    v = torch.where(mask, values, zeros)
    m = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(length)):
        # delta_t = r_t + gamma * V_{t+1} - V_t   (V_{t+1} = 0 past the last valid token)
        delta = r[:, t] + gamma * next_value - v[:, t]
        if rho is not None:
            delta = rho[:, t] * delta
        adv_t = (delta + gamma * c[:, t] * next_adv) * m[:, t]
        advantages[:, t] = adv_t
        # carry only through valid positions, so padding never leaks backwards
        next_value = torch.where(mask[:, t], v[:, t], next_value * 0)
        next_adv = torch.where(mask[:, t], adv_t, next_adv * 0)
    return advantages, torch.where(mask, advantages + v, zeros)


def decoupled_gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    lam_critic: float | Tensor,
    lam_policy: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """Decoupled-GAE: critic targets from ``lam_critic`` (1.0 = Monte-Carlo), policy advantages from
    ``lam_policy`` (each a float or per-sequence [B]; the same value for both = coupled GAE).

    Returns (policy_advantages [B, T], critic_returns [B, T]). The critic returns never depend on
    ``lam_policy``; they are built from raw (never whitened) advantages.
    """
    _, critic_returns = gae(rewards, values, mask, gamma=gamma, lam=lam_critic)
    policy_advantages, _ = gae(rewards, values, mask, gamma=gamma, lam=lam_policy)
    return policy_advantages, critic_returns


def length_adaptive_lambda(lengths: Tensor, *, alpha: float) -> Tensor:
    """Length-adaptive GAE: lambda_b = clamp(1 - 1 / (alpha * l_b), 0, 1).

    lengths: int or float [B] -> float32 [B]. The clamp is our decision (the raw formula is negative for
    l < 1/alpha); empty responses (l = 0) get lambda 0. See ``length_adaptive_lambda_clamped`` for the
    metric of how many sequences were clamped.
    """
    lf = lengths.to(torch.float32)
    raw = 1.0 - 1.0 / (alpha * lf.clamp(min=1e-12))
    lam = raw.clamp(0.0, 1.0)
    return torch.where(lf > 0, lam, torch.zeros_like(lam))


def length_adaptive_lambda_clamped(lengths: Tensor, *, alpha: float) -> Tensor:
    """bool [B]: True where the raw length-adaptive formula fell below 0 and was clamped (incl. l = 0)."""
    lf = lengths.to(torch.float32)
    return (alpha * lf) < 1.0


def truncation_mask(mask: Tensor, truncated: Tensor, drop_truncated: bool) -> Tensor:
    """Loss mask after our truncation policy.

    mask: bool [B, T]; truncated: bool [B] (max length hit without EOS). With ``drop_truncated`` the
    truncated rows are removed from the policy loss; otherwise the mask is unchanged (terminal with reward).
    """
    if not drop_truncated:
        return mask
    return mask & ~truncated.bool().unsqueeze(1)


def vtrace(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    log_ratio: Tensor,
    *,
    gamma: float,
    lam: float | Tensor,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Off-policy GAE with V-trace's truncated importance weights (Espeholt et al., 2018), for the critic
    of a policy ``pi`` trained on tokens sampled by ``mu``.

    With ``rho_t = min(rho_bar, pi_t / mu_t)``, ``c_t = lam * min(c_bar, pi_t / mu_t)`` and
    ``delta_t = r_t + gamma * V_{t+1} - V_t``:

        A_t = rho_t * delta_t + gamma * c_t * A_{t+1}        v_t = V_t + A_t

    i.e. ``A_t = sum_{k>=t} gamma^(k-t) (prod_{i=t}^{k-1} c_i) rho_k delta_k``. With ``pi = mu`` and
    ``rho_bar, c_bar >= 1`` it is ``gae(..., lam)``. ``rho_bar`` bounds how far the targets move towards
    ``V^pi`` (their fixed point is the value of a policy between ``mu`` and ``pi``), ``c_bar`` the
    variance of the traces.

    Args:
        rewards, values: float [B, T]; mask: bool [B, T]; lam: float or per-sequence [B];
        log_ratio: float [B, T], log pi - log mu of each sampled token (detached).

    Returns:
        advantages [B, T] and targets ``v = values + advantages`` [B, T], both 0 under the mask.
    """
    mask = mask.bool()
    ratio = torch.where(mask, log_ratio.to(rewards.dtype).exp(), torch.ones_like(rewards))
    c = _as_per_sequence(lam, rewards.shape[0], rewards).unsqueeze(1) * ratio.clamp(max=c_bar)
    return _scan(rewards, values, mask, gamma, ratio.clamp(max=rho_bar), c)
