"""Forward passes of the learner: packed or padded layout, and a chunked LM head.

**Layouts.** A ``Batch`` is response-aligned and right-padded (``learner/batch.py``). The padded layout runs
the model on ``[B, L']`` with an attention mask, ``L'`` the longest row *of the micro-batch* (a micro-batch
selected from a batch keeps the batch's width; ``trim`` cuts it): every sequence costs the micro-batch's
longest, and the learner cuts micro-batches from length-sorted rows (``learner/schedule.py``). The packed
layout (``Micro.tokens > 0``) concatenates the micro-batch's sequences without padding into one row
``[1, N]`` with position ids restarting at 0 per sequence and no attention mask: transformers derives a
block-diagonal causal mask from the position ids (``masking_utils.find_packed_sequence_indices``; the
flash-attention paths use the same position ids), so attention never crosses a sequence boundary. Either
way ``index [B, T]`` maps response token ``t`` of row ``b`` to the flat position whose output predicts it.

**The LM head scores inside the model's forward.** ``load_policy`` replaces the policy's LM head by a
``ScoringHead`` (same ``weight``, same state-dict key, tied to the embedding if it was). Outside a
``scoring`` block it is the ``nn.Linear`` it replaced. Inside one, the model's forward hands it the final
hidden states, it picks the rows predicting response tokens (``[K, H]``) and returns their log-probs and
entropies ``[K, 2]`` instead of logits, ``chunk`` tokens at a time: each chunk's logits (model dtype) and
their fp32 log-softmax are made from the hidden states inside one checkpointed function and recomputed in
backward. So no ``[K, V]`` tensor exists at all, in any dtype, beyond one chunk (``chunk = 0``: one chunk
of K, not recomputed). Before, the model returned the ``[K, V]`` logits and only the fp32 work was chunked:
at the 32B recipe's 22,528-token micro-batch those logits (6.4 GiB bf16) and their gradient stayed alive
through backward. A model whose forward changes the logits after its head (soft-capping, a logit scale)
keeps its own head and takes that older path (``chunked_logprobs``).

Every forward goes through the model's own ``forward`` (never a submodule called directly): DeepSpeed's
ZeRO-3 hooks gather a module's parameters around its forward (and, from the module's outputs, around its
backward, where the head's chunks are recomputed), follow the module order it traced, and ranks must issue
the same collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
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


def _in_chunks(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    rows: torch.Tensor,
    params: tuple[torch.Tensor | None, ...],
    targets: torch.Tensor,
    temperature: float,
    chunk: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(rows[i:j], *params, targets[i:j], temperature, with_entropy)`` over ``chunk`` rows at a time
    (0: all at once), concatenated. With a gradient to keep, each chunk is recomputed in backward (only its
    inputs are saved), so one chunk's ``[chunk, V]`` work is alive at a time. The entropy is detached."""
    size = chunk if chunk > 0 else max(1, rows.shape[0])
    grad = any(t is not None and t.requires_grad for t in (rows, *params))
    recompute = chunk > 0 and torch.is_grad_enabled() and grad
    parts = []
    for i in range(0, rows.shape[0], size):
        args = (rows[i : i + size], *params, targets[i : i + size], temperature, with_entropy)
        parts.append(checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args))
    if not parts:
        empty = rows.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).detach()


def chunked_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / temperature)[target] and the entropy, ``chunk`` rows at a time (``_in_chunks``).
    logits [K, V] (model dtype), targets long [K] -> ([K], [K]); the entropy carries no gradient."""
    return _in_chunks(_chunk_logprobs, logits, (), targets, temperature, chunk, with_entropy)


# Config attributes of models whose forward post-processes the head's logits (soft-capping, scaling):
# their logits are not the head's, so the scoring head is not installed on them.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass(frozen=True)
class Scoring:
    """What a ``ScoringHead`` computes during one forward. ``pick``: the model's final hidden states
    ([B, L, H]) -> the rows predicting the targets [K, H]; targets long [K]."""

    pick: Callable[[torch.Tensor], torch.Tensor]
    targets: torch.Tensor
    temperature: float
    chunk: int
    with_entropy: bool


def _chunk_scores(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _chunk_logprobs(F.linear(h, weight, bias), targets, temperature, with_entropy)


def score_hidden(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, s: Scoring
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(h W^T / temperature)[target] and the entropy, ``s.chunk`` rows at a time, each chunk's
    logits made and consumed inside one recomputed function (``_in_chunks``). h [K, H] (model dtype),
    weight [V, H] -> ([K], [K]) fp32; the entropy carries no gradient."""
    return _in_chunks(_chunk_scores, h, (weight, bias), s.targets, s.temperature, s.chunk, s.with_entropy)


class ScoringHead(nn.Module):
    """A causal LM's output projection that, inside ``scoring(...)``, returns response tokens' log-probs
    and entropies [K, 2] instead of logits (module docstring). ``weight`` [V, H] is the replaced Linear's
    own Parameter (shared with the input embedding when tied), so the state dict is unchanged."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._scoring: Scoring | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._scoring is None:
            return F.linear(hidden, self.weight, self.bias)
        logp, ent = score_hidden(self._scoring.pick(hidden), self.weight, self.bias, self._scoring)
        return torch.stack([logp, ent], dim=-1)

    @contextmanager
    def scoring(self, s: Scoring) -> Iterator[None]:
        self._scoring = s
        try:
            yield
        finally:
            self._scoring = None


def install_scoring_head(model: nn.Module) -> bool:
    """Replace ``model``'s LM head by a ``ScoringHead`` (before DeepSpeed wraps it, which hooks every
    module). False, leaving the model as it is, when its head is not a plain Linear or its forward
    post-processes the logits (``LOGIT_POSTPROCESSING``)."""
    get, put = getattr(model, "get_output_embeddings", None), getattr(model, "set_output_embeddings", None)
    head = get() if callable(get) else None
    config = getattr(model, "config", None)
    if type(head) is not nn.Linear or not callable(put):
        return False
    if any(getattr(config, k, None) not in (None, 0, 1, 1.0) for k in LOGIT_POSTPROCESSING):
        return False
    put(ScoringHead(head))
    return True


def scoring_head(policy: Any) -> ScoringHead | None:
    """The policy's ``ScoringHead`` (through a DeepSpeed engine's ``module``), if it has one."""
    model = getattr(policy, "module", policy)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, ScoringHead) else None


def response_logits(policy: Any, b: Batch, packed: bool) -> torch.Tensor:
    """The logits predicting each valid response token, [K, V] in ``b.mask`` order (model dtype): the path
    of a policy without a ``ScoringHead``. Packed: the model computes logits only at those positions."""
    if packed:
        ids, pos, index = pack(b)
        out = policy(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=index[b.mask])
        return out.logits[0]
    ids, attn, resp_index = trim(b)
    logits = policy(input_ids=ids, attention_mask=attn, use_cache=False).logits
    rows = torch.arange(b.size, device=logits.device).unsqueeze(1).expand_as(resp_index)
    return logits[rows[b.mask], resp_index[b.mask]]


def scoring_inputs(b: Batch, packed: bool) -> tuple[torch.Tensor, dict[str, Any], Callable]:
    """The model's inputs for scoring ``b``'s valid response tokens with a ``ScoringHead``: (input_ids,
    the other forward arguments, ``pick``: final hidden states -> the rows predicting them [K, H])."""
    if packed:
        ids, pos, index = pack(b)
        return ids, {"position_ids": pos, "logits_to_keep": index[b.mask]}, lambda h: h[0]
    ids, attn, resp_index = trim(b)
    rows = torch.arange(b.size, device=ids.device).unsqueeze(1).expand_as(resp_index)
    r, c = rows[b.mask], resp_index[b.mask]
    return ids, {"attention_mask": attn}, lambda h: h[r, c]


def head_scores(
    policy: Any, head: ScoringHead, ids: torch.Tensor, kwargs: dict[str, Any], s: Scoring
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [K], entropies [K]) of ``s.targets``, computed by the policy's ``ScoringHead`` inside the
    model's own forward on ``scoring_inputs``."""
    with head.scoring(s):
        out = policy(input_ids=ids, use_cache=False, **kwargs).logits
    k = int(s.targets.shape[0])
    if tuple(out.shape) != (k, 2):
        raise RuntimeError(
            f"the policy's forward changed its scoring head's output (shape {tuple(out.shape)}, expected "
            f"({k}, 2)): add the config attribute that makes it do so to forward.LOGIT_POSTPROCESSING"
        )
    return out[:, 0], out[
        :, 1
    ].detach()  # the entropy column carries no gradient (a view of the graph's output)


def policy_forward(
    policy: Any, b: Batch, temperature: float, micro: Micro | int = 0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(response token) [B, T] (0 where ``b.mask`` is False) and the entropy [B, T] when asked."""
    m = as_micro(micro)
    targets = b.response_ids[b.mask]
    head = scoring_head(policy)
    if head is not None:
        ids, kwargs, pick = scoring_inputs(b, m.packed)
        s = Scoring(pick, targets, temperature, m.logit_chunk, with_entropy)
        logp_k, ent_k = head_scores(policy, head, ids, kwargs, s)
    else:
        logits = response_logits(policy, b, m.packed)
        logp_k, ent_k = chunked_logprobs(logits, targets, temperature, m.logit_chunk, with_entropy)
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
