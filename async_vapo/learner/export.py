"""Hugging Face directories out of a (possibly ZeRO-3 partitioned) model, never holding it whole.

``save_pretrained`` on a ZeRO-3 model needs every parameter gathered at once: each rank then holds the
whole model on its device (about 61 GiB for a 32B model in bf16) on top of its ZeRO state. Here every rank
walks the parameters in the same order and gathers one at a time (a collective; a no-op below ZeRO-3); the
writing rank copies it to host memory and releases it, and writes a safetensors shard whenever the
shard reaches ``shard_bytes``. Peak extra memory on the writing rank: one gathered parameter on the device
and about one shard in host memory. The files are what ``save_pretrained`` writes: ``model.safetensors``
when the model fits one shard (byte for byte the same), else ``model-0000k-of-0000N.safetensors`` with
``model.safetensors.index.json``; plus ``config.json`` (and ``generation_config.json`` for a generator).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from async_vapo.weight_sync.publish import zero3_gather

DEFAULT_SHARD_BYTES = 2 * 2**30
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
Gather = Callable[[list[torch.nn.Parameter]], Any]


def host_tensors(
    module: torch.nn.Module, writer: bool, gather: Gather = zero3_gather
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Every tensor of ``module``'s state dict (parameters, shared ones once, then persistent buffers; a
    LoRA layer's weight merged with its adapter, the adapters left out), whole and on the host for the
    writer (None elsewhere), one at a time. Every rank must drain it:
    each parameter's gather is a collective of the learner world."""
    from async_vapo.learner.lora import published

    kept = set(module.state_dict().keys())
    for name, p, value in published(module):  # LoRA: adapters merged into their layers' weights
        with gather([p]), torch.no_grad():
            yield (
                name,
                (value() if value is not None else p.detach()).to("cpu", copy=True) if writer else None,
            )
    for name, b in module.named_buffers():
        if name in kept:
            yield name, b.detach().to("cpu", copy=True) if writer else None


def write_safetensors(
    tensors: Iterator[tuple[str, torch.Tensor | None]], out: Path, shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[str]:
    """Write ``tensors`` (None entries are drained and skipped) into ``out`` as safetensors shards of at
    most ``shard_bytes`` each (a larger tensor gets one of its own); returns the file names written."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    written: list[str] = []
    weight_map: dict[str, str] = {}

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"part-{len(written):05d}.tmp"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            written.append(name)
            weight_map.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for name, t in tensors:
        if t is None:
            continue
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[name] = t.contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        os.replace(out / written[0], out / SINGLE)
        return [SINGLE]
    final = {tmp: f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i, tmp in enumerate(written)}
    for tmp, name in final.items():
        os.replace(out / tmp, out / name)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*final.values(), INDEX]


def save_hf(
    module: Any,
    out: Path,
    writer: bool,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    gather: Gather = zero3_gather,
) -> None:
    """``module.save_pretrained(out)`` for a model that may be partitioned: every rank calls it, the
    ``writer`` writes. Peak extra memory: one parameter on the device, about one shard on the host."""
    tensors = host_tensors(module, writer, gather)
    if not writer:
        for _ in tensors:
            pass
        return
    write_safetensors(tensors, out, shard_bytes)
    module.config.save_pretrained(out)
    if getattr(module, "can_generate", lambda: False)() and getattr(module, "generation_config", None):
        module.generation_config.save_pretrained(out)
