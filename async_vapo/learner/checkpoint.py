"""Checkpoints: policy and value engines (weights, optimisers, schedulers) through DeepSpeed, plus the
learner's own state (step, policy version, RNG states, the prompt ledger with the data cursor and every
pending prompt). The policy is also exported in Hugging Face format (``step_N/hf``, the tokenizer whole) for vLLM and
transformers, and the critic beside it (``step_N/hf_critic``: the backbone and ``value_head.pt``). Only the
checkpoints ``Retention`` keeps stay (``train.keep_last``, ``train.keep_best``).

Atomic and durable: everything is written to ``step_N.tmp``, every file and directory in it is fsynced,
then it is renamed to ``step_N`` (a previous ``step_N`` is moved aside first and deleted only after the
rename), and ``latest`` is rewritten (write, fsync, rename, fsync the directory) last. So a crash at any
point leaves the previous checkpoint whole and ``latest`` naming a complete one. A ``step_N`` directory
exists only once complete; ``latest`` naming one that is gone (deleted by hand, a half-copied run
directory) falls back to the newest ``step_N`` present, loudly, never silently to step 0.

RNG states are saved as tensors and plain numbers and read back with ``torch.load(weights_only=True)``: a
checkpoint never runs code when it is loaded.

``train.save_optimizer=false`` writes no optimizer state: instead of DeepSpeed's checkpoint (whose ZeRO files
hold the fp32 master weights and Adam's two moments, about 12 bytes per parameter: ~400 GB at 32B), the
parameters each model trains (all of them; under LoRA the adapters and the value head) are written to
``weights/policy`` and ``weights/value`` in the model's dtype, gathered one at a time as the export is, with
the LR schedule's and the engine's step counts. A resume loads them into the partitions, refreshes the
optimizer's fp32 master copies from them (bf16 training: rounded to bf16) and starts Adam's moments at zero.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import structlog
import torch

from async_vapo import distributed
from async_vapo.learner.lora import save_adapter

log = structlog.get_logger(__name__)
STEP_DIR = re.compile(r"step_(\d+)")
# fault injection (tests/test_faults.py, bench/chaos.py): "STEP:SECONDS" makes the save of that step (or
# of every step, "*:SECONDS") that much slower, as a slow file system would
SLOW_SAVE_ENV = "ASYNC_VAPO_FAULT_SLOW_SAVE"


class CheckpointError(RuntimeError):
    """No checkpoint to resume from where one is expected, or one that does not fit the model."""


def injected_save_delay(step: int) -> float:
    """Seconds the save of ``step`` is delayed by ``ASYNC_VAPO_FAULT_SLOW_SAVE`` (0 when unset)."""
    spec = os.environ.get(SLOW_SAVE_ENV, "")
    which, _, seconds = spec.partition(":")
    if not seconds or which not in ("*", str(step)):
        return 0.0
    return float(seconds)


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as tensors and plain numbers (``weights_only`` loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, mt, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos)}
        | {"has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (and ``root``): the rename that follows publishes
    data that is on disk, not in the page cache."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final`` and point ``latest`` at it, never deleting a good
    checkpoint before its replacement is in place (rank 0)."""
    _fsync_tree(tmp)
    aside = root / f"{final.name}.old"
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        if aside.exists() and not final.exists():
            os.replace(aside, final)  # the good checkpoint goes back where it was
        raise
    latest_tmp = root / "latest.tmp"
    with open(latest_tmp, "w") as f:
        f.write(final.name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    shutil.rmtree(aside, ignore_errors=True)


@dataclass(frozen=True)
class Retention:
    """Which checkpoints stay on disk: the newest ``keep_last`` (0 = all) and, with ``keep_best``, the one
    whose held-out accuracy at its save was the highest (its ``learner_state``'s ``eval_accuracy``)."""

    keep_last: int = 0
    keep_best: bool = False

    def to_delete(self, steps: list[Path]) -> list[Path]:
        """Of the complete checkpoints ``steps`` (oldest first), those to delete; never the newest."""
        if self.keep_last <= 0 or len(steps) <= self.keep_last:
            return []
        keep = set(steps[-self.keep_last :])
        if self.keep_best:
            scored = [(acc, i) for i, p in enumerate(steps) if (acc := _eval_accuracy(p)) is not None]
            if scored:
                keep.add(steps[max(scored)[1]])  # ties: the newest
        return [p for p in steps if p not in keep]


def _eval_accuracy(path: Path) -> float | None:
    try:
        acc = msgspec.msgpack.decode((path / "learner_state.msgpack").read_bytes()).get("eval_accuracy")
    except (OSError, msgspec.DecodeError):
        return None
    return float(acc) if isinstance(acc, (int, float)) else None


def prune(root: Path, retention: Retention) -> list[Path]:
    """Delete the checkpoints ``retention`` does not keep (rank 0, after ``latest`` names the newest)."""
    gone = retention.to_delete(complete_steps(root))
    for p in gone:
        # renamed first: a crash mid-delete leaves no half-deleted step_N that looks complete
        doomed = p.with_name(p.name + ".deleting")
        os.replace(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    if gone:
        _fsync_dir(root)
        log.info("old checkpoints deleted", deleted=[p.name for p in gone])
    return gone


def save(  # noqa: PLR0913 (both engines, where and what to write, and the retention policy)
    root: Path,
    step: int,
    version: int,
    policy: Any,
    value: Any | None,
    learner_state: dict[str, Any],
    tokenizer_dir: str | None = None,
    export_hf: bool = True,
    retention: Retention = Retention(),
    save_optimizer: bool = True,
) -> Path:
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    if distributed.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    for name, engine in (("policy", policy), ("value", value)):
        if engine is None:
            continue
        if save_optimizer:
            engine.save_checkpoint(str(tmp / name), tag="ds")
        else:
            save_trained(engine, tmp / WEIGHTS / name, writer=distributed.rank() == 0)
    torch.save(rng_state(), tmp / f"rng_rank{distributed.rank()}.pt")
    if distributed.rank() == 0:
        state = dict(learner_state, step=step, version=version)
        (tmp / "learner_state.msgpack").write_bytes(msgspec.msgpack.encode(state))
    if export_hf:
        _export(tmp, policy, value, tokenizer_dir)
    if slow := injected_save_delay(step):
        log.warning("fault injection: this checkpoint is made slow", step=step, seconds=slow)
        time.sleep(slow)
    distributed.barrier()
    if distributed.rank() == 0:
        _publish(root, tmp, final)
        prune(root, retention)
    distributed.barrier()
    return final


def _export(tmp: Path, policy: Any, value: Any | None, tokenizer_dir: str | None) -> None:
    """The policy in Hugging Face format, LoRA adapters in PEFT's, the critic beside them."""
    export_policy(policy, tmp / "hf", tokenizer_dir)
    if distributed.rank() == 0:  # LoRA: the adapters too, in PEFT's layout (nothing without LoRA)
        save_adapter(policy.module, tmp / "adapter")
        if value is not None:
            save_adapter(value.module.backbone, tmp / "critic_adapter")
    if value is not None:  # the critic beside it (backbone in HF format + value_head.pt)
        value.module.save(tmp / "hf_critic", writer=distributed.rank() == 0)


WEIGHTS = "weights"  # a checkpoint without optimizer state (train.save_optimizer=false)
ENGINE_STATE = "engine_state.msgpack"


def _trained(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters the optimizer updates, by name (frozen ones are rebuilt from ``model.path``)."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def save_trained(engine: Any, out: Path, writer: bool) -> None:
    """``engine``'s trained parameters in safetensors shards, gathered one at a time (every rank calls it:
    under ZeRO-3 each gather is a collective), plus its LR schedule and step counts; the ``writer``
    writes. Peak extra memory: one parameter on the device, about one shard on the host."""
    from async_vapo.learner.export import write_safetensors
    from async_vapo.weight_sync.publish import zero3_gather

    def tensors() -> Iterator[tuple[str, torch.Tensor | None]]:
        for name, p in _trained(engine.module):
            with zero3_gather([p]):
                yield name, p.detach().to("cpu", copy=True) if writer else None

    if not writer:
        for _ in tensors():
            pass
        return
    write_safetensors(tensors(), out)
    state = {
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
    }
    (out / ENGINE_STATE).write_bytes(msgspec.msgpack.encode(state))


def load_trained(engine: Any, src: Path) -> None:
    """Read what ``save_trained`` wrote into ``engine`` (every rank: under ZeRO-3 each parameter is gathered,
    set and partitioned again, one at a time), then refresh the optimizer's fp32 master copies and restore
    the LR schedule (Adam's moments stay at zero)."""
    import deepspeed
    from safetensors import safe_open

    from async_vapo.learner.export import INDEX, SINGLE

    files = (
        sorted(set(msgspec.json.decode((src / INDEX).read_bytes())["weight_map"].values()))
        if (src / INDEX).exists()
        else [SINGLE]
    )
    where: dict[str, str] = {}
    for f in files:
        with safe_open(str(src / f), framework="pt") as h:
            where |= dict.fromkeys(h.keys(), f)
    trained = _trained(engine.module)
    if missing := [n for n, _ in trained if n not in where]:
        raise CheckpointError(f"{src} lacks trained parameters {missing[:5]} (of {len(missing)} missing)")
    for name, p in trained:
        with safe_open(str(src / where[name]), framework="pt") as h:
            t = h.get_tensor(name)
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"{src}: {name} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
            p.data.copy_(t.to(p.device, p.dtype))
    if hasattr(engine.optimizer, "refresh_fp32_params"):  # ZeRO and bf16 wrappers keep fp32 masters
        engine.optimizer.refresh_fp32_params()
    state = msgspec.msgpack.decode((src / ENGINE_STATE).read_bytes())
    engine.global_steps = state["global_steps"]
    engine.global_samples = state["global_samples"]
    if engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
            group["lr"] = lr


def export_policy(engine: Any, out: Path, tokenizer_dir: str | None) -> None:
    """A Hugging Face directory of the policy, written by rank 0 (every rank takes part: the parameters
    are gathered one at a time under ZeRO-3, never the whole model at once: ``learner.export``)."""
    from async_vapo.learner.export import save_hf

    save_hf(engine.module, out, writer=distributed.rank() == 0)
    if distributed.rank() == 0 and tokenizer_dir:
        from transformers import AutoTokenizer

        # the tokenizer whole, as transformers writes it: its chat template included
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
        if (Path(tokenizer_dir) / "warm_start.json").exists():
            shutil.copy(Path(tokenizer_dir) / "warm_start.json", out / "warm_start.json")


def complete_steps(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first (``step_N`` exists only once complete)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest(root: Path) -> Path | None:
    """The checkpoint to resume from: the one ``latest`` names; if that is missing or broken, the newest
    complete ``step_N`` (with a warning saying so); None when there is none at all."""
    marker = root / "latest"
    named = marker.read_text().strip() if marker.exists() else ""
    if named and STEP_DIR.fullmatch(named) and (root / named / "learner_state.msgpack").exists():
        return root / named
    steps = [p for p in complete_steps(root) if (p / "learner_state.msgpack").exists()]
    if named and not steps:
        raise CheckpointError(
            f"{marker} names {named!r}, which is not a complete checkpoint, and {root} holds no other: "
            "nothing to resume from (restore the directory, or start without --resume)"
        )
    if named or steps:
        log.warning(
            "the 'latest' checkpoint marker is missing or names no complete checkpoint; using the newest "
            "complete one",
            marker=named or None,
            using=str(steps[-1]) if steps else None,
        )
    return steps[-1] if steps else None


def load(path: Path, policy: Any, value: Any | None) -> dict[str, Any]:
    weights_only = (path / WEIGHTS).is_dir()
    if weights_only:
        log.warning(
            "this checkpoint holds no optimizer state (train.save_optimizer was false): the trained "
            "weights are loaded and Adam's moments start from zero",
            path=str(path),
        )
    for name, engine in (("policy", policy), ("value", value)):
        if engine is None:
            continue
        if weights_only:
            load_trained(engine, path / WEIGHTS / name)
        else:
            engine.load_checkpoint(str(path / name), tag="ds")
    rng = path / f"rng_rank{distributed.rank()}.pt"
    if rng.exists():
        try:
            set_rng_state(torch.load(rng, weights_only=True))
        except Exception as exc:  # an older checkpoint pickled numpy state: never unpickled here
            log.warning("RNG state not restored (older format)", path=str(rng), error=repr(exc)[:200])
    return msgspec.msgpack.decode((path / "learner_state.msgpack").read_bytes())
