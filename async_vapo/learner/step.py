"""One VAPO update on a batch of groups: values, Decoupled/Length-adaptive GAE, proximal log-probs, then
mini-batch updates of the policy (clip-higher, token-level, decoupled off-policy, + mu * positive NLL) and
of the value model (clipped value loss). The math is ``async_vapo.algo``; this module only wires the
models, the config switches and the schedule.

Schedule (``UpdateSchedule``): ``epochs`` passes over the batch; each pass shuffles whole groups into
``mini_batches`` mini-batches (one optimiser step each); a mini-batch is run as micro-batches of at most
``micro_batch_size`` sequences whose gradients are accumulated, and the optimiser (and its learning-rate
schedule) steps once at the end of the mini-batch: DeepSpeed's accumulation boundary is driven
explicitly, so how a mini-batch is cut into micro-batches never changes the update.

Gradient accounting: every loss is a global token (or sequence) mean over the whole mini-batch, however it
is split into micro-batches and data-parallel ranks: each micro-batch loss is divided by the global count
(summed across ranks) and multiplied by the world size because DeepSpeed averages gradients over ranks.

Data-parallel ranks run the same number of forward/backward passes (ZeRO-3 gathers parameters in every
forward, ZeRO-2 reduces in every backward): a rank with fewer micro-batches than the others runs padding
passes with zero loss weight. Advantage whitening uses statistics reduced over all ranks.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from async_vapo import algo, distributed
from async_vapo.config import AlgoConfig
from async_vapo.learner.batch import Batch
from async_vapo.learner.forward import Micro, as_micro, policy_forward, token_slices, value_forward

# mini-batch shuffles: each step's seed spans SEEDS_PER_STEP seeds (its epochs'), and the value update
# shuffles with an offset of its own so that its mini-batches are not the policy update's
SEEDS_PER_STEP = 1000
VALUE_SHUFFLE_OFFSET = 7


@dataclass(frozen=True)
class UpdateSchedule:
    """How one batch becomes optimiser steps (see the module docstring)."""

    epochs: int = 1
    mini_batches: int = 1
    micro_batch_size: int = 64
    seed: int = 0
    shuffle_offset: int = (
        0  # mini-batch shuffles use seeds ``seed * SEEDS_PER_STEP + shuffle_offset + epoch``
    )
    max_tokens_per_micro: int = 0  # > 0: packed micro-batches of whole sequences up to this many tokens
    logit_chunk: int = 0  # > 0: the LM head sees this many response tokens at a time

    @property
    def micro(self) -> Micro:
        return Micro(self.micro_batch_size, self.max_tokens_per_micro, self.logit_chunk)


@dataclass
class Targets:
    advantages: torch.Tensor  # [B, T], whitened when configured
    returns: torch.Tensor  # [B, T] critic targets (lambda_critic)
    old_values: torch.Tensor | None  # [B, T]; None: from the value update's own forward (fused)
    prox_logprobs: torch.Tensor | None  # [B, T]; None: from the policy update's own forward (fused)
    loss_mask: torch.Tensor  # [B, T]
    metrics: dict[str, float]


class UnevenSplitError(ValueError):
    """A batch that cannot be cut into equal mini-batches of whole groups."""


def split_mini_batches(group_ids: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    """Shuffle whole groups (Group-Sampling keeps a prompt's samples together) into exactly ``n``
    mini-batches with the same number of groups each; returns their row indices.

    group_ids long [B] -> n tensors of row indices. Raises ``UnevenSplitError`` when the number of groups
    is not a multiple of ``n`` (ranks would disagree on the number of optimiser steps).
    """
    groups = torch.unique(group_ids)
    if len(groups) == 0 or len(groups) % n:
        raise UnevenSplitError(
            f"{len(groups)} groups cannot be split into {n} equal mini-batches: make train.groups_per_step a "
            "multiple of (learner ranks x train.mini_batches)"
        )
    gen = torch.Generator().manual_seed(seed)
    order = groups[torch.randperm(len(groups), generator=gen).to(groups.device)]
    per = len(groups) // n
    return [torch.isin(group_ids, order[i * per : (i + 1) * per]).nonzero().squeeze(1) for i in range(n)]


def micro_slices(n_rows: int, micro: int, n_passes: int) -> list[slice | None]:
    """The micro-batches of a mini-batch of ``n_rows`` sequences, padded to ``n_passes`` passes
    (``None`` = a padding pass with zero loss weight, so that every rank runs the same passes)."""
    real = [slice(s, s + micro) for s in range(0, n_rows, micro)]
    if len(real) > n_passes:
        raise ValueError(f"{len(real)} micro-batches > {n_passes} passes")
    return real + [None] * (n_passes - len(real))


def _rank_slices(b: Batch, micro: Micro) -> list[slice | None]:
    """The micro-batches of ``b`` (by sequences, or by tokens when packed), padded with ``None`` to the
    largest number of micro-batches of any rank (one small all-reduce)."""
    if micro.packed:
        real: list[slice | None] = list(token_slices(b.row_lengths.tolist(), micro.tokens))
    else:
        real = list(micro_slices(b.size, micro.sequences, -(-b.size // micro.sequences)))
    n = distributed.all_max(len(real), b.input_ids.device)
    return real + [None] * (n - len(real))


def length_order(lengths: torch.Tensor, micro: Micro) -> torch.Tensor:
    """The order in which rows of these ``lengths`` (long [B], prompt + response tokens) are cut into
    micro-batches: padded layout, by length (stable), so that each micro-batch is trimmed to rows of
    similar length (``forward.trim``); packed layout, as they come (a pass costs its real tokens either
    way). long [B], a permutation of ``range(B)``."""
    if micro.packed:
        return torch.arange(len(lengths), device=lengths.device)
    return torch.argsort(lengths, stable=True)


def _passes(b: Batch, micro: Micro) -> Iterator[tuple[Batch, bool]]:
    """(micro-batch, is_real) for a forward-only sweep, padded to the ranks' maximum number of passes."""
    for sl in _rank_slices(b, micro):
        yield (b.select(sl), True) if sl is not None else (b.select(slice(0, 1)), False)


def _sweep(
    b: Batch, micro: Micro, fn: Callable[[Batch], tuple[torch.Tensor, ...]]
) -> tuple[torch.Tensor, ...]:
    """``fn`` on every micro-batch of ``b``, cut from its rows in ``length_order``; ``fn``'s row-aligned
    outputs concatenated back into ``b``'s row order (padding passes run too, their outputs dropped)."""
    order = length_order(b.row_lengths, micro)
    outs = [(fn(ub), real) for ub, real in _passes(b.select(order), micro)]
    kept = [out for out, real in outs if real]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return tuple(torch.cat(parts)[inverse] for parts in zip(*kept, strict=True))


def _whiten_across_ranks(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``masked_whiten`` with the mean and variance of every rank's valid entries (two passes)."""
    total, count = distributed.all_sum(algo.masked_sum_count(x, mask)).unbind()
    mean = total / count.clamp(min=1)
    sq = distributed.all_sum(algo.masked_sq_dev(x, mask, mean))
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.zeros_like(sq))
    return algo.whiten_with(x, mask, mean, var)


def _lambdas(lengths: torch.Tensor, cfg: AlgoConfig, metrics: dict[str, float]) -> tuple[Any, Any]:
    """(lambda_critic, lambda_policy): per-sequence policy lambdas when length-adaptive."""
    lam_policy: float | torch.Tensor = cfg.lam_policy
    if cfg.length_adaptive:
        lam_policy = algo.length_adaptive_lambda(lengths, cfg.alpha)
        metrics["lambda_clamp_frac"] = float(
            algo.length_adaptive_lambda_clamped(lengths, cfg.alpha).float().mean()
        )
        metrics["lambda_policy_mean"] = float(lam_policy.mean())
    return (cfg.lam_critic if cfg.decoupled_gae else lam_policy), lam_policy


def _critic_returns(b: Batch, old_values: torch.Tensor, cfg: AlgoConfig) -> torch.Tensor:
    """The critic's targets of ``b``'s rows from their old values (row-wise: any subset of rows)."""
    lam_critic, _ = _lambdas(b.response_lengths, cfg, {})
    rewards = algo.terminal_rewards(b.scores, b.mask)
    return algo.gae(rewards, old_values, b.mask, cfg.gamma, lam_critic)[1]


def _log_ratio(prox: torch.Tensor, b: Batch) -> torch.Tensor:
    """log pi_prox - log mu per valid response token, 0 elsewhere."""
    return torch.where(b.mask, prox - b.behaviour_logprobs, torch.zeros_like(prox))


def _advantages(
    b: Batch,
    cfg: AlgoConfig,
    old_values: torch.Tensor | None,
    metrics: dict[str, float],
    prox: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, critic returns, loss mask) of the whole batch, given the old values (GAE) or none
    (group-normalised); whitened over every rank's valid tokens when configured. ``prox``: the
    proximal log-probs, for the critic's V-trace targets (``algo.value_correction``)."""
    mask = b.mask
    rewards = algo.terminal_rewards(b.scores, mask)
    if old_values is None:
        adv = algo.group_normalized_advantages(b.scores, b.group_ids, mask)
        returns = torch.zeros_like(rewards)
    else:
        lam_critic, lam_policy = _lambdas(b.response_lengths, cfg, metrics)
        # Decoupled-GAE (algo.decoupled_gae), with the critic's half replaced by V-trace when configured
        adv = algo.gae(rewards, old_values, mask, cfg.gamma, lam_policy)[0]
        if cfg.value_correction != "vtrace":
            returns = algo.gae(rewards, old_values, mask, cfg.gamma, lam_critic)[1]
        else:
            assert prox is not None, "V-trace targets need the proximal log-probs"
            log_ratio = _log_ratio(prox, b)
            returns = algo.vtrace(
                rewards,
                old_values,
                mask,
                cfg.gamma,
                lam_critic,
                log_ratio,
                cfg.vtrace_rho_bar,
                cfg.vtrace_c_bar,
            )[1]
            rho = log_ratio.exp().clamp(max=cfg.vtrace_rho_bar)
            metrics["vtrace_rho_mean"] = float(algo.masked_mean(rho, mask))
        metrics["explained_variance"] = float(algo.explained_variance(old_values, returns, mask))
        metrics["value_mean"] = float(algo.masked_mean(old_values, mask))
    loss_mask = algo.truncation_mask(mask, b.truncated, cfg.drop_truncated)
    if cfg.whiten_advantages and old_values is not None:
        adv = _whiten_across_ranks(adv, loss_mask)
    metrics["advantage_abs_mean"] = float(algo.masked_mean(adv.abs(), loss_mask))
    return adv, returns, loss_mask


def _behaviour_kl(prox: torch.Tensor, b: Batch) -> float:
    return float(algo.masked_mean(0.5 * _log_ratio(prox, b) ** 2, b.mask))


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

    prox_logprobs, entropy = _sweep(b, micro, logprobs_and_entropy)
    if was_training:
        policy.train()
    metrics: dict[str, float] = {"entropy": float(algo.masked_mean(entropy, b.mask))}
    old_values = None
    if cfg.estimator == "gae" and value_model is not None:
        value_model.eval()
        (old_values,) = _sweep(b, micro, lambda ub: (value_forward(value_model, ub, micro),))
        value_model.train()
    adv, returns, loss_mask = _advantages(b, cfg, old_values, metrics, prox_logprobs)
    metrics["behaviour_kl"] = _behaviour_kl(prox_logprobs, b)
    zeros = torch.zeros_like(adv)
    return Targets(
        adv, returns, old_values if old_values is not None else zeros, prox_logprobs, loss_mask, metrics
    )


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
            slices = _rank_slices(mb, sched.micro)
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


def policy_update(
    engine: Any,
    b: Batch,
    t: Targets,
    cfg: AlgoConfig,
    temperature: float,
    sched: UpdateSchedule,
    record: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """``t.prox_logprobs`` None (fused, one pass over one mini-batch): the proximal log-probs are this
    forward's, detached (the parameters have not moved yet); they and the entropies go to ``record``."""

    def prepare(rows: torch.Tensor, mb: Batch) -> MicroLoss:
        mask = t.loss_mask[rows]
        pos = mask & mb.correct.unsqueeze(1)
        counts = distributed.all_sum(
            torch.stack([mask.sum(), torch.tensor(mb.size, device=mask.device), pos.sum()]).float()
        )
        n_tok, n_seq, n_pos = counts.unbind()
        denom = n_tok if cfg.loss_agg == "token" else n_seq

        def loss_of(sub: torch.Tensor, ub: Batch):
            fused = t.prox_logprobs is None
            logp, ent = policy_forward(engine, ub, temperature, sched.micro, with_entropy=fused)
            own = logp.detach() if t.prox_logprobs is None else t.prox_logprobs[sub]
            if record is not None and ent is not None:
                record["prox_logprobs"][sub], record["entropy"][sub] = own, ent
            umask = t.loss_mask[sub]
            behaviour = ub.behaviour_logprobs if cfg.decoupled else None
            prox = own if cfg.decoupled else ub.behaviour_logprobs
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


def value_update(
    engine: Any,
    b: Batch,
    t: Targets | None,
    cfg: AlgoConfig,
    sched: UpdateSchedule,
    record: torch.Tensor | None = None,
) -> dict[str, float]:
    """``t`` None (fused, one pass over one mini-batch): the old values are this forward's, detached, the
    critic's targets are built from them row by row, and the old values go to ``record``."""

    def prepare(rows: torch.Tensor, mb: Batch) -> MicroLoss:
        n_tok = distributed.all_sum(mb.mask.sum().to(torch.float32))

        def loss_of(sub: torch.Tensor, ub: Batch):
            values = value_forward(engine, ub, sched.micro)
            if t is None or t.old_values is None:
                old = values.detach()
                returns = _critic_returns(ub, old, cfg)
                if record is not None:
                    record[sub] = old
            else:
                old, returns = t.old_values[sub], t.returns[sub]
            vl, clip_frac = algo.value_loss(values, old, returns, ub.mask, cfg.value_clip, n_tok)
            return vl, {"value_loss": vl}, {"value_clip_frac": clip_frac}

        return loss_of

    # the critic's mini-batches are shuffled independently of the policy's
    return _summary(
        run_update(engine, b, replace(sched, shuffle_offset=VALUE_SHUFFLE_OFFSET), prepare), "value_grad_norm"
    )


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
    metrics: dict[str, float] = {}
    old_values = None
    if cfg.estimator == "gae" and value_model is not None:
        old_values = torch.zeros(b.mask.shape, device=b.mask.device)
        metrics |= value_update(value_model, b, None, cfg, sched, record=old_values)
    adv, returns, loss_mask = _advantages(b, cfg, old_values, metrics)
    record = {"prox_logprobs": torch.zeros(b.mask.shape, device=b.mask.device)}
    record["entropy"] = torch.zeros_like(record["prox_logprobs"])
    t = Targets(adv, returns, old_values, None, loss_mask, {})
    metrics |= policy_update(policy, b, t, cfg, temperature, sched, record)
    metrics["entropy"] = float(algo.masked_mean(record["entropy"], b.mask))
    metrics["behaviour_kl"] = _behaviour_kl(record["prox_logprobs"], b)
    return metrics


def batch_metrics(b: Batch, max_tokens: int, learner_version: int) -> dict[str, float]:
    lengths = b.response_lengths.float()
    oldest = b.versions.masked_fill(~b.mask, learner_version).min(1).values
    newest = b.versions.masked_fill(~b.mask, -1).max(1).values
    stale = (learner_version - oldest).float()
    return {
        "reward_mean": float(b.scores.mean()),
        "accuracy": float(b.correct.float().mean()),
        "response_length_mean": float(lengths.mean()),
        "response_length_max": float(lengths.max()),
        "clipped_frac": float((lengths >= max_tokens).float().mean()),
        "truncated_frac": float(b.truncated.float().mean()),
        "staleness_mean": float(stale.mean()),
        "staleness_max": float(stale.max()),
        # responses continued across a weight update (rollout.weight_update = keep)
        "version_spanning_frac": float((newest > oldest).float().mean()),
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
