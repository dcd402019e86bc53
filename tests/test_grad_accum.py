"""bf16 training accumulates the micro-batches' gradients in fp32: the learner's DeepSpeed config
(``learner.models.ds_config``) against the same engine accumulating in bf16, each compared with the exact
(float64) sum of the same bf16 micro-batch gradients, on a real DeepSpeed engine (ZeRO-3, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, os, torch
os.environ["DS_ACCELERATOR"] = "cpu"
import deepspeed
from deepspeed.utils import safe_get_full_grad
from async_vapo.config import TrainConfig
from async_vapo.learner.models import ds_config, init_distributed

init_distributed("gloo")
gen = torch.Generator().manual_seed(0)
xs = [torch.randn(4, 64, generator=gen).bfloat16() for _ in range(64)]  # 64 micro-batches, one step

def accumulated(config):
    torch.manual_seed(0)
    m = torch.nn.Linear(64, 64, bias=False)
    w = m.weight.detach().bfloat16().double()
    e, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=1.0), config=config)
    for i, x in enumerate(xs):
        e.set_gradient_accumulation_boundary(i == len(xs) - 1)
        e.backward((e(x).float() ** 2).sum() * 1e-2, scale_wrt_gas=False)
    exact = sum((2e-2 * (x.double() @ w.T)).T @ x.double() for x in xs)
    g = safe_get_full_grad(e.module.weight).double()
    return float((g - exact).abs().max() / exact.abs().max())

learner = ds_config(TrainConfig(zero_stage=3), True, 1)
bf16_sum = {k: v for k, v in learner.items() if k != "data_types"}
print(json.dumps({"data_types": learner.get("data_types"), "fp32": accumulated(learner), "bf16": accumulated(bf16_sum)}))
"""


def test_bf16_gradients_are_accumulated_in_fp32():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["data_types"] == {"grad_accum_dtype": "fp32"}, res
    # each micro-batch gradient is a bf16 product (~0.4% error); summing 64 of them in bf16 adds ~2%
    assert res["fp32"] < 0.006 and res["bf16"] > 3 * res["fp32"], res
