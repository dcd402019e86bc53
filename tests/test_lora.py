"""LoRA (learner/lora.py): the adapted layer against its formula, the merged weights the engines and the
export get, the PEFT-layout adapter files; then the policy and critic trained with adapters through the
launcher on CPU (real vLLM and DeepSpeed); the engines get the merged weights or, with
``model.lora_publish=adapter``, the adapter alone (vLLM's LoRA support, each update in place)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from async_vapo.cluster.memory import lora_params, model_shape
from async_vapo.config import ModelConfig
from async_vapo.learner.lora import (
    LoRALinear,
    adapter_count,
    apply_lora,
    lora_spec,
    published,
    published_adapter,
    save_adapter,
)
from async_vapo.weight_sync.adapter import LoRASpec
from async_vapo.weight_sync.publish import StreamPlan, stream_publish
from tests.test_e2e import launch, rows


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(6, 4)
        self.down_proj = nn.Linear(4, 6, bias=False)
        self.norm = nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down_proj(torch.relu(self.q_proj(x))))


def _adapted(seed: int = 0) -> tuple[Block, Block]:
    torch.manual_seed(seed)
    base = Block()
    model = Block()
    model.load_state_dict(base.state_dict())
    assert apply_lora(model, rank=2, alpha=4.0, targets=["q_proj", "down_proj"]) == 2
    return base, model


def test_fresh_adapters_change_nothing_and_trained_ones_follow_the_formula():
    base, model = _adapted()
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), base(x))  # B starts at zero
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()
    # reference: each adapted layer as x W^T + b + (alpha / r) x A^T B^T, written out
    q, d = model.q_proj, model.down_proj
    h = torch.relu(x @ q.weight.T + q.bias + 2.0 * (x @ q.lora_A.T) @ q.lora_B.T)
    ref = model.norm(h @ d.weight.T + 2.0 * (h @ d.lora_A.T) @ d.lora_B.T)
    torch.testing.assert_close(model(x), ref)
    # only the adapters train; the base weights keep their names and values
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"q_proj.lora_A", "q_proj.lora_B", "down_proj.lora_A", "down_proj.lora_B"}
    assert adapter_count(model) == 2 * (6 + 4) + 2 * (4 + 6)
    torch.testing.assert_close(model.q_proj.weight, base.q_proj.weight)


def test_the_publish_and_the_export_send_merged_weights_under_the_base_names(tmp_path):
    base, model = _adapted(1)
    with torch.no_grad():
        model.q_proj.lora_B.normal_()
        model.down_proj.lora_B.normal_()
    names = [n for n, _, _ in published(model)]
    assert names == [n for n, _ in base.named_parameters()]  # what the engines' model has, no more
    got: list[torch.Tensor] = []
    plan = StreamPlan.of(published(model), 64)  # small buckets: several, some of one parameter
    stream_publish(plan, got.append, "cpu", gather=lambda ps: torch.no_grad())
    sent = torch.cat(got)
    merged = dict(base.named_parameters())
    for m, name in ((model.q_proj, "q_proj.weight"), (model.down_proj, "down_proj.weight")):
        merged[name] = m.weight + 2.0 * m.lora_B @ m.lora_A
    expected = torch.cat([merged[n].detach().reshape(-1) for n, _, _ in (x for b in plan.buckets for x in b)])
    torch.testing.assert_close(sent, expected)

    save_adapter(model, tmp_path / "adapter", base_model="base")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 4.0
    assert cfg["target_modules"] == ["down_proj", "q_proj"]
    files = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(files) == {
        f"base_model.model.{m}.lora_{ab}.weight" for m in ("q_proj", "down_proj") for ab in "AB"
    }
    torch.testing.assert_close(files["base_model.model.q_proj.lora_B.weight"], model.q_proj.lora_B.detach())


def test_the_memory_plan_counts_the_adapters_a_real_model_gets(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from async_vapo.config import load_config

    targets = load_config().model.lora_target_modules
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_lora(model, 4, 8.0, targets)
    assert adapter_count(model) == lora_params(model_shape(str(tiny_model_dir)), 4, targets)


def test_no_matching_layer_is_a_clear_error():
    with pytest.raises(ValueError, match=r"match no linear layer; this model has \['down_proj', 'q_proj'\]"):
        apply_lora(Block(), 2, 4.0, ["c_attn"])


def test_the_adapter_publish_sends_the_adapter_matrices_alone_under_peft_names():
    """model.lora_publish=adapter: what the publisher walks is the adapters (what save_adapter writes)."""
    _, model = _adapted(2)
    named = list(published_adapter(model))
    assert [n for n, _ in named] == [
        f"base_model.model.{m}.lora_{ab}.weight" for m in ("q_proj", "down_proj") for ab in "AB"
    ]
    assert all(p is getattr(getattr(model, n.split(".")[2]), n.split(".")[3]) for n, p in named)
    assert lora_spec(model) == LoRASpec(2, 4.0, ("down_proj", "q_proj"))


@pytest.mark.slow
def test_adapter_updates_replace_the_engines_adapter_in_place(tiny_model_dir):
    """A real rollout worker serving the policy's adapter (vLLM's LoRA on the CPU backend, TP 2: each
    worker loads the whole adapter and keeps its shard), every update the adapter alone: after each the engine's log-probs are transformers' with the adapter applied
    (= merged), not the previous version's; a later update replaces the adapter under requests in flight
    (keep mode), which continue on it; the first one drains them (they carry no adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from async_vapo.weight_sync.broadcast import snapshot
    from tests.rollout_harness import (
        start_worker,
        stop_worker,
        two_updates_then_compare,
        update_while_sampling,
    )

    spec = LoRASpec(4, 8.0, tuple(ModelConfig().lora_target_modules))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = copy.deepcopy(base)
    apply_lora(model, spec.rank, spec.alpha, spec.target_modules)
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    sent: list[int] = []

    def make_version(version: int):
        torch.manual_seed(100 + version)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.lora_A.normal_(std=0.1)
                    m.lora_B.normal_(std=0.1)
        named = [(k, p.detach().clone()) for k, p in published_adapter(model)]
        sent.append(sum(t.numel() * t.element_size() for _, t in named))
        return named, copy.deepcopy(model).eval()

    def while_sampling(version: int, old) -> tuple[int, Any]:
        named, new = make_version(version)
        return update_while_sampling(side, link, tok, snapshot(version, named, 16 * 1024), old, new), new

    side, link, proc = start_worker(tiny_model_dir, tp=2, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, lora=spec)
    try:
        # the first adapter lands while 512 responses are sampled on the base model: they carry no adapter,
        # so the update waits for them (drained) instead of letting them go on without it
        spanning, v1 = while_sampling(1, base)
        assert spanning == 0
        two_updates_then_compare(
            side, link, v1, tok, make_version=make_version, bucket_bytes=16 * 1024, versions=(2, 3)
        )
        # version 4 lands under requests in flight (keep mode): they go on under the new adapter
        spanning, _ = while_sampling(4, copy.deepcopy(model).eval())
        assert spanning > 0
    finally:
        stop_worker(side, proc)
    assert sent[0] == adapter_count(model) * 4 < model_bytes / 5  # the adapter's bytes, not the model's


def test_the_adapted_layers_are_found_as_the_learner_finds_them(tiny_model_dir):
    """What the engine checks vLLM can adapt: the model's linear layers the targets name (built on the meta
    device), not the targets as written (a name that matches no layer is adapted nowhere)."""
    from async_vapo.weight_sync.adapter import adapted_layers

    targets = ("q_proj", "lm_head", "c_attn")
    assert adapted_layers(str(tiny_model_dir), targets) == ["lm_head", "q_proj"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    apply_lora(model, 2, 4.0, targets)
    assert lora_spec(model) == LoRASpec(2, 4.0, ("lm_head", "q_proj"))


def test_adapter_directories_of_dead_engines_are_swept(tmp_path):
    """A SIGKILLed worker never removes the adapter its engine wrote; the next adapter engine on the machine
    removes those whose process is gone, and nothing else."""
    import os
    import subprocess
    import sys

    from async_vapo.rollout.engine import ADAPTER_DIR_PREFIX, remove_orphaned_adapter_dirs

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    names = [
        f"{ADAPTER_DIR_PREFIX}{int(dead.stdout)}-ab",
        f"{ADAPTER_DIR_PREFIX}{os.getpid()}-cd",
        "other-1-ef",
    ]
    for n in names:
        (tmp_path / n / "tp0").mkdir(parents=True)
    assert remove_orphaned_adapter_dirs(str(tmp_path)) == [str(tmp_path / names[0])]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


@pytest.mark.slow
def test_an_adapter_on_a_layer_vllm_cannot_adapt_stops_the_worker_once(tiny_model_dir, capfd):
    """``lm_head`` is a linear layer the learner adapts but vLLM's LoRA does not: every update would fail
    in vLLM's loader and the worker be restarted until its budget ran out. The worker checks at start and
    exits with ``exits.CONFIG`` (its launcher then stops the run instead of restarting it), saying why."""
    import multiprocessing as mp

    from async_vapo.launch.supervisor import _worker_entry
    from async_vapo.rollout import exits
    from async_vapo.rollout.engine import EngineConfig
    from async_vapo.rollout.worker import WorkerConfig

    lora = LoRASpec(4, 8.0, ("q_proj", "lm_head"))
    cfg = WorkerConfig(
        "w0", "tcp://127.0.0.1:9", "tcp://127.0.0.1:9", EngineConfig(str(tiny_model_dir), lora=lora)
    )
    proc = mp.get_context("spawn").Process(target=_worker_entry, args=({}, [], cfg))
    proc.start()
    proc.join(240)
    assert proc.exitcode == exits.CONFIG and not exits.restartable(proc.exitcode)
    err = capfd.readouterr().err
    assert (
        "this engine cannot serve the run's config" in err and "['lm_head']" in err and "lora_publish" in err
    )


@pytest.mark.slow
def test_lora_policy_and_critic_train_through_the_launcher(tiny_model_dir, tmp_path):
    out = tmp_path / "lora"
    # configs/vapo_qwen2.5_7b_lora.yaml's settings (both models adapted, ZeRO-2, the streamed publish), with
    # the engines sent the adapter alone (the merged weights take the full model's path, tested with it)
    lora = ["model.lora_rank=4", "model.critic_lora_rank=4", "model.lora_alpha=8", "model.dtype=float32",
            "train.zero_stage=2", "train.publish=stream", "model.lora_publish=adapter"]  # fmt: skip
    # on-policy and drained: every trained token was sampled by the weights the learner holds, so the
    # engines' log-probs (the base model with the adapter they were sent) must be the learner's
    onpolicy = [
        "train.max_staleness=0",
        "rollout.weight_update=drain",
        "train.actor_lr=2e-3",
        "train.critic_lr=2e-3",
    ]
    res = launch(
        out, *lora, *onpolicy, "train.total_steps=3", "train.eval_every=0", "train.checkpoint_every=0"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    events = [
        json.loads(x) for x in (out / "logs" / "learner-0.log").read_text().splitlines() if x[:1] == "{"
    ]
    (built,) = [e for e in events if e["event"] == "learner models built"]
    n_full = sum(t.numel() for t in load_file(str(tiny_model_dir / "model.safetensors")).values())
    assert 0 < built["trained_params"]["policy"] < n_full / 5  # adapters only
    train = [x for x in rows(out) if x["phase"] == "train"]
    assert [x["step"] for x in train] == [0, 1, 2]
    assert all(abs(x["behaviour_kl"]) < 1e-8 for x in train), [x["behaviour_kl"] for x in train]  # 1e-12 here
    # each engine was sent the adapter (fp32 here), not the model
    adapter_mb = (
        lora_params(model_shape(str(tiny_model_dir)), 4, ModelConfig().lora_target_modules) * 4 / 2**20
    )
    synced = [x["weight_sync_MB"] for x in train if x["weight_syncs"]]
    assert synced and all(s == pytest.approx(adapter_mb) for s in synced), (synced, adapter_mb)

    ckpt = out / "checkpoints" / "step_3"
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(ckpt / "hf" / "model.safetensors"))
    adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    assert (ckpt / "critic_adapter" / "adapter_model.safetensors").exists()
    assert set(after) == set(before)  # the export is the base model's layout, adapters merged in
    scale = 8 / 4
    changed = 0
    for name, w in before.items():
        module = name.removesuffix(".weight")
        key = f"base_model.model.{module}.lora_A.weight"
        if key not in adapter:
            torch.testing.assert_close(after[name], w)  # not adapted: untouched
            continue
        b = adapter[key.replace("lora_A", "lora_B")]
        torch.testing.assert_close(after[name], w + scale * b @ adapter[key], atol=1e-5, rtol=1e-4)
        changed += int(bool((after[name] != w).any()))
    assert changed > 0
    # the trained adapters changed the model noticeably more than the engines and the learner disagree
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        lp = [
            torch.log_softmax(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(ids).logits, -1)
            for d in (tiny_model_dir, ckpt / "hf")
        ]
    assert float((lp[0] - lp[1]).abs().max()) > 1e-2

    # a resume of the adapters and their optimizer state: tests/test_learner.py (exact next-step losses)
