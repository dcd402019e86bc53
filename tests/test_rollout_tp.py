"""Tensor-parallel engines (vLLM's CPU backend, ``tensor_parallel_size`` 2 and 4) receive weights over one
group of world 1 + TP: learner rank 0 and every worker of the engine. The 32B recipe runs TP 4 engines.
On 2 cores each vLLM worker is bound to a core of its own at TP 2, and two workers share each core at
TP 4 (vLLM binds its workers' OpenMP threads to the listed cores, one ``|``-separated list per worker)."""

from __future__ import annotations

import pytest
import torch

from tests.test_rollout_vllm import start_worker, stop_worker, two_updates_then_compare

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("tp, bind", [(2, "0|1"), (4, "0|1|0|1")])
def test_tp_engine_loads_two_updates_like_transformers(tiny_model_dir, tp, bind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    side, link, proc = start_worker(tiny_model_dir, tp=tp, env={"VLLM_CPU_OMP_THREADS_BIND": bind})
    try:
        assert link.spec.world_size == 1 + tp
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        two_updates_then_compare(side, link, model, tok)
    finally:
        stop_worker(side, proc)
