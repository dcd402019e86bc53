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

from async_vapo.weight_sync.adapter import LoRASpec, linear_layer_names, peft_key

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
        names = sorted(linear_layer_names(model))
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


def adapter_matrices(name: str, layer: LoRALinear) -> list[tuple[str, nn.Parameter]]:
    """The adapted layer ``name``'s two matrices under their PEFT names."""
    return [(peft_key(name, "lora_A"), layer.lora_A), (peft_key(name, "lora_B"), layer.lora_B)]


def published_adapter(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(PEFT name, parameter)`` for every adapter matrix of ``module``: what the engines get under
    ``model.lora_publish=adapter`` (``learner.publisher``), in module order."""
    for name, m in module.named_modules():
        if isinstance(m, LoRALinear):
            yield from adapter_matrices(name, m)


def lora_spec(module: nn.Module) -> LoRASpec | None:
    """The shape of ``module``'s adapters (None without any)."""
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        return None
    first = layers[0][1]
    return LoRASpec(first.rank, first.alpha, tuple(sorted({n.split(".")[-1] for n, _ in layers})))


def save_adapter(module: nn.Module, out: Path, base_model: str = "") -> None:
    """The adapters in PEFT's layout (``adapter_model.safetensors`` + ``adapter_config.json``), loadable
    with ``peft.PeftModel.from_pretrained(base, out)`` or as a vLLM LoRA adapter."""
    from safetensors.torch import save_file

    spec = lora_spec(module)
    if spec is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: p.detach().to("cpu", copy=True).contiguous() for k, p in published_adapter(module)}
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = spec.peft_config(base_model)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
