"""Checkpoint-export memory under ZeRO-3: the whole-model gather (the old path) vs one parameter at a time.

Two DeepSpeed ranks (gloo, CPU) hold a Qwen2-shaped policy and a value model (``ValueModel`` on a Qwen2
backbone) built partitioned (``deepspeed.zero.Init``). Rank 0 writes each the old way
(``GatheredParameters`` over every parameter, then ``save_pretrained``) and the new way
(``learner.export.save_hf`` / ``ValueModel.save``: each parameter gathered, copied to host and released,
safetensors shards of ``shard_bytes``), in the same run; then both ranks load the exported policy back
the old way (``from_pretrained``: the whole model on every rank) and the learner's way under ZeRO-3
(``learner.loading``: built partitioned, one parameter gathered at a time). For each it reports rank 0's peak resident memory
above its steady state (sampled every 2 ms from /proc: the CPU proxy of GPU memory, where a gathered
parameter lives), and whether the new files hold exactly the old files' tensors. Used by
``bench/weight_sync.py`` (``export_peak_extra_mb``, ``save_peak_extra_mb``) and by
``tests/test_zero3_export.py``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

MB = 2**20


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    got: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        got |= load_file(str(f))
    return got


def _same(a: Path, b: Path) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _rank(
    rank: int, port: int, layers: int, hidden: int, vocab: int, shards: int, out: str, res: Any
) -> None:
    from async_vapo.learner.models import local_rank_env

    os.environ.update(local_rank_env(rank, 2, port))
    torch.set_num_threads(1)
    import deepspeed
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

    from async_vapo.learner.export import save_hf
    from async_vapo.learner.models import ValueModel, init_distributed

    from zero3_publish import PeakRss

    init_distributed("gloo")
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    fp32 = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": False},
    }
    with deepspeed.zero.Init(config_dict_or_path=fp32):  # built partitioned: no rank holds the whole model
        policy = Qwen2ForCausalLM(cfg)
        value = ValueModel(Qwen2Model(cfg), hidden)
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    ds |= {"zero_allow_untested_optimizer": True}
    engines = {}
    for name, model in (("export", policy), ("save", value)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        engines[name], *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    root = Path(out)
    figures: dict[str, Any] = {}
    for name, engine in engines.items():
        module = engine.module
        numel = sum(int(torch.Size(getattr(p, "ds_shape", p.shape)).numel()) for p in module.parameters())
        model_mb = numel * 4 / MB
        shard_bytes = int(model_mb * MB / shards)
        import gc

        for mode in ("whole_gather", "one_at_a_time"):
            gc.collect()
            torch.distributed.barrier()
            dest = root / f"{name}-{mode}"
            with PeakRss() as peak:
                if mode == "whole_gather":  # what learner/main.py and checkpoint.py did before
                    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                        if rank == 0:
                            if name == "export":
                                module.save_pretrained(dest, safe_serialization=True)
                            else:
                                module.backbone.save_pretrained(dest, safe_serialization=True)
                elif name == "export":
                    save_hf(module, dest, writer=rank == 0, shard_bytes=shard_bytes)
                else:
                    module.save(dest, writer=rank == 0, shard_bytes=shard_bytes)
            torch.distributed.barrier()
            if rank == 0:
                figures[f"{name}_{mode}_peak_extra_mb"] = round(peak.extra_mb, 1)
        if rank == 0:
            figures[f"{name}_model_mb"] = round(model_mb, 1)
            figures[f"{name}_files_identical"] = _same(
                root / f"{name}-whole_gather", root / f"{name}-one_at_a_time"
            )
    figures |= _load_figures(rank, root / "export-one_at_a_time", engines["export"].module)
    if rank == 0:
        res.put(figures)


def _load_figures(rank: int, ckpt: Path, source: Any) -> dict[str, Any]:
    """Loading the exported policy back: ``from_pretrained`` (whole on the rank: the old path) against
    ``learner.models.load_policy`` with a ZeRO-3 config (built partitioned, filled one parameter at a
    time); every rank's peak extra resident memory, and whether the loaded parameters equal the source's."""
    import gc

    import deepspeed

    from async_vapo.learner.models import load_policy

    from zero3_publish import PeakRss

    figures: dict[str, Any] = {}
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
    for mode, config in (("whole", None), ("partitioned", ds)):
        gc.collect()
        torch.distributed.barrier()
        with PeakRss() as peak:
            model = load_policy(str(ckpt), torch.float32, config)
        torch.distributed.barrier()
        peaks = [0.0, 0.0]
        torch.distributed.all_gather_object(peaks, peak.extra_mb)
        figures[f"load_{mode}_peak_extra_mb"] = round(max(peaks), 1)
        # what the rank holds as parameters (what deepspeed.initialize moves to its GPU): safetensors are
        # memory-mapped, so the whole load's host RSS undercounts it
        held = sum(
            getattr(p, "ds_tensor", p).numel() * p.element_size() + (p.numel() if hasattr(p, "ds_id") else 0)
            for p in model.parameters()
        )
        figures[f"load_{mode}_params_on_rank_mb"] = round(held / MB, 1)
        same = True
        for p, q in zip(model.parameters(), source.parameters(), strict=True):
            params = [x for x in (p, q) if hasattr(x, "ds_id")]
            with deepspeed.zero.GatheredParameters(params):
                same = same and p.dtype == q.dtype == torch.float32 and torch.equal(p.data, q.data)
        figures[f"load_{mode}_identical"] = same
        del model
    # in bf16, buffers computed at construction (RoPE's inv_freq) stay what from_pretrained makes (fp32)
    bf16 = ds | {"bf16": {"enabled": True}}
    whole, parts = load_policy(str(ckpt), torch.bfloat16), load_policy(str(ckpt), torch.bfloat16, bf16)
    pairs = zip(whole.named_buffers(), parts.named_buffers(), strict=True)
    figures["load_bf16_buffers_identical"] = all(
        a == b and x.dtype == y.dtype and torch.equal(x, y) for (a, x), (b, y) in pairs
    )
    figures["load_bf16_param_dtypes"] = sorted({str(p.dtype) for p in parts.parameters()})
    return figures


def zero3_export(layers: int = 8, hidden: int = 1024, vocab: int = 32000, shards: int = 16) -> dict[str, Any]:
    """Runs the comparison on 2 spawned ranks; returns rank 0's figures, with ``export_peak_extra_mb``
    and ``save_peak_extra_mb`` (the new path) and their ratios to the model's size."""
    import sys

    os.environ.setdefault(
        "MALLOC_MMAP_THRESHOLD_", str(1 << 20)
    )  # RSS follows freed tensors (see zero3_publish)
    bench = str(Path(__file__).resolve().parent)
    if bench not in sys.path:
        sys.path.insert(0, bench)
    os.environ["PYTHONPATH"] = os.pathsep.join([bench, os.environ.get("PYTHONPATH", "")])
    from zero3_publish import _port

    out = tempfile.mkdtemp(prefix="zero3_export_")
    ctx = mp.get_context("spawn")
    res = ctx.Queue()
    port = _port()
    procs = [
        ctx.Process(target=_rank, args=(r, port, layers, hidden, vocab, shards, out, res)) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    try:
        figures = res.get(timeout=1800)
    finally:
        for p in procs:
            p.join(60)
        shutil.rmtree(out, ignore_errors=True)
    figures["load_model_mb"] = figures["export_model_mb"]
    for name in ("whole", "partitioned"):
        for what in ("peak_extra", "params_on_rank"):
            figures[f"load_{name}_{what}_vs_model"] = round(
                figures[f"load_{name}_{what}_mb"] / figures["load_model_mb"], 3
            )
    for name in ("export", "save"):
        figures[f"{name}_peak_extra_mb"] = figures[f"{name}_one_at_a_time_peak_extra_mb"]
        figures[f"{name}_extra_vs_model"] = round(
            figures[f"{name}_peak_extra_mb"] / figures[f"{name}_model_mb"], 3
        )
        old = figures[f"{name}_whole_gather_peak_extra_mb"]
        figures[f"{name}_whole_gather_extra_vs_model"] = round(old / figures[f"{name}_model_mb"], 3)
    return figures


if __name__ == "__main__":
    import json

    print(json.dumps(zero3_export()))
