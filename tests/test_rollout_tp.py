"""A tensor-parallel engine (vLLM's CPU backend, ``tensor_parallel_size=2``, one core per vLLM worker)
receives weights over one group of world 1 + TP: learner rank 0 and both of the engine's workers. The
32B recipe runs TP 4 engines; this is the same code path at TP 2."""

from __future__ import annotations

import pytest
import torch

from tests.test_rollout_vllm import start_worker, stop_worker, two_updates_then_compare

pytestmark = pytest.mark.slow


def test_tp2_engine_loads_two_updates_like_transformers(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    side, link, proc = start_worker(tiny_model_dir, tp=2, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    try:
        assert link.spec.world_size == 3
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        two_updates_then_compare(side, link, model, tok)
    finally:
        stop_worker(side, proc)
