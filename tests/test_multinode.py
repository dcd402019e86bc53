"""Two "nodes" on one machine: two launchers (separate process trees, node ranks 0 and 1, one rendezvous
store on loopback), each with one learner rank and one rollout worker on CPU. The learner ranks form one
DeepSpeed (gloo) world; both vLLM engines get prompts and new weights from learner rank 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import free_port
from tests.test_e2e import SMALL, rows

pytestmark = pytest.mark.slow


def test_two_nodes_train_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "two_nodes"
    port = free_port()
    env = dict(os.environ, DS_ACCELERATOR="cpu", VLLM_CPU_KVCACHE_SPACE="1")
    common = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    cmd = [sys.executable, "-m", "async_vapo.launch", "--output-dir", str(out), *SMALL, "train.total_steps=2"]
    nodes = [
        subprocess.Popen(
            [*cmd, *common, "--node-rank", str(rank)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (1, 0)  # node 1 first: it must wait for node 0's store, not fail
    ]
    errs = []
    for p in nodes:
        _, err = p.communicate(timeout=600)
        errs.append(err)
    assert [p.returncode for p in nodes] == [0, 0], "\n\n".join(e[-3000:] for e in errs)

    train = [r for r in rows(out) if r["phase"] == "train"]
    assert [r["step"] for r in train] == [0, 1]
    assert train[-1]["policy_version"] == 2
    # both engines (one per node) delivered groups that were trained on
    assert set(train[-1]["groups_by_worker"]) == {"rollout-0", "rollout-1"}
    states = [json.loads((out / "run" / f"node{n}.json").read_text()) for n in (0, 1)]
    assert states[0]["learners"].keys() == {"0"} and states[1]["learners"].keys() == {"1"}
    assert states[0]["workers"].keys() == {"rollout-0"} and states[1]["workers"].keys() == {"rollout-1"}
    assert states[0]["endpoints"] == states[1]["endpoints"]  # advertised through the store
    assert (out / "checkpoints" / "latest").read_text() == "step_2"
