"""A measured check of the learner's memory plan without the GPU or the memory: the learner's own policy
forward and backward on a slice of the model (two decoder layers + embedding + LM head, at the model's
real widths) run under torch's ``FakeTensorMode`` (tensors have shapes and dtypes, no storage) with
torch's memory tracker (``torch.distributed._tools.mem_tracker``) counting every live tensor.

The slice is a Qwen2 model built from the shape in bf16, with gradient checkpointing as configured, the
``ScoringHead`` installed as ``learner.models.load_policy`` does, and one packed micro-batch of ``tokens``
tokens whose last ``response_tokens`` are scored (``learner.forward.scoring_inputs`` / ``head_scores``, the
learner's code). Attention is a stand-in with flash attention's memory (scaled-dot-product attention
without a mask: the output and its log-sum-exp are saved), the varlen kernel a GPU learner uses for packed
rows; a dense packed mask would add ``tokens^2`` bytes.

``scoring_head=False`` traces the path of a model without the scoring head (``[K, V]`` logits returned by
the model, only the fp32 work chunked) for comparison.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from async_vapo.cluster.memory import GiB, ModelShape, activation_bytes

ATTENTION = "memtrace_attention"  # (a name without "flash": transformers would look for a kernel)


def _attention(
    module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, scaling: Any = None, **_: Any
) -> tuple[torch.Tensor, None]:
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, lambda *a, **k: None)


def _slice_model(shape: ModelShape, layers: int) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(  # type: ignore[call-arg]
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        tie_word_embeddings=shape.tied_embeddings,
        attn_implementation=ATTENTION,
        use_cache=False,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def _policy_pass(
    model: Any,
    shape: ModelShape,
    tokens: int,
    response_tokens: int,
    chunk: int,
    checkpointing: bool,
    scoring_head: bool,
    device: str = "cpu",
) -> None:
    """One packed sequence of ``tokens`` tokens, its last ``response_tokens`` scored, forward + backward
    through the learner's scoring path (or, without the scoring head, the [K, V] logits path)."""
    from async_vapo.learner.forward import Scoring, chunked_logprobs, head_scores, install_scoring_head

    if not 0 < response_tokens < tokens:
        raise ValueError(f"need 0 < response_tokens ({response_tokens}) < tokens ({tokens})")
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    head = install_scoring_head(model) if scoring_head else False
    ids = torch.randint(0, shape.vocab, (1, tokens), device=device)
    kwargs = {
        "position_ids": torch.arange(tokens, device=device).unsqueeze(0),
        "logits_to_keep": torch.arange(tokens - response_tokens - 1, tokens - 1, device=device),
    }
    targets = torch.randint(0, shape.vocab, (response_tokens,), device=device)
    if head:
        s = Scoring(lambda h: h[0], targets, 1.0, chunk, True)
        logp, _ = head_scores(model, model.get_output_embeddings(), ids, kwargs, s)
    else:
        logits = model(input_ids=ids, use_cache=False, **kwargs).logits[0]
        logp, _ = chunked_logprobs(logits, targets, 1.0, chunk, True)
    (-logp.sum() / response_tokens).backward()


def measure_policy_pass_cuda(
    shape: ModelShape,
    tokens: int,
    response_tokens: int,
    chunk: int,
    checkpointing: bool = True,
    layers: int = 2,
) -> dict[str, float]:
    """The same pass run for real on the current CUDA device: the allocator's peak, weights included as in
    the trace's total, and the weights alone (GiB), for ``bench/gpu_check.py`` to set beside
    ``trace_policy_pass``'s figures."""
    _register_attention()
    torch.cuda.empty_cache()
    with torch.device("cuda"):
        model = _slice_model(shape, layers)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    _policy_pass(model, shape, tokens, response_tokens, chunk, checkpointing, True, "cuda")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model
    torch.cuda.empty_cache()
    return {"cuda_peak_gib": round(peak / GiB, 3), "cuda_weights_gib": round(start / GiB, 3)}


def trace_policy_pass(
    shape: ModelShape,
    tokens: int,
    response_tokens: int,
    chunk: int,
    checkpointing: bool = True,
    layers: int = 2,
    scoring_head: bool = True,
) -> dict[str, Any]:
    """Peak memory of one policy forward + backward on a ``layers``-layer slice of ``shape`` (module
    docstring), traced, and what ``cluster.memory`` plans for the same slice. Returns GiB figures:
    ``trace_gib`` (the tracker's peak, by category in ``trace_parts``), ``plan_gib`` (bf16 weights +
    gradients + planned activations) and ``plan_over_trace``."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    _register_attention()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _slice_model(shape, layers)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            _policy_pass(model, shape, tokens, response_tokens, chunk, checkpointing, scoring_head)
        (peak,) = tracker.get_tracker_snapshot("peak").values()
    params = sum(p.numel() for p in model.parameters())
    slice_shape = dataclasses.replace(shape, layers=layers)
    acts = activation_bytes(slice_shape, tokens, chunk, checkpointing)
    plan = 2.0 * params + 2.0 * params + acts["peak"]
    trace = float(peak["Total"])
    return {
        "trace_gib": round(trace / GiB, 3),
        "plan_gib": round(plan / GiB, 3),
        "plan_over_trace": round(plan / trace, 3),
        "trace_parts": {str(getattr(k, "value", k)): round(v / GiB, 3) for k, v in peak.items() if v},
        "plan_parts": {"weights": 2.0 * params / GiB, "gradients": 2.0 * params / GiB}
        | {k: v / GiB for k, v in acts.items()},
    }
