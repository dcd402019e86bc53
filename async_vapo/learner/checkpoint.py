"""Checkpoints: policy and value engines (weights, optimisers, schedulers) through DeepSpeed, plus the
learner's own state (step, policy version, RNG states, the prompt ledger with the data cursor and every
pending prompt), written to ``step_N.tmp`` and renamed to ``step_N`` once complete; ``latest`` is
rewritten atomically last. The policy is also exported in Hugging Face format (``step_N/hf``) for vLLM and
transformers.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
import torch.distributed as dist


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(
    root: Path,
    step: int,
    version: int,
    policy: Any,
    value: Any | None,
    learner_state: dict[str, Any],
    tokenizer_dir: str | None = None,
    export_hf: bool = True,
) -> Path:
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    policy.save_checkpoint(str(tmp / "policy"), tag="ds")
    if value is not None:
        value.save_checkpoint(str(tmp / "value"), tag="ds")
    torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    if _rank() == 0:
        state = dict(learner_state, step=step, version=version)
        (tmp / "learner_state.msgpack").write_bytes(msgspec.msgpack.encode(state))
    if export_hf:
        export_policy(policy, tmp / "hf", tokenizer_dir)
    _barrier()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
    _barrier()
    return final


def export_policy(engine: Any, out: Path, tokenizer_dir: str | None) -> None:
    """A Hugging Face directory of the policy, written by rank 0 (every rank takes part: the parameters
    are gathered one at a time under ZeRO-3, never the whole model at once: ``learner.export``)."""
    from async_vapo.learner.export import save_hf

    save_hf(engine.module, out, writer=_rank() == 0)
    if _rank() == 0 and tokenizer_dir:
        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "warm_start.json":
                shutil.copy(f, out / f.name)


def latest(root: Path) -> Path | None:
    marker = root / "latest"
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    return path if path.exists() else None


def load(path: Path, policy: Any, value: Any | None) -> dict[str, Any]:
    policy.load_checkpoint(str(path / "policy"), tag="ds")
    if value is not None:
        value.load_checkpoint(str(path / "value"), tag="ds")
    rng = path / f"rng_rank{_rank()}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=False))
    return msgspec.msgpack.decode((path / "learner_state.msgpack").read_bytes())
