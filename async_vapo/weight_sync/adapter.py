"""A policy LoRA adapter as it travels to the engines (``model.lora_publish=adapter``) and as checkpoints
hold it: PEFT's layout, which vLLM's LoRA loader and ``peft.PeftModel.from_pretrained`` both read.

The learner (``learner.lora``) names each adapter matrix ``peft_key(module, "lora_A")``; the engines
(``rollout.weights.WeightReceiver.receive_adapter``) write the tensors they receive under the names they
were sent with, next to ``LoRASpec.peft_config()``, and load them into vLLM's LoRA slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def linear_layer_names(model: Any) -> set[str]:
    """The last names of ``model``'s ``nn.Linear`` layers (``q_proj``, ``lm_head``, ...): what
    ``model.lora_target_modules`` is matched against (``learner.lora.apply_lora``)."""
    from torch import nn

    return {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def adapted_layers(model_path: str, targets: tuple[str, ...] | list[str]) -> list[str]:
    """The layers of the model at ``model_path`` an adapter on ``targets`` adapts, by last name: the
    model is built on the meta device from its config (no weights read; seconds at 32B)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return sorted(linear_layer_names(model) & set(targets))


def peft_key(module: str, matrix: str) -> str:
    """The name of adapted layer ``module``'s ``matrix`` ("lora_A" [r, in] or "lora_B" [out, r])."""
    return f"base_model.model.{module}.{matrix}.weight"


@dataclass(frozen=True)
class LoRASpec:
    """The shape of the policy's adapters: rank, scale numerator (``alpha / rank``), adapted layers."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]

    def vllm_args(self) -> dict[str, Any]:
        """vLLM engine arguments of an engine that serves one such adapter."""
        return {
            "enable_lora": True,
            "max_lora_rank": next(r for r in VLLM_LORA_RANKS if r >= self.rank),
            "max_loras": 1,
        }

    def peft_config(self, base_model: str = "") -> dict[str, Any]:
        """``adapter_config.json``."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "target_modules": sorted(self.target_modules),
            "inference_mode": True,
        }
