"""Policy and value models, each wrapped in its own DeepSpeed engine (own optimiser, own lr).

The value model is a transformer backbone with a scalar head: ``V(s_t)`` is read at the position of the
last token of state ``s_t``. It starts from ``value_path`` when given: a saved critic (its
``value_head.pt``) or a Hugging Face reward model (its one-label ``score`` head becomes the value head);
else from the policy's backbone with a zero-initialised head.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from async_vapo.cluster.ports import free_port
from async_vapo.config import TrainConfig

VALUE_HEAD = "value_head.pt"


class ValueModel(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_size: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, L] -> values [B, L] (float32). Packed rows (``learner/forward.py``): position ids that
        restart per sequence and no attention mask."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.head(hidden).squeeze(-1).float()

    def save(self, out: Path, writer: bool = True, gather: Any = None, shard_bytes: int = 0) -> None:
        """The backbone in Hugging Face format plus ``value_head.pt``. Every learner rank calls it (each
        parameter is gathered on its own, a collective under ZeRO-3); the ``writer`` writes, in safetensors
        shards of ``shard_bytes`` (0: ``learner.export``'s default)."""
        from async_vapo.learner.export import DEFAULT_SHARD_BYTES, host_tensors, save_hf

        kw = {"gather": gather} if gather is not None else {}
        save_hf(self.backbone, out, writer, shard_bytes or DEFAULT_SHARD_BYTES, **kw)
        head = dict(host_tensors(self.head, writer, **kw))
        if writer:
            torch.save(head, out / VALUE_HEAD)


def cpu_has_native_bf16() -> bool:
    """This CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): bf16 matmuls at about twice the fp32
    rate, where elsewhere they are emulated and slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


def torch_dtype(name: str, on_gpu: bool) -> torch.dtype:
    """The learner's weights: ``auto`` is bf16 on GPUs and on CPUs with native bf16, else fp32 (DeepSpeed
    keeps fp32 master weights and optimiser states either way)."""
    if name == "auto":
        return torch.bfloat16 if on_gpu or cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def attention_kernel(name: str, on_gpu: bool) -> str:
    """``model.attn_implementation`` resolved: ``auto`` is flash-attention 2 on GPUs where the
    ``flash_attn`` package is installed (variable-length kernels for packed rows), else SDPA."""
    if name != "auto":
        return name
    import importlib.util

    return "flash_attention_2" if on_gpu and importlib.util.find_spec("flash_attn") else "sdpa"


def load_policy(
    path: str, dtype: torch.dtype, ds_config: dict[str, Any] | None = None, attn: str = "sdpa"
) -> nn.Module:
    """The causal LM, its head replaced by a ``ScoringHead`` where the model allows it (``learner.forward``:
    response tokens are scored inside the forward, never materialising ``[tokens, V]`` logits). With a
    ZeRO-3 ``ds_config`` it is built partitioned (``learner.loading``), never whole on a rank."""
    from transformers import AutoModelForCausalLM

    from async_vapo.learner.forward import install_scoring_head

    if partitioned(ds_config):
        from async_vapo.learner.loading import build_partitioned

        model = build_partitioned(AutoModelForCausalLM, path, dtype, ds_config or {}, attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    install_scoring_head(model)
    return model


def load_value(
    policy_path: str,
    value_path: str,
    dtype: torch.dtype,
    ds_config: dict[str, Any] | None = None,
    attn: str = "sdpa",
) -> ValueModel:
    """The critic: the backbone of ``value_path`` (else the policy's) and a scalar head, loaded from
    ``value_path/value_head.pt`` when there is one, else zero. ZeRO-3: the backbone is built partitioned;
    the head (``hidden + 1`` numbers) is partitioned by ``deepspeed.initialize``."""
    from transformers import AutoModel

    source = value_path or policy_path
    if partitioned(ds_config):
        from async_vapo.learner.loading import build_partitioned

        backbone = build_partitioned(AutoModel, source, dtype, ds_config or {}, attn)
    else:
        backbone = AutoModel.from_pretrained(source, dtype=dtype, attn_implementation=attn)
    hidden: int = getattr(backbone.config, "hidden_size")  # noqa: B009 (typed as a module attribute)
    model = ValueModel(backbone, hidden, dtype)
    head = Path(source) / VALUE_HEAD
    if value_path and head.exists():
        model.head.load_state_dict(torch.load(head, map_location="cpu", weights_only=True))
    elif value_path and (score := reward_model_head(value_path, hidden)) is not None:
        with torch.no_grad():
            model.head.weight.copy_(score[0])
            model.head.bias.copy_(score[1])
    return model


def reward_model_head(path: str, hidden: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The scalar score head of a Hugging Face reward model (``*ForSequenceClassification`` with one
    label: ``score.weight`` [1, hidden], ``score.bias`` when it has one) as (weight, bias); None when
    ``path`` has no such head. A head of another shape (several labels) is an error: it scores no value."""
    from async_vapo.learner.loading import _read, checkpoint_files

    try:
        files = checkpoint_files(path)
    except FileNotFoundError:
        return None
    if "score.weight" not in files:
        return None
    weight = _read(files["score.weight"], "score.weight")
    if tuple(weight.shape) != (1, hidden):
        raise ValueError(
            f"model.value_path {path}: its score head has shape {tuple(weight.shape)}, a critic needs (1, "
            f"{hidden}) (a reward model with one label)"
        )
    bias = _read(files["score.bias"], "score.bias") if "score.bias" in files else torch.zeros(1)
    return weight, bias.reshape(1)


def partitioned(ds_config: dict[str, Any] | None) -> bool:
    """Whether a DeepSpeed config partitions the weights (ZeRO-3): models are then built partitioned."""
    return bool(ds_config) and int((ds_config or {}).get("zero_optimization", {}).get("stage", 0)) >= 3


def local_rank_env(rank: int, world: int, master_port: int) -> dict[str, str]:
    """The torch.distributed environment of learner rank ``rank`` of ``world`` on this machine (CPU)."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master_port),
        "DS_ACCELERATOR": "cpu",
    }


def init_distributed(backend: str, file_store: str = "", timeout_s: float = 1800.0) -> None:
    """Single-process default (RANK 0 of 1) unless a launcher set the torch.distributed environment.
    ``file_store``: meet in a ``FileStore`` at that path instead of the TCPStore at MASTER_ADDR (one
    machine: a TCPStore listens on every interface). ``timeout_s``: the learner world's collective
    timeout (``train.collective_timeout_s``; past it NCCL's watchdog ends the rank)."""
    from datetime import timedelta

    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    with printed_to_log():
        if file_store:
            deepspeed.init_distributed(
                dist_backend=backend,
                init_method=f"file://{Path(file_store).resolve()}",  # file://runs/x would name a host "runs"
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                timeout=timedelta(seconds=timeout_s),
            )
        else:
            deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))


def zero_config(stage: int, offload_optimizer: bool = False, offload_params: bool = False) -> dict[str, Any]:
    """DeepSpeed's ``zero_optimization`` section. The buffer sizes are DeepSpeed's defaults, set here so
    that the memory plan (``cluster.memory``) counts what runs. Offloaded state goes to host memory
    (pinned on a GPU machine: faster copies)."""
    from async_vapo.cluster.memory import ZERO3_MAX_LIVE_PARAMETERS, ZERO_REDUCE_BUCKET

    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        zero["reduce_bucket_size"] = ZERO_REDUCE_BUCKET
    if stage >= 3:
        zero["stage3_max_live_parameters"] = ZERO3_MAX_LIVE_PARAMETERS
    host = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_optimizer:
        zero["offload_optimizer"] = dict(host)
    if offload_params:
        zero["offload_param"] = dict(host)
    return zero


def ds_config(train: TrainConfig, bf16: bool, micro_batch_size: int) -> dict[str, Any]:
    """The DeepSpeed config of both learner engines (also what ``load_policy`` / ``load_value`` build
    partitioned models under). In bf16 under ZeRO the micro-batches' gradients are accumulated in fp32
    (bf16 sums of a mini-batch's 16+ micro-batches lose about 2% of the gradient, tests/test_grad_accum.py)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "train_batch_size": micro_batch_size * world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero_config(train.zero_stage, train.offload_optimizer, train.offload_params),
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16 and train.zero_stage >= 1:  # micro-batch gradients summed in fp32 (DeepSpeed: ZeRO 1-3 only)
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def make_engine(model: nn.Module, lr: float, train: TrainConfig, bf16: bool, micro_batch_size: int) -> Any:
    """A DeepSpeed engine with AdamW and a warmup-constant schedule (the paper's); ``train`` gives the ZeRO
    stage, offload, warm-up, weight decay, clipping and gradient checkpointing. AdamW is torch's, or with
    ``train.offload_optimizer`` DeepSpeed's CPU Adam in AdamW mode (the same update, run on the host;
    built by DeepSpeed on first use, about a minute)."""
    import deepspeed

    if train.gradient_checkpointing:
        core: Any = getattr(model, "backbone", model)  # the value model's transformer, or the policy
        core.gradient_checkpointing_enable()
        if any(not p.requires_grad for p in core.parameters()):  # LoRA: the embeddings are frozen, and a
            core.enable_input_require_grads()  # recomputed layer must still see an input that needs grad
    hyper: dict[str, Any] = {"lr": lr, "weight_decay": train.weight_decay, "betas": (0.9, 0.95), "eps": 1e-8}
    opt: torch.optim.Optimizer
    trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters (and value head)
    if train.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(trained, adamw_mode=True, **hyper)
    else:
        opt = torch.optim.AdamW(trained, **hyper)
    warm = max(1, train.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    config = ds_config(train, bf16, micro_batch_size)
    with printed_to_log():  # the bf16 optimizer's 25 lines of memory figures
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    return engine


@contextlib.contextmanager
def printed_to_log() -> Iterator[None]:
    """What DeepSpeed prints to stdout in the block (``print``, not its logger: its bf16 optimizer's memory
    figures, "shm_comm_op built successfully") goes to the learner's log at debug level, not to every
    run's console."""
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        yield
    if text := printed.getvalue().strip():
        structlog.get_logger(__name__).debug("deepspeed printed", text=text)
