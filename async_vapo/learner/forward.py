"""Forward passes of the learner: packed or padded layout, and a chunked LM head.

**Layouts.** A ``Batch`` is response-aligned and right-padded (``learner/batch.py``). The padded layout runs
the model on ``[B, L']`` with an attention mask, ``L'`` the longest row *of the micro-batch* (a micro-batch
selected from a batch keeps the batch's width; ``trim`` cuts it): every sequence costs the micro-batch's
longest, and the learner cuts micro-batches from length-sorted rows (``learner/step.py``). The packed
layout (``Micro.tokens > 0``) concatenates the micro-batch's sequences without padding into one row
``[1, N]`` with position ids restarting at 0 per sequence and no attention mask: transformers derives a
block-diagonal causal mask from the position ids (``masking_utils.find_packed_sequence_indices``; the
flash-attention paths use the same position ids), so attention never crosses a sequence boundary. Either
way ``index [B, T]`` maps response token ``t`` of row ``b`` to the flat position whose output predicts it.

**Logits.** Only the response tokens' logits are used: packed, the model computes logits at those
positions only (``logits_to_keep``); the log-softmax, the gather and the entropy then run ``chunk``
tokens at a time in fp32, each chunk recomputed in backward (activation checkpointing), so no fp32
``[tokens, V]`` tensor exists for more than one chunk at a time (``chunk = 0``: all at once). Every
forward goes through the model's own ``forward`` (never a submodule called directly): DeepSpeed's
ZeRO-3 gathers follow the module order it traced, and ranks must issue the same collectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from async_vapo.learner.batch import Batch


@dataclass(frozen=True)
class Micro:
    """How a mini-batch is cut into forward/backward passes."""

    sequences: int = 64  # padded layout: at most this many sequences per pass
    tokens: int = 0  # > 0: packed layout, whole sequences up to this many tokens per pass
    logit_chunk: int = 0  # > 0: the LM head sees this many response tokens at a time

    @property
    def packed(self) -> bool:
        return self.tokens > 0


def as_micro(micro: Micro | int) -> Micro:
    return micro if isinstance(micro, Micro) else Micro(sequences=micro)


def token_slices(lengths: list[int], budget: int) -> list[slice]:
    """Consecutive rows whose lengths sum to at most ``budget`` (a longer row gets a pass of its own)."""
    out, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and used + n > budget:
            out.append(slice(start, i))
            start, used = i, 0
        used += n
    if start < len(lengths):
        out.append(slice(start, len(lengths)))
    return out


def pack(b: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded rows -> (input_ids [1, N], position_ids [1, N], index [B, T]) with N = the real tokens.

    ``index[b, t]`` is the flat position predicting response token ``t`` (padding positions point at the
    row's last token: finite, and masked by every consumer)."""
    lengths = b.row_lengths
    keep = b.attention_mask.bool()
    ids = b.input_ids[keep].unsqueeze(0)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(b.input_ids.shape[1], device=ids.device).expand_as(b.input_ids)[keep].unsqueeze(0)
    index = starts.unsqueeze(1) + torch.minimum(b.resp_index, (lengths - 1).unsqueeze(1))
    return ids, pos, index


def trim(b: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [B, L'], attention_mask [B, L'], resp_index [B, T]) with ``L'`` the longest row of ``b``:
    the padding columns no row of ``b`` uses are dropped. ``resp_index`` is clamped to ``L' - 1`` (only its
    masked entries can exceed it: a valid response token's predicting position is inside its row)."""
    width = max(1, int(b.row_lengths.max()))
    return b.input_ids[:, :width], b.attention_mask[:, :width], b.resp_index.clamp(max=width - 1)


def _chunk_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def chunked_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / temperature)[target] and the entropy, ``chunk`` rows at a time; each chunk's
    fp32 work is recomputed in backward, so one chunk's fp32 ``[chunk, V]`` is alive at a time.
    logits [K, V] (model dtype), targets long [K] -> ([K], [K]); the entropy carries no gradient."""
    if chunk <= 0 or logits.shape[0] <= chunk:
        logp, ent = _chunk_logprobs(logits, targets, temperature, with_entropy)
        return logp, ent.detach()
    parts = []
    for s in range(0, logits.shape[0], chunk):
        lc, tc = logits[s : s + chunk], targets[s : s + chunk]
        if torch.is_grad_enabled() and lc.requires_grad:
            parts.append(checkpoint(_chunk_logprobs, lc, tc, temperature, with_entropy, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(lc, tc, temperature, with_entropy))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).detach()


def response_logits(policy: Any, b: Batch, packed: bool) -> torch.Tensor:
    """The logits predicting each valid response token, [K, V] in ``b.mask`` order (model dtype).

    Always through the model's own forward (a DeepSpeed engine's hooks, ZeRO-3 gathers included, see
    every call); packed: the model computes logits only at those positions (``logits_to_keep``)."""
    if packed:
        ids, pos, index = pack(b)
        out = policy(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=index[b.mask])
        return out.logits[0]
    ids, attn, resp_index = trim(b)
    logits = policy(input_ids=ids, attention_mask=attn, use_cache=False).logits
    rows = torch.arange(b.size, device=logits.device).unsqueeze(1).expand_as(resp_index)
    return logits[rows[b.mask], resp_index[b.mask]]


def policy_forward(
    policy: Any, b: Batch, temperature: float, micro: Micro | int = 0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(response token) [B, T] (0 where ``b.mask`` is False) and the entropy [B, T] when asked."""
    m = as_micro(micro)
    logits = response_logits(policy, b, m.packed)
    logp_k, ent_k = chunked_logprobs(logits, b.response_ids[b.mask], temperature, m.logit_chunk, with_entropy)
    logp = torch.zeros(b.mask.shape, dtype=logp_k.dtype, device=logp_k.device).masked_scatter(b.mask, logp_k)
    ent = torch.zeros_like(logp).masked_scatter(b.mask, ent_k) if with_entropy else None
    return logp, ent


def value_forward(value_model: Any, b: Batch, micro: Micro | int = 0) -> torch.Tensor:
    """V(s_t) [B, T]: the value at the position whose output predicts response token t."""
    if as_micro(micro).packed:
        ids, pos, index = pack(b)
        return value_model(ids, position_ids=pos)[0][index]
    ids, attn, resp_index = trim(b)
    return value_model(ids, attn).gather(1, resp_index)
