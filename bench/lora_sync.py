"""Weight updates under a policy LoRA: the merged weights (``model.lora_publish=merged``) against the
adapter alone (``adapter``) into one live vLLM CPU engine, in the same run. Used by ``weight_sync.py``.

The engine serves a Qwen2 model with the tiny model's tokenizer, built here with random weights at
``--lora-hidden`` x ``--lora-layers`` (default 1024 x 8: ~110 M parameters, ~420 MB in fp32, big enough
that the bytes matter), with a rank-``--lora-rank`` adapter on every projection (the recipe's targets).
Each repetition does both updates through the rollout engine's own paths, each from the learner's first
byte to the engine ready to sample again:
- ``merged``: every weight broadcast in buckets and reloaded (``WeightReceiver.receive_weights``),
- ``adapter``: the adapter's matrices broadcast and put in vLLM's LoRA slot in place
  (``WeightReceiver.receive_adapter``),
then samples the same prompts with and without the adapter (what serving an adapter costs per token on
this backend). Bytes per update for the recipes' models follow from their shapes
(``cluster.memory.lora_params``).
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

MB = 2**20


def _model(out: Path, hidden: int, layers: int) -> Path:
    """A random-weight Qwen2 causal LM in HF format with the tiny model's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from async_vapo.tasks.tiny_model import ensure_tiny_model

    tiny = ensure_tiny_model(progress=False)
    cfg = AutoConfig.from_pretrained(tiny)
    cfg.update(
        {
            "hidden_size": hidden,
            "intermediate_size": hidden * 11 // 4,
            "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64,
            "num_key_value_heads": max(1, hidden // 256),
            "layer_types": ["full_attention"] * layers,
        }
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, out / f.name)
    return out


def _update(loop, engine, link, snap, load) -> tuple[float, float]:
    """(seconds from the first byte sent to the engine ready, broadcast seconds) of one update."""
    box: list[float] = []
    th = threading.Thread(target=lambda: box.append(link.send(snap)))
    t0 = time.perf_counter()
    th.start()
    loop.run_until_complete(load())
    paused = time.perf_counter() - t0
    th.join()
    return paused, box[0]


def lora_sync(
    hidden: int = 1024, layers: int = 8, rank: int = 32, bucket_mb: float = 64.0, reps: int = 3
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from async_vapo.cluster.memory import KNOWN, lora_params
    from async_vapo.cluster.ports import free_port
    from async_vapo.config import ModelConfig
    from async_vapo.learner.lora import LoRALinear, apply_lora, published_adapter
    from async_vapo.rollout.engine import EngineConfig, RolloutEngine
    from async_vapo.tasks.arithmetic import AdditionTask
    from async_vapo.tasks.tiny_model import prompt_ids
    from async_vapo.weight_sync.adapter import LoRASpec
    from async_vapo.weight_sync.broadcast import EngineLink, snapshot
    from async_vapo.weight_sync.group import GroupSpec

    targets = tuple(ModelConfig().lora_target_modules)
    tmp = Path(tempfile.mkdtemp(prefix="lora_sync_"))
    try:
        path = _model(tmp / "model", hidden, layers)
        policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        apply_lora(policy, rank, 2.0 * rank, targets)
        spec = LoRASpec(rank, 2.0 * rank, targets)
        engine = RolloutEngine(EngineConfig(str(path), dtype="float32", max_model_len=256, lora=spec))
        link = EngineLink(GroupSpec("127.0.0.1", free_port(), 2, "gloo", 120.0))
        loop = asyncio.new_event_loop()
        connect = threading.Thread(target=link.connect)
        connect.start()
        loop.run_until_complete(engine.init_weight_group(link.spec))
        connect.join()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        prompts = [prompt_ids(tok, AdditionTask(), p) for p in AdditionTask().problems(8, 0, "q")]
        res: dict[str, list[float]] = {
            k: [] for k in ("merged_s", "merged_bcast_s", "adapter_s", "adapter_bcast_s")
        }
        sizes: dict[str, int] = {}
        try:
            for v in range(1, 2 * reps + 1, 2):
                with torch.no_grad():
                    for m in policy.modules():
                        if isinstance(m, LoRALinear):
                            m.lora_B.normal_(std=0.01)
                merged = snapshot(
                    v, ((n, p) for n, p in policy.named_parameters() if "lora_" not in n), int(bucket_mb * MB)
                )
                adapter = snapshot(v + 1, published_adapter(policy), int(bucket_mb * MB))
                sizes = {"merged": merged.nbytes, "adapter": adapter.nbytes}

                async def load_merged(snap=merged):
                    await engine.llm.collective_rpc("receive_weights", args=(snap.buckets,))
                    await engine.llm.reset_prefix_cache()

                p, b = _update(loop, engine, link, merged, load_merged)
                res["merged_s"].append(p)
                res["merged_bcast_s"].append(b)
                p, b = _update(
                    loop,
                    engine,
                    link,
                    adapter,
                    lambda snap=adapter: engine.load_weights(snap.buckets, snap.version),
                )
                res["adapter_s"].append(p)
                res["adapter_bcast_s"].append(b)
            decode: dict[str, float] = {}
            held = engine._adapter
            for label, request in [("warm-up", None), ("warm-up", held)] + [
                ("base", None),
                ("adapter", held),
            ] * 2:
                engine._adapter = request  # the adapter the requests carry (None: the base model)
                t0 = time.perf_counter()
                out = loop.run_until_complete(engine.sample_many(prompts, 4, 1.0, 1.0, 64))
                n = sum(len(s.token_ids) for g in out for s in g)
                if label != "warm-up":  # the better of two rounds each, interleaved
                    rate = round(n / (time.perf_counter() - t0), 1)
                    decode[f"{label}_tokens_per_s"] = max(rate, decode.get(f"{label}_tokens_per_s", 0.0))
            engine._adapter = held
        finally:
            engine.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    recipes = {}
    for name in ("qwen2.5-7b", "qwen2.5-32b"):
        shape = KNOWN[name]
        recipes[name] = {
            "merged_mb_bf16": round(2 * shape.params / MB),
            f"adapter_rank{rank}_mb_bf16": round(2 * lora_params(shape, rank, list(targets)) / MB, 1),
        }
    return {
        "model": f"qwen2 {hidden}x{layers}",
        "rank": rank,
        "merged_mb": round(sizes["merged"] / MB, 1),
        "adapter_mb": round(sizes["adapter"] / MB, 2),
        "bytes_ratio": round(sizes["merged"] / sizes["adapter"], 1),
        **{f"{k}_median": round(v, 4) for k, v in med.items()},
        "paused_ratio_merged_vs_adapter": round(med["merged_s"] / med["adapter_s"], 2),
        **decode,
        "decode_adapter_vs_base": round(decode["adapter_tokens_per_s"] / decode["base_tokens_per_s"], 3),
        "recipes": recipes,
    }
