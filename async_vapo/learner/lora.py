"""LoRA adapters for the policy and the critic's backbone (``model.lora_rank``, ``model.critic_lora_rank``).

Each targeted ``nn.Linear`` (``model.lora_target_modules``, by its last name: ``q_proj``, ``down_proj``, ...)
becomes a ``LoRALinear`` that keeps the frozen ``weight`` (and ``bias``) under the same names and adds two
trained matrices::

    y = x W^T + b + scale * (x A^T) B^T          A: [r, in]  B: [out, r]  scale = lora_alpha / r

A starts Kaiming-uniform and B at zero, so a model with fresh adapters computes what the base model does.
Only the adapters (and the critic's value head) are given to the optimizer: gradients and Adam state are
the adapters' size. Because the base weights keep their names, everything that walks parameters by name
reads the *merged* weight ``W + scale * B A`` through ``published``: the weight publish to the engines,
the Hugging Face export; the adapters themselves are also written in PEFT's layout (``save_adapter``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_PARAMS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """A linear layer with a rank-``rank`` adapter; ``weight`` / ``bias`` are the frozen base ones."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (
            F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
        )

    def merged_weight(self) -> torch.Tensor:
        """``W + scale * B A`` in the weight's dtype (computed in fp32), a new tensor."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        return (self.weight.float() + delta).to(self.weight.dtype)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str] | tuple[str, ...]) -> int:
    """Replace every ``nn.Linear`` of ``model`` whose name ends in one of ``targets`` by a ``LoRALinear``
    and freeze every other parameter of ``model``. Returns the number of adapted layers; a ``ValueError``
    names the model's linear layers when no target matches."""
    wanted = set(targets)
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.split(".")[-1] in wanted
    ]
    if not found:
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"model.lora_target_modules {sorted(wanted)} match no linear layer; this model has {names}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(m, rank, alpha))
    return len(found)


def is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def _owners(module: nn.Module) -> dict[int, LoRALinear]:
    return {id(m.weight): m for m in module.modules() if isinstance(m, LoRALinear)}


def published(module: nn.Module) -> Iterator[tuple[str, nn.Parameter, Callable[[], torch.Tensor] | None]]:
    """``(name, parameter, value)`` for every parameter a Hugging Face copy of ``module`` has (adapters
    left out); ``value()`` gives the tensor to write for an adapted layer's weight (the merged one), and
    is None for any other parameter (written as it is). Without adapters: ``named_parameters()``."""
    owners = _owners(module)
    for name, p in module.named_parameters():
        if is_adapter(name):
            continue
        owner = owners.get(id(p))
        yield name, p, (owner.merged_weight if owner is not None else None)


def adapter_count(module: nn.Module) -> int:
    """Trained adapter parameters (elements)."""
    return sum(p.numel() for n, p in module.named_parameters() if is_adapter(n))


def save_adapter(module: nn.Module, out: Path, base_model: str = "") -> None:
    """The adapters in PEFT's layout (``adapter_model.safetensors`` + ``adapter_config.json``), loadable
    with ``peft.PeftModel.from_pretrained(base, out)`` or as a vLLM LoRA adapter."""
    from safetensors.torch import save_file

    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        return
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in layers:
        tensors[f"base_model.model.{name}.lora_A.weight"] = (
            m.lora_A.detach().to("cpu", copy=True).contiguous()
        )
        tensors[f"base_model.model.{name}.lora_B.weight"] = (
            m.lora_B.detach().to("cpu", copy=True).contiguous()
        )
    save_file(tensors, str(out / "adapter_model.safetensors"))
    first = layers[0][1]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted({n.split(".")[-1] for n, _ in layers}),
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
