"""One VAPO update on a batch of groups: values, Decoupled/Length-adaptive GAE, proximal log-probs, then
mini-batch updates of the policy (clip-higher, token-level, decoupled off-policy, + mu * positive NLL) and
of the value model (clipped value loss). The math is ``async_vapo.algo``; this module only wires the
models, the config switches and the mini-batching.

Gradient accounting: every loss is a global token (or sequence) mean over the whole mini-batch, however it
is split into micro-batches and data-parallel ranks. Each micro-batch loss is divided by the global count
and multiplied by ``gas * world`` because DeepSpeed divides by the accumulation steps and averages over
ranks.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from async_vapo import algo
from async_vapo.config import AlgoConfig
from async_vapo.learner.batch import Batch


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def policy_forward(policy: Any, b: Batch, temperature: float, with_entropy: bool = False):
    """log pi(response token) [B, T] (and entropy [B, T] when asked)."""
    logits = policy(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    idx = b.resp_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    resp_logits = logits.gather(1, idx).float() / temperature
    logp = algo.token_logprobs(resp_logits, b.response_ids)
    ent = algo.entropy_from_logits(resp_logits.detach()) if with_entropy else None
    return logp, ent


def value_forward(value_model: Any, b: Batch) -> torch.Tensor:
    """V(s_t) [B, T]: the value at the position whose logits predict response token t."""
    values = value_model(b.input_ids, b.attention_mask)
    return values.gather(1, b.resp_index)


@dataclass
class Targets:
    advantages: torch.Tensor  # [B, T], whitened when configured
    returns: torch.Tensor  # [B, T] critic targets (lambda_critic)
    old_values: torch.Tensor  # [B, T]
    prox_logprobs: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T]
    metrics: dict[str, float]


def _micro(b: Batch, size: int):
    for start in range(0, b.size, size):
        yield b.select(slice(start, start + size))


@torch.no_grad()
def compute_targets(
    policy: Any, value_model: Any | None, b: Batch, cfg: AlgoConfig, temperature: float, micro: int
) -> Targets:
    """Everything the updates treat as constants, computed once per batch before any update."""
    was_training = policy.training
    policy.eval()
    prox, ents = [], []
    for mb in _micro(b, micro):
        lp, ent = policy_forward(policy, mb, temperature, with_entropy=True)
        prox.append(lp)
        ents.append(ent)
    if was_training:
        policy.train()
    prox_logprobs = torch.cat(prox)
    entropy = torch.cat(ents)
    mask = b.mask
    lengths = mask.sum(1)
    rewards = algo.terminal_rewards(b.scores, mask)
    metrics: dict[str, float] = {"entropy": float(algo.masked_mean(entropy, mask))}

    if cfg.estimator == "group_norm" or value_model is None:
        adv = algo.group_normalized_advantages(b.scores, b.group_ids, mask)
        returns = old_values = torch.zeros_like(rewards)
    else:
        value_model.eval()
        old_values = torch.cat([value_forward(value_model, mb) for mb in _micro(b, micro)])
        value_model.train()
        lam_policy: float | torch.Tensor = cfg.lam_policy
        if cfg.length_adaptive:
            lam_policy = algo.length_adaptive_lambda(lengths, cfg.alpha)
            metrics["lambda_clamp_frac"] = float(
                algo.length_adaptive_lambda_clamped(lengths, cfg.alpha).float().mean()
            )
            metrics["lambda_policy_mean"] = float(lam_policy.mean())
        lam_critic = cfg.lam_critic if cfg.decoupled_gae else lam_policy
        adv, returns = algo.decoupled_gae(rewards, old_values, mask, cfg.gamma, lam_critic, lam_policy)
        metrics["explained_variance"] = float(algo.explained_variance(old_values, returns, mask))
        metrics["value_mean"] = float(algo.masked_mean(old_values, mask))
    loss_mask = algo.truncation_mask(mask, b.truncated, cfg.drop_truncated)
    if cfg.whiten_advantages and cfg.estimator == "gae":
        adv = algo.masked_whiten(adv, loss_mask)
    metrics["advantage_abs_mean"] = float(algo.masked_mean(adv.abs(), loss_mask))
    log_ratio_behav = torch.where(mask, prox_logprobs - b.behaviour_logprobs, torch.zeros_like(prox_logprobs))
    metrics["behaviour_kl"] = float(algo.masked_mean(0.5 * log_ratio_behav**2, mask))
    return Targets(adv, returns, old_values, prox_logprobs, loss_mask, metrics)


def _mini_batches(b: Batch, n: int, seed: int) -> list[torch.Tensor]:
    """Shuffle whole groups into ``n`` mini-batches (Group-Sampling keeps a prompt's samples together)."""
    groups = torch.unique(b.group_ids)
    gen = torch.Generator().manual_seed(seed)
    order = groups[torch.randperm(len(groups), generator=gen)]
    chunks = order.chunk(n)
    return [torch.isin(b.group_ids, c).nonzero().squeeze(1) for c in chunks if len(c)]


def policy_update(
    engine: Any,
    b: Batch,
    t: Targets,
    cfg: AlgoConfig,
    temperature: float,
    micro: int,
    mini_batches: int,
    epochs: int,
    seed: int,
) -> dict[str, float]:
    acc: dict[str, list[float]] = defaultdict(list)
    world = _world()
    for epoch in range(epochs):
        for rows in _mini_batches(b, mini_batches, seed * 1000 + epoch):
            mb = b.select(rows)
            mask = t.loss_mask[rows]
            n_tok = _all_sum(mask.sum().to(torch.float32))
            n_seq = _all_sum(torch.tensor(float(mb.size)))
            pos = mask & mb.correct.unsqueeze(1)
            n_pos = _all_sum(pos.sum().to(torch.float32))
            gas = math.ceil(mb.size / micro)
            for start in range(0, mb.size, micro):
                sl = slice(start, start + micro)
                ub = mb.select(sl)
                logp, _ = policy_forward(engine, ub, temperature)
                umask = mask[sl]
                behaviour = ub.behaviour_logprobs if cfg.decoupled else None
                prox = t.prox_logprobs[rows][sl] if cfg.decoupled else ub.behaviour_logprobs
                denom = n_tok if cfg.loss_agg == "token" else n_seq
                pg_loss, m = algo.policy_loss(
                    logp,
                    prox,
                    t.advantages[rows][sl],
                    umask,
                    cfg.eps_low,
                    cfg.eps_high,
                    behaviour,
                    cfg.iw_cap,
                    cfg.loss_agg,
                    denom,
                )
                nll = (
                    algo.positive_nll_loss(logp, umask, ub.correct, n_pos)
                    if cfg.nll_coef > 0
                    else pg_loss * 0
                )
                loss = pg_loss + cfg.nll_coef * nll
                engine.backward(loss * gas * world)
                engine.step()
                acc["policy_loss"].append(float(pg_loss) * gas)
                acc["nll_loss"].append(float(nll) * gas)
                for k, v in m.items():
                    acc[k].append(float(v))
            gn = engine.get_global_grad_norm()
            if gn is not None:
                acc["policy_grad_norm"].append(float(gn))
    return {k: (max(v) if k.endswith("_max") else sum(v) / len(v)) for k, v in acc.items() if v}


def value_update(
    engine: Any, b: Batch, t: Targets, cfg: AlgoConfig, micro: int, mini_batches: int, epochs: int, seed: int
) -> dict[str, float]:
    acc: dict[str, list[float]] = defaultdict(list)
    world = _world()
    for epoch in range(epochs):
        for rows in _mini_batches(b, mini_batches, seed * 1000 + 7 + epoch):
            mb = b.select(rows)
            n_tok = _all_sum(mb.mask.sum().to(torch.float32))
            gas = math.ceil(mb.size / micro)
            for start in range(0, mb.size, micro):
                sl = slice(start, start + micro)
                ub = mb.select(sl)
                values = value_forward(engine, ub)
                vl, clip_frac = algo.value_loss(
                    values, t.old_values[rows][sl], t.returns[rows][sl], ub.mask, cfg.value_clip, n_tok
                )
                engine.backward(vl * gas * world)
                engine.step()
                acc["value_loss"].append(float(vl) * gas)
                acc["value_clip_frac"].append(float(clip_frac))
            gn = engine.get_global_grad_norm()
            if gn is not None:
                acc["value_grad_norm"].append(float(gn))
    return {k: sum(v) / len(v) for k, v in acc.items() if v}


def batch_metrics(b: Batch, max_tokens: int, learner_version: int) -> dict[str, float]:
    lengths = b.mask.sum(1).float()
    stale = (learner_version - b.versions.masked_fill(~b.mask, learner_version).min(1).values).float()
    return {
        "reward_mean": float(b.scores.mean()),
        "accuracy": float(b.correct.float().mean()),
        "response_length_mean": float(lengths.mean()),
        "response_length_max": float(lengths.max()),
        "clipped_frac": float((lengths >= max_tokens).float().mean()),
        "truncated_frac": float(b.truncated.float().mean()),
        "staleness_mean": float(stale.mean()),
        "staleness_max": float(stale.max()),
    }


class Timer:
    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.spent[name] += time.perf_counter() - self.t0

        return _Ctx()
