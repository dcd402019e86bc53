"""Forward passes of the learner: packed or padded layout, and a chunked LM head.

**Layouts.** A ``Batch`` is response-aligned and right-padded (``learner/batch.py``). The padded layout runs
the model on ``[B, L]`` with an attention mask: every sequence costs the batch's longest. The packed
layout (``Micro.tokens > 0``) concatenates the micro-batch's sequences without padding into one row
``[1, N]`` with position ids restarting at 0 per sequence and no attention mask: transformers derives a
block-diagonal causal mask from the position ids (``masking_utils.find_packed_sequence_indices``; the
flash-attention paths use the same position ids), so attention never crosses a sequence boundary. Either
way ``index [B, T]`` maps response token ``t`` of row ``b`` to the flat position whose output predicts it.

**Chunked LM head.** Only the hidden states of the response tokens go through the LM head, ``chunk``
tokens at a time, and each chunk's logits are recomputed in backward (activation checkpointing), so no
fp32 ``[tokens, V]`` tensor exists for more than one chunk at a time (``chunk = 0``: all at once).
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
    lengths = b.attention_mask.sum(1)
    keep = b.attention_mask.bool()
    ids = b.input_ids[keep].unsqueeze(0)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(b.input_ids.shape[1], device=ids.device).expand_as(b.input_ids)[keep].unsqueeze(0)
    index = starts.unsqueeze(1) + torch.minimum(b.resp_index, (lengths - 1).unsqueeze(1))
    return ids, pos, index


def _core(model: Any) -> Any:
    return getattr(model, "module", model)  # a DeepSpeed engine's module, or the model itself


def backbone_hidden(backbone: Any, b: Batch, packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states, flat ``[N, H]``, and ``index [B, T]`` into them (see the module docstring)."""
    if packed:
        ids, pos, index = pack(b)
        h = backbone(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0]
        return h, index
    h = backbone(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).last_hidden_state
    rows = torch.arange(b.size, device=h.device).unsqueeze(1) * h.shape[1]
    return h.reshape(-1, h.shape[-1]), rows + b.resp_index


def _head_chunk(
    head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = torch.log_softmax(head(h).float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def head_logprobs(
    head: torch.nn.Module,
    h: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    chunk: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(head(h) / temperature)[target] and the entropy, ``chunk`` rows at a time.
    h [K, H], targets long [K] -> ([K], [K]); the entropy carries no gradient."""
    if chunk <= 0 or h.shape[0] <= chunk:
        logp, ent = _head_chunk(head, h, targets, temperature, with_entropy)
        return logp, ent.detach()
    parts = []
    for s in range(0, h.shape[0], chunk):
        hc, tc = h[s : s + chunk], targets[s : s + chunk]
        if torch.is_grad_enabled() and hc.requires_grad:  # recomputed in backward: one chunk alive
            parts.append(
                checkpoint(_head_chunk, head, hc, tc, temperature, with_entropy, use_reentrant=False)
            )
        else:
            parts.append(_head_chunk(head, hc, tc, temperature, with_entropy))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).detach()


def policy_forward(
    policy: Any, b: Batch, temperature: float, micro: Micro | int = 0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(response token) [B, T] (0 where ``b.mask`` is False) and the entropy [B, T] when asked."""
    m = as_micro(micro)
    core = _core(policy)
    h, index = backbone_hidden(core.model, b, m.packed)
    sel = index[b.mask]
    logp_k, ent_k = head_logprobs(
        core.lm_head, h[sel], b.response_ids[b.mask], temperature, m.logit_chunk, with_entropy
    )
    logp = torch.zeros(b.mask.shape, dtype=logp_k.dtype, device=logp_k.device).masked_scatter(b.mask, logp_k)
    ent = torch.zeros_like(logp).masked_scatter(b.mask, ent_k) if with_entropy else None
    return logp, ent


def value_forward(value_model: Any, b: Batch, micro: Micro | int = 0) -> torch.Tensor:
    """V(s_t) [B, T]: the value at the position whose output predicts response token t."""
    m = as_micro(micro)
    core = _core(value_model)
    h, index = backbone_hidden(core.backbone, b, m.packed)
    return core.head(h[index.reshape(-1)]).squeeze(-1).float().reshape(index.shape)
