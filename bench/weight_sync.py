"""Weight-sync benchmark: learner rank 0 -> one rollout engine over the dedicated gloo group (loopback),
then the publish's and the checkpoint export's memory under ZeRO-3 (``zero3_publish.py``,
``zero3_export.py``) and the fan-out over learner ranks
(``fanout.py``).

For two state dicts, the tiny model and a synthetic transformer of at least 500 MB (fp32), it times
- ``per_tensor``: one broadcast per tensor (what a naive implementation does),
- ``bucketed``: our path: ``snapshot`` (taken before the clock starts, as the learner does while the
  engines still sample) lays the tensors out in ``--bucket-mb`` flat buffers, ``EngineLink.send``
  broadcasts them, the receiver receives each bucket into its buffer from the previous update (``FlatPool``) and views
  its tensors out of it (``unpack``), as the rollout engine's ``WeightReceiver`` does before loading,
- ``flat``: one broadcast of one preallocated flat buffer of the same size: the ceiling,
each from the sender's first byte to the receiver's acknowledgement that it holds every byte. Then, with ``--engine`` (default on), the real thing: the tiny model broadcast into a live vLLM CPU
engine through ``RolloutEngine.load_weights``, whose duration is the time the engine is paused for a
weight update (after in-flight requests drained); and under a policy LoRA, the merged weights against
the adapter alone into one live engine (``lora_sync.py``). Prints one JSON object on its last line.

    .venv/bin/python bench/weight_sync.py [--reps 3] [--synthetic-mb 512] [--bucket-mb 64] [--no-engine]
        [--no-zero3] [--zero3-layers 18] [--no-fanout] [--no-lora] [--lora-rank 32]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time

import torch

from async_vapo.cluster.ports import free_port
from async_vapo.weight_sync.broadcast import EngineLink, snapshot
from async_vapo.weight_sync.buckets import BucketMeta, FlatPool, plan_buckets, unpack
from async_vapo.weight_sync.group import GroupSpec, broadcast, join_group

MB = 2**20


def synthetic(target_mb: int) -> dict[str, torch.Tensor]:
    """A transformer-shaped fp32 state dict (embeddings, per-layer attention with biases, MLP, norms)."""
    h, inter, vocab = 1024, 2816, 32000
    g = torch.Generator().manual_seed(0)
    out = {"embed_tokens.weight": torch.randn(vocab, h, generator=g)}
    layer = 0
    while sum(t.numel() * 4 for t in out.values()) < target_mb * MB:
        p = f"layers.{layer}."
        for name, shape in (
            ("q_proj.weight", (h, h)),
            ("q_proj.bias", (h,)),
            ("k_proj.weight", (h // 4, h)),
            ("k_proj.bias", (h // 4,)),
            ("v_proj.weight", (h // 4, h)),
            ("v_proj.bias", (h // 4,)),
            ("o_proj.weight", (h, h)),
            ("gate_proj.weight", (inter, h)),
            ("up_proj.weight", (inter, h)),
            ("down_proj.weight", (h, inter)),
            ("input_layernorm.weight", (h,)),
            ("post_attention_layernorm.weight", (h,)),
        ):
            out[p + name] = torch.randn(*shape, generator=g)
        layer += 1
    return out


def tiny() -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from async_vapo.tasks.tiny_model import ensure_tiny_model

    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(progress=False))
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def plans(tensors: dict[str, torch.Tensor], bucket_mb: float) -> dict[str, list[BucketMeta]]:
    return {
        "per_tensor": plan_buckets(tensors.items(), 0),
        "bucketed": plan_buckets(tensors.items(), int(bucket_mb * MB)),
    }


def receiver(spec: GroupSpec, payloads: dict[str, dict[str, list[BucketMeta]]], sizes, reps: int) -> None:
    torch.set_num_threads(1)
    pg = join_group(spec, 1)
    ack = torch.zeros(1)
    for name, methods in payloads.items():
        flat = torch.empty(sizes[name], dtype=torch.uint8)
        pools = {m: FlatPool() for m in methods}
        for _ in range(reps):
            for method in ("per_tensor", "bucketed", "flat"):
                if method == "flat":
                    broadcast(pg, flat)
                else:
                    received = []
                    for i, bucket in enumerate(methods[method]):
                        buf = pools[method].get(i, bucket)
                        broadcast(pg, buf)
                        received.extend(unpack(bucket, buf))
                    assert len(received) == sum(len(b) for b in methods[method])
                broadcast(pg, ack, root=1)


def sender(spec: GroupSpec, tensors: dict[str, dict[str, torch.Tensor]], bucket_mb: float, reps: int):
    link = EngineLink(spec)
    link.connect()
    assert link.pg is not None
    ack = torch.zeros(1)
    results: dict[str, dict[str, list[float]]] = {}
    for name, state in tensors.items():
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        flat = torch.zeros(nbytes, dtype=torch.uint8)
        res = results[name] = {"per_tensor": [], "bucketed": [], "flat": [], "snapshot": []}
        for rep in range(reps):
            t0 = time.perf_counter()
            snap = snapshot(rep, state.items(), int(bucket_mb * MB))
            res["snapshot"].append(time.perf_counter() - t0)
            for method in ("per_tensor", "bucketed", "flat"):
                t0 = time.perf_counter()
                if method == "flat":
                    broadcast(link.pg, flat)
                elif method == "bucketed":
                    link.send(snap)
                else:
                    for t in state.values():
                        broadcast(link.pg, t)
                broadcast(link.pg, ack, root=1)
                res[method].append(time.perf_counter() - t0)
    return results


def engine_pause(bucket_mb: float, reps: int) -> dict[str, float]:
    """The tiny model into a live vLLM engine: broadcast + load, as the rollout worker does it."""
    import asyncio

    from async_vapo.rollout.engine import EngineConfig, RolloutEngine
    from async_vapo.tasks.tiny_model import ensure_tiny_model

    path = str(ensure_tiny_model(progress=False))
    state = tiny()
    engine = RolloutEngine(EngineConfig(path, dtype="float32"))
    spec = GroupSpec("127.0.0.1", free_port(), 2, "gloo", 60.0)
    link = EngineLink(spec)
    loop = asyncio.new_event_loop()
    connect = threading.Thread(target=link.connect)
    connect.start()
    loop.run_until_complete(engine.init_weight_group(spec))
    connect.join()
    pauses, sends = [], []
    try:
        for v in range(1, reps + 1):
            snap = snapshot(v, state.items(), int(bucket_mb * MB))
            box: list[float] = []
            th = threading.Thread(target=lambda s=snap, b=box: b.append(link.send(s)))
            t0 = time.perf_counter()
            th.start()
            loop.run_until_complete(engine.load_weights(snap.buckets, v))
            pauses.append(time.perf_counter() - t0)
            th.join()
            sends.append(box[0])
    finally:
        engine.shutdown()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    return {
        "model_mb": round(nbytes / MB, 2),
        "paused_s_median": round(statistics.median(pauses), 4),
        "broadcast_s_median": round(statistics.median(sends), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--synthetic-mb", type=int, default=512)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--no-zero3", action="store_true", help="skip the 2-rank ZeRO-3 publish-memory case")
    ap.add_argument("--zero3-layers", type=int, default=18, help="synthetic model: 18 layers = 339 M params")
    ap.add_argument("--no-fanout", action="store_true", help="skip the 1/2/4-engine fan-out case")
    ap.add_argument("--no-lora", action="store_true", help="skip the merged vs adapter-only LoRA case")
    ap.add_argument("--lora-hidden", type=int, default=1024)
    ap.add_argument("--lora-layers", type=int, default=8)
    ap.add_argument("--lora-rank", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    states = {"tiny": tiny(), f"synthetic_{args.synthetic_mb}mb": synthetic(args.synthetic_mb)}
    sizes = {k: sum(t.numel() * t.element_size() for t in s.values()) for k, s in states.items()}
    spec = GroupSpec("127.0.0.1", free_port(), 2, "gloo", 600.0)
    ctx = mp.get_context("spawn")
    payloads = {k: plans(s, args.bucket_mb) for k, s in states.items()}
    recv = ctx.Process(target=receiver, args=(spec, payloads, sizes, args.reps))
    recv.start()
    raw = sender(spec, states, args.bucket_mb, args.reps)
    recv.join(60)
    report: dict = {"bench": "weight_sync", "backend": "gloo", "bucket_mb": args.bucket_mb, "reps": args.reps}
    for name, res in raw.items():
        mb = sizes[name] / MB
        med = {m: statistics.median(v) for m, v in res.items()}
        report[name] = {
            "size_mb": round(mb, 1),
            "tensors": len(states[name]),
            "buckets": len(payloads[name]["bucketed"]),
            **{f"{m}_s": round(s, 4) for m, s in med.items()},
            **{f"{m}_MBps": round(mb / s, 1) for m, s in med.items() if m != "snapshot"},
            "bucketed_vs_flat": round(med["flat"] / med["bucketed"], 3),
            "per_tensor_vs_flat": round(med["flat"] / med["per_tensor"], 3),
        }
        print(
            f"{name}: {mb:.1f} MB in {len(states[name])} tensors | per-tensor {med['per_tensor']:.3f} s, "
            f"bucketed {med['bucketed']:.3f} s, flat {med['flat']:.3f} s | bucketed = "
            f"{med['flat'] / med['bucketed']:.0%} of the ceiling",
            file=sys.stderr,
        )
    if not args.no_engine:
        report["engine_tiny"] = engine_pause(args.bucket_mb, args.reps)
    if not args.no_lora:
        from lora_sync import lora_sync

        lo = report["lora"] = lora_sync(
            args.lora_hidden, args.lora_layers, args.lora_rank, args.bucket_mb, args.reps
        )
        print(
            f"LoRA rank {lo['rank']} on a {lo['model']} model: merged update {lo['merged_mb']} MB, "
            f"{lo['merged_s_median']:.3f} s; adapter update {lo['adapter_mb']} MB, {lo['adapter_s_median']:.3f} s "
            f"({lo['paused_ratio_merged_vs_adapter']}x shorter pause, {lo['bytes_ratio']}x fewer bytes); decode "
            f"{lo['base_tokens_per_s']} tok/s without the adapter, {lo['adapter_tokens_per_s']} with it",
            file=sys.stderr,
        )
    if not args.no_zero3:
        from zero3_publish import zero3_publish

        # two proportions: the largest tensor (embedding / LM head) at 2.8% of the model, as in
        # Qwen2.5-32B (2.4%), and at 10% (a 32k vocabulary on a small model): the floor is that tensor
        for label, vocab in (("qwen32b_proportions", 8000), ("large_vocab", 32000)):
            z3 = report[f"zero3_2ranks_{label}"] = zero3_publish(args.zero3_layers, args.bucket_mb, vocab)
            print(
                f"ZeRO-3 publish, 2 ranks, {z3['params_m']} M params ({z3['model_mb']} MB, largest tensor "
                f"{z3['largest_tensor_mb']} MB): peak extra on rank 0 stream {z3['stream']['publish_peak_extra_mb']}"
                f" MB ({z3['stream_extra_vs_model']:.0%} of the model), whole-model snapshot "
                f"{z3['snapshot']['publish_peak_extra_mb']} MB ({z3['snapshot_extra_vs_model']:.0%})",
                file=sys.stderr,
            )
        # the top-level figures are the less favourable case
        report["publish_peak_extra_mb"], report["model_mb"] = z3["publish_peak_extra_mb"], z3["model_mb"]
        from zero3_export import zero3_export

        # checkpoints: the policy's HF export and the critic's save, one parameter at a time
        ex = report["zero3_2ranks_export"] = zero3_export(layers=8, hidden=1024, vocab=8000, shards=32)
        report["export_peak_extra_mb"] = ex["export_peak_extra_mb"]
        report["save_peak_extra_mb"] = ex["save_peak_extra_mb"]
        print(
            f"ZeRO-3 checkpoint, 2 ranks, {ex['export_model_mb']} MB policy: HF export peak extra on rank 0 "
            f"{ex['export_peak_extra_mb']} MB ({ex['export_extra_vs_model']:.0%}; whole-model gather "
            f"{ex['export_whole_gather_extra_vs_model']:.0%}), critic save {ex['save_peak_extra_mb']} MB "
            f"({ex['save_extra_vs_model']:.0%}; whole-model gather {ex['save_whole_gather_extra_vs_model']:.0%})",
            file=sys.stderr,
        )
    if not args.no_fanout:
        from fanout import fanout

        report["fanout"] = fo = fanout()
        print(
            f"fan-out seconds per update, rank 0 feeds all: {fo['rank0_s']}; spread: {fo['spread_s']}",
            file=sys.stderr,
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
