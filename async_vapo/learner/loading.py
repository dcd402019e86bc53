"""Loading a Hugging Face checkpoint into a model built partitioned (ZeRO-3), one parameter at a time.

``from_pretrained`` builds the whole model on every rank (host memory: ranks per node x the model, 8 x 61
GiB per node at 32B, per model), and ``deepspeed.initialize`` then moves a model that is not partitioned to
the rank's GPU whole before partitioning it (61 GiB for the policy, again for the critic). Under ZeRO-3
the learner instead builds each model inside ``deepspeed.zero.Init`` (every parameter partitioned as it is
created, on the rank's device) and fills it from the checkpoint's safetensors files: for each parameter,
the ranks gather it, rank 0 copies that one tensor in from the file, DeepSpeed broadcasts it and partitions
it again. Peak extra memory on any rank: one parameter.

Checkpoint names are matched to the model's as ``from_pretrained`` does for plain layouts: the same name,
or with or without the model's ``base_model_prefix`` (a bare backbone loads from a causal LM's checkpoint).
A parameter the checkpoint lacks is an error (a partitioned model has no sensible default); tensors the
model does not use (a tied ``lm_head.weight``, a reward model's ``score.weight``) are logged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from async_vapo import distributed

log = structlog.get_logger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (sharded checkpoints through their index)."""
    root = Path(path)
    if (root / INDEX).exists():
        weight_map = json.loads((root / INDEX).read_text())["weight_map"]
        return {name: root / f for name, f in weight_map.items()}
    if (root / SINGLE).exists():
        from safetensors import safe_open

        with safe_open(str(root / SINGLE), framework="pt") as f:
            return {name: root / SINGLE for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    raise FileNotFoundError(
        f"no {SINGLE} or {INDEX} in {root} (only safetensors checkpoints load under ZeRO-3)"
    )


def checkpoint_name(name: str, available: dict[str, Path], prefix: str) -> str | None:
    """The checkpoint's name for the model's parameter ``name``: itself, ``prefix.name`` or ``name``
    without ``prefix.``."""
    candidates = [name, f"{prefix}.{name}" if prefix else name]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1 :])
    return next((c for c in candidates if c in available), None)


def _read(file: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:  # opened per tensor: no file stays mapped
        return f.get_tensor(name)


def load_partitioned_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Fill ``model`` (built under ``deepspeed.zero.Init``) from the checkpoint at ``path``, one parameter
    gathered at a time; every rank calls it. Returns the checkpoint's tensors the model did not use.
    Raises ``KeyError`` naming the parameters the checkpoint lacks, before any collective."""
    import deepspeed

    available = checkpoint_files(path)
    prefix = getattr(model, "base_model_prefix", "")
    found = {n: checkpoint_name(n, available, prefix) for n, _ in model.named_parameters()}
    if missing := sorted(n for n, c in found.items() if c is None):
        raise KeyError(f"{path} lacks {len(missing)} of the model's parameters: {missing[:5]}")
    keys = {n: c for n, c in found.items() if c is not None}
    writer = distributed.rank() == 0
    for name, param in model.named_parameters():
        key = keys[name]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if writer:
                src = _read(available[key], key)
                if tuple(src.shape) != tuple(param.shape):
                    raise ValueError(
                        f"{name}: checkpoint {key} has shape {tuple(src.shape)}, model {tuple(param.shape)}"
                    )
                with torch.no_grad():
                    param.copy_(src)
    used = set(keys.values())
    return sorted(k for k in available if k not in used)


def build_partitioned(
    auto: Any, path: str, dtype: torch.dtype, ds_config: dict[str, Any], attn: str = "sdpa"
) -> nn.Module:
    """``auto.from_pretrained(path, dtype=dtype)`` for ZeRO-3: the model built inside
    ``deepspeed.zero.Init(ds_config)`` (parameters partitioned on the rank's device as they are created)
    and filled by ``load_partitioned_weights``."""
    import deepspeed
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(path)
    # the dtype comes from the config's bf16 flag: DeepSpeed 0.19.8 ignores an explicit fp32 ``dtype`` on
    # an accelerator without fp16 (the CPU) and builds in bf16
    # no weight initialisation: every parameter is loaded next, and initialising empty partitions fails
    # (an embedding's padding row)
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = auto.from_config(config, dtype=dtype, attn_implementation=attn)
    model.tie_weights()  # (skipped with the initialisation) a tied head shares the embedding's parameter
    log.debug("buffers rebuilt outside zero.Init", modules=restore_buffers(model))
    unused = load_partitioned_weights(model, path)
    if unused:
        log.info("checkpoint tensors the model does not use", path=path, count=len(unused), first=unused[:3])
    return model


def restore_buffers(model: nn.Module) -> int:
    """Rebuild the floating-point buffers ``deepspeed.zero.Init`` got wrong. It casts every floating tensor
    made by a constructor to the training dtype, buffers computed at construction included (RoPE's
    ``inv_freq`` in bf16: position angles off by up to 0.4%, where ``from_pretrained`` and vLLM keep fp32).
    Each parameter-free module holding such buffers is built again from its ``config`` outside the
    context and its buffers copied over. Returns how many modules were rebuilt."""
    rebuilt = 0
    for name, module in model.named_modules():
        buffers = [
            k for k, b in module.named_buffers(recurse=False) if b is not None and b.is_floating_point()
        ]
        if not buffers or any(True for _ in module.parameters(recurse=False)):
            continue
        try:
            fresh = type(module)(module.config)
        except (TypeError, AttributeError) as exc:
            log.warning("cannot rebuild buffers outside zero.Init", module=name, error=str(exc))
            continue
        for k in buffers:
            setattr(module, k, getattr(fresh, k).to(getattr(module, k).device))
        rebuilt += 1
    return rebuilt
