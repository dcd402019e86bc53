"""Publish memory under ZeRO-3: the whole-model gather + snapshot (the old path) vs the streamed publish.

Two DeepSpeed learner ranks (gloo, CPU) hold a synthetic transformer of at least 300 M parameters under
ZeRO-3; learner rank 0 publishes it to a receiving process (the engine's side of a weight group) in both
ways, in the same run:
- ``snapshot``: ``GatheredParameters`` over every parameter, then ``snapshot`` (a flat copy of the whole
  model), then the broadcast,
- ``stream``: ``stream_publish``: gather, copy, send and free one bucket at a time.
For each it reports rank 0's peak resident memory during the publish above its steady state
(``publish_peak_extra_mb``, sampled every 2 ms from /proc), the seconds, and that the receiver got every
byte right (a checksum of the received tensors against the full model). Used by ``weight_sync.py``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from typing import Any

import torch

MB = 2**20


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


class PeakRss:
    """Samples this process's RSS in a thread while the block runs."""

    def __enter__(self) -> PeakRss:
        self.base = _rss_mb()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def extra_mb(self) -> float:
        return self.peak - self.base


def synthetic_model(
    layers: int, hidden: int = 1024, inter: int = 4096, vocab: int = 32000
) -> torch.nn.Module:
    """Qwen-shaped parameter set (embeddings, q/k/v/o, gated MLP, norms, untied head), no forward."""
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.embed = torch.nn.Embedding(vocab, hidden)
    blocks = torch.nn.ModuleList()
    for _ in range(layers):
        b = torch.nn.Module()
        for name, (o, i) in {
            "q": (hidden, hidden),
            "k": (hidden // 4, hidden),
            "v": (hidden // 4, hidden),
            "o": (hidden, hidden),
            "gate": (inter, hidden),
            "up": (inter, hidden),
            "down": (hidden, inter),
        }.items():
            setattr(b, name, torch.nn.Linear(i, o, bias=False))
        b.norm = torch.nn.LayerNorm(hidden)
        blocks.append(b)
    m.layers = blocks
    m.head = torch.nn.Linear(hidden, vocab, bias=False)
    return m


def _receiver(port: int, q: Any, out: Any) -> None:
    """The engine's end: receive every bucket of every publish, report a checksum per publish."""
    from async_vapo.weight_sync.buckets import empty_flat
    from async_vapo.weight_sync.group import GroupSpec, broadcast, join_group

    torch.set_num_threads(1)
    pg = join_group(GroupSpec("127.0.0.1", port, 2, "gloo", 600.0), 1)
    while (buckets := q.get()) is not None:
        total = 0.0
        for bucket in buckets:
            flat = empty_flat(bucket)
            broadcast(pg, flat)
            total += float(flat.double().sum())
            del flat
        out.put(total)


def _rank(
    rank: int, port: int, wport: int, layers: int, vocab: int, bucket_mb: float, q: Any, out: Any, res: Any
) -> None:
    from async_vapo.learner.models import local_rank_env

    os.environ.update(local_rank_env(rank, 2, port))
    torch.set_num_threads(1)
    import deepspeed

    from async_vapo.learner.models import init_distributed
    from async_vapo.weight_sync.broadcast import snapshot
    from async_vapo.weight_sync.group import GroupSpec, broadcast, join_group
    from async_vapo.weight_sync.publish import StreamPlan, stream_publish

    init_distributed("gloo")
    with deepspeed.zero.Init():  # built partitioned: no rank ever holds the whole model
        model = synthetic_model(layers, vocab=vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        config={
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3},
            "zero_allow_untested_optimizer": True,
        },
    )
    params = list(engine.module.named_parameters())
    n_params = sum(int(torch.Size(getattr(p, "ds_shape", p.shape)).numel()) for _, p in params)
    pg = join_group(GroupSpec("127.0.0.1", wport, 2, "gloo", 600.0), 0) if rank == 0 else None
    bucket_bytes = int(bucket_mb * MB)
    plan = StreamPlan.of(params, bucket_bytes)
    figures: dict[str, Any] = {"params_m": round(n_params / 1e6, 1), "model_mb": round(plan.nbytes / MB, 1)}
    import gc

    figures["dtype"] = str(params[0][1].dtype).removeprefix("torch.")
    for mode in ("snapshot", "stream"):
        gc.collect()
        torch.distributed.barrier()
        with PeakRss() as peak:
            t0 = time.perf_counter()
            if mode == "stream":
                if rank == 0:
                    q.put(plan.buckets)

                def send(flat: torch.Tensor) -> None:
                    broadcast(pg, flat)

                stream_publish(plan, send if rank == 0 else None, "cpu")
            else:
                with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                    if rank == 0:
                        snap = snapshot(1, engine.module.named_parameters(), bucket_bytes)
                        q.put(snap.buckets)
                        for flat in snap.flats:
                            broadcast(pg, flat)
                        del snap
            seconds = time.perf_counter() - t0
        if rank == 0:
            got = out.get()
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                want = sum(float(p.detach().double().sum()) for _, p in params)
            figures[mode] = {
                "publish_peak_extra_mb": round(peak.extra_mb, 1),
                "seconds": round(seconds, 2),
                "received_ok": abs(got - want) <= 1e-6 * max(1.0, abs(want)),
            }
        else:
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                pass
    if rank == 0:
        q.put(None)
        res.put(figures)


def zero3_publish(layers: int = 18, bucket_mb: float = 64.0, vocab: int = 32000) -> dict[str, Any]:
    """Runs the comparison (2 learner ranks + 1 receiver, spawned); returns rank 0's figures."""
    # glibc keeps freed allocations below its (self-raising) mmap threshold in the heap, where RSS would
    # not show them leave; a fixed 1 MiB threshold makes RSS follow the live tensors
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    ctx = mp.get_context("spawn")
    port, wport = _port(), _port()
    q, out, res = ctx.Queue(), ctx.Queue(), ctx.Queue()
    recv = ctx.Process(target=_receiver, args=(wport, q, out))
    recv.start()
    ranks = [
        ctx.Process(target=_rank, args=(r, port, wport, layers, vocab, bucket_mb, q, out, res))
        for r in (0, 1)
    ]
    for p in ranks:
        p.start()
    figures = res.get(timeout=1800)
    for p in [*ranks, recv]:
        p.join(60)
    stream, snap = figures["stream"], figures["snapshot"]
    figures["publish_peak_extra_mb"] = stream["publish_peak_extra_mb"]
    figures["stream_extra_vs_model"] = round(stream["publish_peak_extra_mb"] / figures["model_mb"], 3)
    figures["snapshot_extra_vs_model"] = round(snap["publish_peak_extra_mb"] / figures["model_mb"], 3)
    figures["bucket_mb"] = bucket_mb
    figures["largest_tensor_mb"] = round(vocab * 1024 * 2 / MB, 1)  # embedding / head (bf16)
    return figures


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    import json

    print(json.dumps(zero3_publish()))
