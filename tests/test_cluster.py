"""Node discovery, placement and the memory plan (pure logic: no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from async_vapo.cluster import engine_core_binding, estimate_memory, layout, model_shape, node_info
from async_vapo.cluster.nodes import first_slurm_host
from async_vapo.cluster.placement import PlacementError
from async_vapo.config import load_config


def test_node_info_sources_and_precedence():
    assert node_info(env={}).nnodes == 1 and node_info(env={}).source == "single"
    slurm = {"SLURM_NNODES": "8", "SLURM_NODEID": "3", "SLURM_JOB_NODELIST": "gpu[07-14],cpu1"}
    n = node_info(env=slurm)
    assert (n.nnodes, n.node_rank, n.master_addr, n.master_port, n.source) == (8, 3, "gpu07", 29500, "slurm")
    torchrun = {
        "GROUP_RANK": "1",
        "LOCAL_WORLD_SIZE": "1",
        "WORLD_SIZE": "4",
        "MASTER_ADDR": "h0",
        "MASTER_PORT": "1234",
    }
    n = node_info(env=torchrun)
    assert (n.nnodes, n.node_rank, n.master_addr, n.master_port) == (4, 1, "h0", 1235)  # agent owns 1234
    with pytest.raises(ValueError, match="nproc-per-node 1"):
        node_info(env=torchrun | {"LOCAL_WORLD_SIZE": "8"})
    n = node_info(2, 1, "10.0.0.1", 5000, env=slurm)  # flags win
    assert (n.nnodes, n.node_rank, n.master_addr, n.source) == (2, 1, "10.0.0.1", "flags")
    with pytest.raises(ValueError, match="master-addr"):
        node_info(2, 1, env={})
    with pytest.raises(ValueError, match="outside"):
        node_info(2, 2, "h", env={})


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("node1", "node1"), ("gpu[03-05,9]", "gpu03"), ("a[1,2],b7", "a1"), ("x-y[010-012]", "x-y010")],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_gpu_layout_32_plus_32():
    lay = layout(32, 32, nnodes=8, gpus_per_node=8, tensor_parallel_size=4)
    assert lay.learner_world == 32 and lay.n_engines == 8
    assert lay.nodes[0].learner_ranks == list(range(8))  # rank 0 (the controller) on node 0
    assert [len(n.engines) for n in lay.nodes] == [0, 0, 0, 0, 2, 2, 2, 2]
    assert lay.nodes[4].engine_devices == [[0, 1, 2, 3], [4, 5, 6, 7]]
    ranks = sorted(r for n in lay.nodes for r in n.learner_ranks)
    assert ranks == list(range(32))


@pytest.mark.parametrize(
    ("train", "rollout", "nnodes", "tp", "message"),
    [
        (32, 32, 4, 4, "do not fit"),
        (6, 8, 2, 4, "span nodes"),
        (8, 6, 2, 4, "multiple of tensor_parallel_size"),
        (8, 0, 2, 4, "at least 1"),
        (8, 16, 3, 16, "exceeds"),
    ],
)
def test_impossible_layouts_are_refused(train, rollout, nnodes, tp, message):
    with pytest.raises(PlacementError, match=message):
        layout(train, rollout, nnodes, 8, tp)


def test_cpu_layout_two_nodes():
    lay = layout(0, 0, nnodes=2, gpus_per_node=8, tensor_parallel_size=1, learner_ranks_per_node=1)
    assert not lay.on_gpu and lay.learner_world == 2
    assert [n.learner_ranks for n in lay.nodes] == [[0], [1]]
    assert [n.engines for n in lay.nodes] == [[0], [1]]


@pytest.mark.parametrize(
    "cores, tp, bind",
    [
        ([0, 1], 1, "0,1"),
        ([0, 1, 2, 3], 2, "0,1|2,3"),  # equal runs of the engine's cores
        ([4, 5, 6, 7, 8], 2, "4,5|6,7"),  # a core left over stays idle rather than unbalance the workers
        ([0, 1], 4, "0|1|0|1"),  # fewer cores than workers: shared round-robin
        ([3], 2, "3|3"),
    ],
)
def test_engine_core_binding(cores, tp, bind):
    assert engine_core_binding(cores, tp) == bind


def test_cpu_layout_keeps_tensor_parallel_size():
    lay = layout(0, 0, nnodes=1, gpus_per_node=8, tensor_parallel_size=4, workers_per_node=2)
    assert not lay.on_gpu and lay.tensor_parallel_size == 4 and lay.n_engines == 2
    with pytest.raises(PlacementError, match="tensor_parallel_size 0"):
        layout(0, 0, 1, 8, 0)


def test_memory_plan_qwen32b():
    shape = model_shape("/models/Qwen2.5-32B")  # no config.json here: the published architecture
    assert 32.5e9 < shape.params < 33.0e9
    recipe = ["train.micro_batch_size=1", "rollout.max_model_len=22528", "train.gradient_checkpointing=true"]
    unchunked = estimate_memory(shape, load_config(None, [*recipe, "train.zero_stage=3"]), 32, 80.0)
    assert any("train.logit_chunk" in p for p in unchunked.problems)  # a 22.5k x 152k head: 46 GiB
    recipe += ["train.logit_chunk=4096"]
    recipe += ["rollout.tensor_parallel_size=4", "rollout.gpu_memory_utilization=0.85"]
    z3 = estimate_memory(shape, load_config(None, [*recipe, "train.zero_stage=3"]), 32, 80.0)
    z1 = estimate_memory(shape, load_config(None, [*recipe, "train.zero_stage=1"]), 32, 80.0)
    assert not z3.problems and z1.problems and "zero_stage" in z1.problems[0]
    assert sum(z3.learner.values()) < 80 < sum(z1.learner.values())
    assert z3.kv_tokens_per_engine > 22528
    tp1 = estimate_memory(shape, load_config(None, [*recipe, "train.zero_stage=3"]), 32, 80.0, 1)
    assert any("tensor_parallel_size" in p for p in tp1.problems)  # 61 GiB of bf16 weights on one card


def test_memory_plan_counts_offloaded_state_in_host_memory_and_advises_what_applies():
    """Qwen2.5-7B on 4 learner GPUs with the 32B recipe's sequence settings (configs/vapo_qwen2.5_7b.yaml
    without its offload): over an 80 GB card; the advice names the offloads, not the ZeRO stage (already 3)
    nor gradient checkpointing (already on); with the offload the optimizer state and fp32 gradient
    partition are host memory and the card fits."""
    shape = model_shape("/models/Qwen2.5-7B")
    recipe = load_config(Path(__file__).resolve().parents[1] / "configs" / "vapo_qwen2.5_7b.yaml").train
    assert recipe.offload_optimizer and recipe.zero_stage == 3 and recipe.gradient_checkpointing
    base = ["train.zero_stage=3", "train.gradient_checkpointing=true", "train.max_tokens_per_micro=22528",
            "rollout.max_model_len=22528", "train.logit_chunk=4096", "rollout.tensor_parallel_size=1"]  # fmt: skip
    full = estimate_memory(shape, load_config(None, base), 4, 80.0)
    (problem,) = [p for p in full.problems if "learner GPU" in p]
    assert "train.offload_optimizer=true" in problem and "train.offload_params=true" in problem
    assert "raise train.zero_stage" not in problem and "gradient_checkpointing" not in problem
    assert not full.learner_host
    off = estimate_memory(shape, load_config(None, [*base, "train.offload_optimizer=true"]), 4, 80.0)
    assert not off.problems and set(off.learner_host) == {"optimizer", "gradients"}
    assert off.learner_host["optimizer"] == pytest.approx(full.learner["optimizer"])
    assert sum(off.learner.values()) == pytest.approx(
        sum(full.learner.values()) - full.learner["optimizer"] - full.learner["gradients"]
    )
    both = estimate_memory(
        shape,
        load_config(None, [*base, "train.offload_optimizer=true", "train.offload_params=true"]),
        4,
        80.0,
    )
    assert "weights" in both.learner_host and "weights" not in both.learner
    assert "learner host memory per rank (offloaded)" in both.describe(80.0)


def test_model_shape_from_config_json(tiny_model_dir):
    import json

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    shape = model_shape(str(tiny_model_dir))
    assert shape.layers == cfg["num_hidden_layers"] and shape.vocab == cfg["vocab_size"]
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert abs(shape.params - n) / n < 0.01


@pytest.mark.parametrize("checkpointing", [True, False])
def test_memory_plan_is_within_a_trace_of_the_learners_own_pass(checkpointing):
    """The plan's activation coefficients against torch's memory tracker on the learner's policy pass
    (FakeTensorMode: shapes only), on a slice at small widths; bench/memory_trace.py runs the 32B slice
    (plan/trace 1.12). The path without the scoring head (the model returns [K, V] logits) needs more."""
    from async_vapo.cluster.memory import ModelShape
    from async_vapo.cluster.trace import trace_policy_pass

    shape = ModelShape(layers=2, hidden=256, intermediate=1024, heads=4, kv_heads=2, vocab=16384)
    now = trace_policy_pass(shape, 2048, 1800, 256, checkpointing)
    assert 1.0 <= now["plan_over_trace"] <= 1.2, now
    before = trace_policy_pass(shape, 2048, 1800, 256, checkpointing, scoring_head=False)
    assert before["trace_gib"] > 1.3 * now["trace_gib"], (before, now)


def test_memory_plan_of_an_adapter_publish_counts_the_adapter_not_the_model():
    """configs/vapo_qwen2.5_7b_lora.yaml's policy LoRA on Qwen2.5-7B: a snapshot publish of the merged
    weights holds a copy of the model (14 GiB) on learner rank 0; with ``model.lora_publish=adapter`` it
    holds the rank-32 adapter (0.15 GiB), and the engine's receive is the adapter's, not a bucket."""
    from async_vapo.cluster.memory import lora_params

    shape = model_shape("/models/Qwen2.5-7B")
    lora = ["model.lora_rank=32", "model.critic_lora_rank=32", "train.zero_stage=2", "train.publish=snapshot"]
    merged = estimate_memory(shape, load_config(None, lora), 2, 80.0)
    adapter = estimate_memory(shape, load_config(None, [*lora, "model.lora_publish=adapter"]), 2, 80.0)
    adapter_bytes = 2.0 * lora_params(shape, 32, load_config().model.lora_target_modules)
    assert merged.learner["publish"] == pytest.approx(2.0 * shape.params / 2**30)
    assert adapter.learner["publish"] == pytest.approx(adapter_bytes / 2**30)
    assert 0.1 < adapter.learner["publish"] < 0.2 < 13 < merged.learner["publish"]
    assert adapter.engine["weight_receive"] == pytest.approx(3 * adapter_bytes / 2**30)
    assert adapter.engine["weight_receive"] < merged.engine["weight_receive"]
