"""ZeRO-Offload through the launcher on CPU: ZeRO-3 with the optimizer (DeepSpeed's CPU Adam) and the
parameters offloaded, as ``configs/vapo_qwen2.5_7b.yaml`` offloads the optimizer. On a CPU machine the
"device" is already host memory, so this runs the offload's code paths (DeepSpeed's offload optimizer,
the CPU Adam kernel, partitioned parameters swapped in per layer), not its memory saving; that is
counted by the memory plan (``tests/test_cluster.py``). A resume of the offloaded optimizer's state
reproduces the next steps' losses exactly in ``tests/test_learner.py`` (in process: one launch here is enough)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_e2e import launch, rows

pytestmark = pytest.mark.slow


def test_zero3_with_optimizer_and_parameters_offloaded_trains(tiny_model_dir, tmp_path):
    out = tmp_path / "offload"
    offload = ["train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true"]
    first = launch(out, *offload, "train.total_steps=2", "train.eval_every=0", timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    events = [
        json.loads(x) for x in (out / "logs" / "learner-0.log").read_text().splitlines() if x[:1] == "{"
    ]
    (built,) = [e for e in events if e["event"] == "learner models built"]
    assert built["optimizer"] == "DeepSpeedCPUAdam" and built["offload_optimizer"] and built["offload_params"]
    train = [x for x in rows(out) if x["phase"] == "train"]
    assert [x["step"] for x in train] == [0, 1] and all(x["policy_grad_norm"] > 0 for x in train)
    # the update reached the weights: the exported policy differs from the model it started from
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(out / "checkpoints" / "step_2" / "hf" / "model.safetensors"))
    moved = max(float((after[k].float() - before[k].float()).abs().max()) for k in before)
    assert 0 < moved < 1 and all(bool(torch.isfinite(v).all()) for v in after.values())


def test_a_cpu_adam_that_cannot_be_built_is_a_launch_error(tmp_path):
    """No compiler: the launcher says so before starting anything (the learner ranks would each fail)."""
    import os
    import subprocess
    import sys

    env = dict(
        os.environ, DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CXX="/nonexistent/c++"
    )
    cmd = [sys.executable, "-m", "async_vapo.launch", "--output-dir", str(tmp_path / "run"),
           "train.zero_stage=2", "train.offload_optimizer=true"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "train.offload_optimizer needs DeepSpeed's CPU Adam, which cannot be built here" in res.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_cpu_adam_build_that_never_finishes_is_a_launch_error_naming_the_lock(tmp_path):
    """A build killed half-way leaves torch's lock file behind; the next build waits for it to go away,
    forever. The launcher's build runs under train.op_build_timeout_s and names the file."""
    import os
    import subprocess
    import sys

    ext = tmp_path / "ext"
    env = dict(os.environ, DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(ext))
    where = subprocess.run(
        [sys.executable, "-c", "from torch.utils.cpp_extension import _get_build_directory as d;"
         "print(d('cpu_adam', False))"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(where) / "lock").touch()
    cmd = [sys.executable, "-m", "async_vapo.launch", "--output-dir", str(tmp_path / "run"),
           "train.zero_stage=2", "train.offload_optimizer=true", "train.op_build_timeout_s=6"]  # fmt: skip
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "did not finish within train.op_build_timeout_s=6 s" in res.stderr, res.stderr[-2000:]
    assert f"remove {where}/lock" in res.stderr
    assert time.monotonic() - t0 < 120
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
