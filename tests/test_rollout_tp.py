"""The 32B recipe's tensor-parallel engine, TP 4 in bf16 (vLLM's CPU backend), receives weights over one
group of world 1 + 4: learner rank 0 and every worker of the engine, and then samples with the new weights'
log-probs. On 2 cores two workers share each core (vLLM binds each worker's OpenMP threads to the cores of
its ``|``-separated list). The tiny model's 17-token vocabulary, padded to 64 and split 4 ways, leaves
ranks 2 and 3 shards of padding only. fp32 TP 2 engines run through the launcher in
``test_recipe_settings.py``; a TP 2 engine serving a LoRA adapter in ``test_lora.py``."""

from __future__ import annotations

import pytest
import torch

from tests.rollout_harness import start_worker, stop_worker, two_updates_then_compare

pytestmark = pytest.mark.slow


def test_tp_engine_loads_two_updates_like_transformers(tiny_model_dir):
    """In bf16, the recipe's engines' precision (``dtype: auto`` on GPUs): bf16 buckets, as a bf16 learner
    publishes them, into bf16 parameters; the engine's log-probs then agree with an fp32 pass over the
    same bf16-valued weights to bf16 rounding of the activations (a shard loaded wrong is off by far more:
    the updates move log-probs by > 0.25, ``two_updates_then_compare``)."""
    tp, bind, dtype, atol = 4, "0|1|0|1", torch.bfloat16, 0.05
    from transformers import AutoModelForCausalLM, AutoTokenizer

    side, link, proc = start_worker(
        tiny_model_dir, tp=tp, env={"VLLM_CPU_OMP_THREADS_BIND": bind}, dtype=str(dtype).split(".")[1]
    )
    try:
        assert link.spec.world_size == 1 + tp
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        two_updates_then_compare(side, link, model, tok, atol, dtype)
    finally:
        stop_worker(side, proc)
