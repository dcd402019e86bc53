"""Per-GPU memory estimate for a layout (``--dry-run``): learner ranks and vLLM engines.

Learner, per rank, for each of the two models (policy and value; the value model is the same backbone
with a scalar head): bf16 weights (2 B/param), gradients accumulated in fp32 under ZeRO (4 B; bf16
without), fp32 master weights and Adam moments
(12 B), sharded by the ZeRO stage over the learner world (1: optimiser, 2: + gradients, 3: + weights);
under ZeRO-3 also the parameters gathered at once (``stage3_max_live_parameters``) and, from stage 2, the
gradient reduce bucket (``reduce_bucket_size``), both set explicitly in ``learner.models.zero_config``.

Activations of one forward/backward of ``tokens`` tokens (the packed budget, else micro-batch x the
longest sequence), in bytes per token, **fitted to a trace** of the learner's own forward and backward
(``bench/memory_trace.py``: Qwen2 decoder layers in bf16 under torch's ``FakeTensorMode`` and memory
tracker, hidden 2,560/5,120, intermediate 13,824/27,648, 8,192-token micro-batches; the 32B slice of two
layers + embedding + LM head on the recipe's 22,528 tokens is then within 15%):

- gradient checkpointing: each layer's bf16 input (2 x hidden) is kept; the layer being recomputed and
  differentiated works in ``21 x hidden + 12 x intermediate`` (the MLP's four ``[tokens, intermediate]``
  tensors and their gradients dominate at 32B widths);
- without it: ``21 x hidden + 8 x intermediate`` per layer kept for backward, plus ``23 x hidden``;
- the policy's LM head (``learner.forward.ScoringHead``) scores ``logit_chunk`` tokens at a time, each
  chunk's logits made from hidden states inside a checkpointed function: about 14.5 bytes per logit of one
  chunk (bf16 logits, the fp32 log-softmax, the entropy's temporaries). It runs before the layers'
  backward, so the activations are the checkpointed inputs plus the larger of the two working sets.

vLLM engine: bf16 weights / TP, the rest of ``gpu_memory_utilization`` is KV cache.

Publishing new weights (learner rank 0): a streamed publish holds one flat bucket and one gathered
parameter, or the largest tensor (the embedding) sent as it is; a snapshot holds a full copy of
the bf16 weights (and, under ZeRO-3, the whole gathered model while it copies). The engine's workers
receive a streamed update bucket by bucket (models up to 1 GiB keep their receive buffers). With
``model.lora_publish=adapter`` what is published is the policy's adapter: the snapshot or the bucket is
the adapter's size at most, and the engine holds the adapter twice more (vLLM's LoRA slot and its copy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from async_vapo.config import Config

GiB = 2**30

# Bytes per token, fitted to bench/memory_trace.py's traces (module docstring).
LAYER_WORK_PER_HIDDEN, LAYER_WORK_PER_INTERMEDIATE = 21, 12  # one checkpointed layer's recompute + backward
LAYER_KEPT_PER_HIDDEN, LAYER_KEPT_PER_INTERMEDIATE = 21, 8  # per layer without checkpointing
UNCHECKPOINTED_EXTRA_PER_HIDDEN = 23
HEAD_BYTES_PER_LOGIT = 14.5  # one LM-head chunk: bf16 logits, fp32 log-softmax, entropy temporaries
# DeepSpeed's ZeRO defaults, which learner.models.zero_config sets explicitly (elements)
ZERO_REDUCE_BUCKET = 500_000_000
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params(self) -> int:
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * (attn + mlp + 2 * self.hidden) + embed

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


# Published architectures, for planning without the weights at hand (config.json wins when present).
KNOWN: dict[str, ModelShape] = {
    "qwen2.5-0.5b": ModelShape(24, 896, 4864, 14, 2, 151936, True),
    "qwen2.5-1.5b": ModelShape(28, 1536, 8960, 12, 2, 151936, True),
    "qwen2.5-7b": ModelShape(28, 3584, 18944, 28, 4, 152064),
    "qwen2.5-14b": ModelShape(48, 5120, 13824, 40, 8, 152064),
    "qwen2.5-32b": ModelShape(64, 5120, 27648, 40, 8, 152064),
    "qwen2.5-72b": ModelShape(80, 8192, 29568, 64, 8, 152064),
}


def model_shape(path: str) -> ModelShape:
    """From ``<path>/config.json`` when it exists, else from the model name (``KNOWN``)."""
    cfg_file = Path(path) / "config.json"
    if path and cfg_file.exists():
        c = json.loads(cfg_file.read_text())
        return ModelShape(
            c["num_hidden_layers"],
            c["hidden_size"],
            c["intermediate_size"],
            c["num_attention_heads"],
            c.get("num_key_value_heads", c["num_attention_heads"]),
            c["vocab_size"],
            bool(c.get("tie_word_embeddings", False)),
        )
    name = Path(path).name.lower()
    for key, shape in KNOWN.items():
        if key in name:
            return shape
    raise ValueError(f"cannot size model {path!r}: no config.json there and not one of {sorted(KNOWN)}")


def activation_bytes(shape: ModelShape, tokens: int, chunk: int, checkpointing: bool) -> dict[str, float]:
    """Bytes of one forward/backward of ``tokens`` tokens, by part (module docstring): ``layer_inputs``
    (checkpointed inputs, or everything the layers keep without checkpointing), ``layer_work`` (one
    layer's recompute + backward), ``lm_head`` (one chunk of ``chunk`` tokens, 0: all), and ``peak`` =
    layer_inputs + the larger of the two working sets."""
    h, i, n = shape.hidden, shape.intermediate, tokens
    if checkpointing:
        kept = 2.0 * h * shape.layers * n
        work = float(LAYER_WORK_PER_HIDDEN * h + LAYER_WORK_PER_INTERMEDIATE * i) * n
    else:
        kept = float((LAYER_KEPT_PER_HIDDEN * h + LAYER_KEPT_PER_INTERMEDIATE * i) * shape.layers) * n
        work = float(UNCHECKPOINTED_EXTRA_PER_HIDDEN * h) * n
    head = HEAD_BYTES_PER_LOGIT * min(n, chunk or n) * shape.vocab
    return {"layer_inputs": kept, "layer_work": work, "lm_head": head, "peak": kept + max(work, head)}


@dataclass(frozen=True)
class MemoryPlan:
    learner: dict[str, float]  # GiB per learner GPU, by item
    engine: dict[str, float]  # GiB per engine GPU, by item
    kv_tokens_per_engine: int
    concurrent_sequences_per_engine: int
    problems: list[str]
    notes: list[str] = field(default_factory=list)  # how items were counted
    learner_host: dict[str, float] = field(
        default_factory=dict
    )  # GiB of host memory per learner rank (offload)

    def describe(self, card_gib: float, device: str = "GPU") -> str:
        def block(title: str, items: dict[str, float]) -> str:
            body = ", ".join(f"{k} {v:.1f}" for k, v in items.items())
            return f"{title}: {sum(items.values()):.1f} GiB of {card_gib:.0f} ({body})"

        lines = [block(f"learner {device}", self.learner)]
        if self.learner_host:
            body = ", ".join(f"{k} {v:.1f}" for k, v in self.learner_host.items())
            lines.append(
                f"learner host memory per rank (offloaded): {sum(self.learner_host.values()):.1f} GiB ({body})"
            )
        lines += [
            block(f"engine {device}", self.engine),
            f"engine KV cache: {self.kv_tokens_per_engine:,} tokens = "
            f"{self.concurrent_sequences_per_engine} full-length sequences at once",
        ]
        lines += self.notes
        lines += [f"IMPOSSIBLE: {p}" for p in self.problems]
        return "\n".join(lines)


def estimate_memory(
    shape: ModelShape,
    cfg: Config,
    learner_world: int,
    card_gib: float,
    tensor_parallel_size: int | None = None,
    kv_cache_gib: float | None = None,
) -> MemoryPlan:
    """Per-device memory of a learner rank and of an engine under recipe ``cfg`` (ZeRO stage, micro-batch,
    sequence length, gradient checkpointing, publish mode from ``train``; TP and memory fraction from
    ``rollout``; ``tensor_parallel_size`` overrides the recipe's, e.g. 1 on CPU). ``kv_cache_gib``: a
    fixed KV cache (vLLM on CPU: VLLM_CPU_KVCACHE_SPACE) instead of the rest of the card."""
    tp = tensor_parallel_size or cfg.rollout.tensor_parallel_size
    t = cfg.train
    acts = activation_bytes(shape, learner_tokens(cfg), t.logit_chunk, t.gradient_checkpointing)
    learner = _learner_gib(shape, cfg, learner_world, acts["peak"])
    host = {k: learner.pop(k) for k in _offloaded(cfg)}
    engine, kv_tokens = _engine_gib(shape, cfg, tp, card_gib, kv_cache_gib)
    seq_len = cfg.rollout.max_model_len
    problems = _problems(cfg, learner, engine, kv_tokens, tp, card_gib)
    notes = [
        f"learner activations {acts['peak'] / GiB:.1f} GiB for {learner_tokens(cfg):,} tokens per pass = "
        f"layer inputs {acts['layer_inputs'] / GiB:.1f} + the larger of one layer's backward "
        f"{acts['layer_work'] / GiB:.1f} and one LM-head chunk {acts['lm_head'] / GiB:.1f} "
        "(bytes per token fitted to bench/memory_trace.py)"
    ]
    if host:
        notes.append(
            "offloaded to host memory: " + ", ".join(host) + " (DeepSpeed's CPU Adam steps there; the GPU "
            "keeps the reduce bucket" + (" and the gathered parameters)" if t.offload_params else ")")
        )
    return MemoryPlan(learner, engine, kv_tokens, kv_tokens // max(1, seq_len), problems, notes, host)


def _offloaded(cfg: Config) -> list[str]:
    """The learner items ZeRO-Offload keeps in host memory instead of on the GPU: the fp32 master weights
    and Adam moments with the fp32 gradient partition (``offload_optimizer``), the parameters
    (``offload_params``)."""
    t = cfg.train
    return (["optimizer", "gradients"] if t.offload_optimizer else []) + (
        ["weights"] if t.offload_params else []
    )


def learner_tokens(cfg: Config) -> int:
    """Tokens in one forward/backward pass: the packed budget, else micro-batch x the longest sequence."""
    return cfg.train.max_tokens_per_micro or cfg.train.micro_batch_size * cfg.rollout.max_model_len


def lora_params(shape: ModelShape, rank: int, targets: list[str]) -> int:
    """Adapter elements of rank ``rank`` on the named projections of every layer (each is r x (in + out))."""
    kv = shape.kv_heads * shape.head_dim
    h, i = shape.hidden, shape.intermediate
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip
    return shape.layers * sum(rank * (a + b) for name, (a, b) in dims.items() if name in targets)


def _learner_gib(shape: ModelShape, cfg: Config, learner_world: int, activations: float) -> dict[str, float]:
    t, m = cfg.train, cfg.model
    p, n = shape.params, max(1, learner_world)
    # the parameters each model trains: all of them, or with LoRA its adapters (learner/lora.py)
    ranks = [m.lora_rank] + ([m.critic_lora_rank] if cfg.algo.estimator == "gae" else [])
    trained = [lora_params(shape, r, m.lora_target_modules) if r else p for r in ranks]
    # bf16 weights, gradients accumulated in fp32 (learner.models.ds_config), fp32 Adam moments + master
    weights = 2.0 * p * len(ranks)
    grads = (4.0 if t.zero_stage >= 1 else 2.0) * sum(trained)
    optim = 12.0 * sum(trained)
    if t.zero_stage >= 1:
        optim /= n
    if t.zero_stage >= 2:
        grads /= n
    if t.zero_stage >= 3:
        weights /= n
    learner = {
        "weights": weights / GiB,
        "gradients": grads / GiB,
        "optimizer": optim / GiB,
        "activations": activations / GiB,  # policy and value passes never overlap
    }
    if t.max_tokens_per_micro and cfg.model.attn_implementation != "flash_attention_2":
        # packed rows under SDPA: transformers' dense block-diagonal mask (bool) and SDPA's bf16 bias of it
        learner["packed_mask"] = 3.0 * float(t.max_tokens_per_micro) ** 2 / GiB
    if t.zero_stage >= 2 or t.offload_optimizer:  # DeepSpeed's gradient reduce bucket (bf16)
        learner["reduce_bucket"] = 2.0 * ZERO_REDUCE_BUCKET / GiB
    if t.zero_stage >= 3:  # parameters gathered at once (prefetch included), at most a few layers'
        learner["zero3_gathered"] = 2.0 * min(ZERO3_MAX_LIVE_PARAMETERS, p) / GiB
    if m.lora_publish == "adapter":  # the adapter alone: a copy of it at most
        learner["publish"] = 2.0 * trained[0] / GiB
    elif t.streams_publish:  # one flat bucket + one gathered parameter, or the embedding sent as it is
        largest_in_layer = 2.0 * shape.intermediate * shape.hidden
        learner["publish"] = (
            max(t.bucket_mb * 2**20 + largest_in_layer, 2.0 * shape.vocab * shape.hidden) / GiB
        )
    else:
        learner["publish"] = (2.0 * p * (2 if t.zero_stage >= 3 else 1)) / GiB
    return learner


def _engine_gib(
    shape: ModelShape, cfg: Config, tp: int, card_gib: float, kv_cache_gib: float | None
) -> tuple[dict[str, float], int]:
    p = shape.params
    weights = 2.0 * p / tp
    budget = cfg.rollout.gpu_memory_utilization * card_gib * GiB
    bucket = max(cfg.train.bucket_mb * 2**20, 2.0 * shape.vocab * shape.hidden)
    receive = 2.0 * p if 2.0 * p <= GiB else 2 * bucket  # see WeightReceiver.receive_weights
    m = cfg.model
    if m.lora_publish == "adapter":  # received whole, then vLLM's LoRA slot and its own copy (per TP rank)
        receive = 3.0 * 2.0 * lora_params(shape, m.lora_rank, m.lora_target_modules)
    kv_bytes = max(0.0, budget - weights - 2 * GiB - receive)  # ~2 GiB activations / CUDA graphs
    if kv_cache_gib is not None:
        kv_bytes = kv_cache_gib * GiB
    kv_tokens = int(kv_bytes // (shape.kv_bytes_per_token() / tp))
    engine = {
        "weights": weights / GiB,
        "kv_cache": kv_bytes / GiB,
        "runtime": 2.0,
        "weight_receive": receive / GiB,
    }
    return engine, kv_tokens


def _learner_fixes(cfg: Config, learner: dict[str, float]) -> list[str]:
    """What could make a learner GPU's items fit, naming only changes that apply to ``cfg``."""
    t = cfg.train
    fixes = [] if t.zero_stage == 3 else [f"raise train.zero_stage (now {t.zero_stage})"]
    fixes.append("add training GPUs")
    if not t.offload_optimizer and t.zero_stage >= 1:
        fixes.append(
            f"train.offload_optimizer=true (moves {learner['optimizer'] + learner['gradients']:.0f} GiB to the host)"
        )
    if not t.offload_params and t.zero_stage == 3 and "weights" in learner:
        fixes.append(f"train.offload_params=true (moves {learner['weights']:.0f} GiB to the host)")
    if not cfg.model.uses_lora:
        fixes.append(
            "train LoRA adapters instead (model.lora_rank / critic_lora_rank, train.zero_stage <= 2)"
        )
    if not t.gradient_checkpointing:
        fixes.append("turn on train.gradient_checkpointing")
    fixes.append(
        "lower train.max_tokens_per_micro" if t.max_tokens_per_micro else "lower train.micro_batch_size"
    )
    fixes.append(f"set a smaller train.logit_chunk (now {t.logit_chunk or 'off'})")
    if not t.streams_publish:
        fixes.append(f"stream the publish (train.publish=stream: now {learner['publish']:.0f} GiB)")
    return fixes


def _problems(
    cfg: Config, learner: dict[str, float], engine: dict[str, float], kv_tokens: int, tp: int, card_gib: float
) -> list[str]:
    r = cfg.rollout
    problems = []
    if sum(learner.values()) > card_gib:
        problems.append(
            f"a learner GPU needs {sum(learner.values()):.0f} GiB > {card_gib:.0f} GiB: "
            + ", ".join(_learner_fixes(cfg, learner))
        )
    if engine["weights"] + 2 > r.gpu_memory_utilization * card_gib:
        problems.append(
            f"an engine's weights ({engine['weights']:.0f} GiB) do not fit in "
            f"{r.gpu_memory_utilization:.2f} x {card_gib:.0f} GiB: raise rollout.tensor_parallel_size"
        )
    elif kv_tokens < r.max_model_len:
        problems.append(
            f"an engine's KV cache holds {kv_tokens} tokens, less than one {r.max_model_len}-token sequence: "
            "raise rollout.tensor_parallel_size or rollout.gpu_memory_utilization"
        )
    return problems
