"""The settings in which the 32B recipe differs from the embedded default, run for real on CPU through the
launcher: two learner ranks (gloo), ZeRO-3 with the streamed publish, a bf16 learner (DeepSpeed's bf16 mode; the CPU
engines sample in fp32), gradient checkpointing, micro-batches of one sequence with
two mini-batches per step, two tensor-parallel engines (TP 2: two vLLM workers each, every engine fed by its own
learner rank over a weight group of 1 + 2), sampling temperature 0.7, a short response limit (truncated
responses), and a broadcast every second version with max_staleness 1; then the recipe's task side: math
prompts in DAPO-Math-17k's layout for training and AIME's for evaluation, math-verify in 16 verifier
processes, 16 samples per prompt, a reward of -1 for a wrong answer, no dynamic sampling. While it runs, every listening
socket of its processes is recorded: a single-machine run opens none beyond loopback. (The recipe's TP 4: see
``test_rollout_tp.py``; the memory plan of the full-size recipe: ``test_deploy.py``.)"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time

import pytest

from tests.helpers import listening_sockets, process_tree
from tests.test_e2e import launcher_command, launcher_env, rows

pytestmark = pytest.mark.slow

RECIPE_LIKE = [
    "--learner-ranks",
    "2",
    "rollout.num_workers=2",
    "rollout.tensor_parallel_size=2",  # the recipe's 4 at TP 2: one core per engine, its 2 workers share it
    "train.zero_stage=3",
    "model.dtype=bfloat16",
    "train.publish=auto",  # = stream under ZeRO-3
    "train.micro_batch_size=1",
    "train.max_tokens_per_micro=150",  # packed micro-batches of 2-3 sequences (the recipe packs)
    "train.logit_chunk=16",  # the LM head in chunks (the recipe's 4096 at 22.5k-token sequences)
    "train.gradient_checkpointing=true",
    "train.mini_batches=2",
    "rollout.temperature=0.7",
    "rollout.max_tokens=40",
    "train.broadcast_every=2",
    "train.max_staleness=1",
    "train.total_steps=4",
    "train.eval_every=4",
    "train.checkpoint_every=0",
]


def launch_watching_listeners(out, *extra: str, timeout: float = 900):
    """The launcher as ``test_e2e.launch`` runs it, while every listening TCP socket of its process tree
    (learner ranks, vLLM engines and their workers, verifier pools) is recorded once a second, with the
    most processes the tree held at once. Output goes to files (a pipe nobody reads while the run goes on
    would fill and block it)."""
    env, cmd = launcher_env(), launcher_command(out, *extra)
    logs = out.parent / "launcher.out", out.parent / "launcher.err"
    seen: set[tuple[str, int]] = set()
    with open(logs[0], "w") as so, open(logs[1], "w") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, text=True, env=env)
        deadline = time.monotonic() + timeout
        most = 0
        while proc.poll() is None and time.monotonic() < deadline:
            tree = process_tree(proc.pid)
            most = max(most, len(tree))
            seen |= listening_sockets(tree)
            time.sleep(1.0)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return (
        subprocess.CompletedProcess(cmd, proc.returncode, logs[0].read_text(), logs[1].read_text()),
        seen,
        most,
    )


def test_recipe_settings_train_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "recipe"
    run, listeners, _ = launch_watching_listeners(out, *RECIPE_LIKE)
    assert run.returncode == 0, run.stderr[-4000:]
    # a single-machine run listens on loopback only: its stores are files, gloo binds to lo, the
    # learner's ZeroMQ sockets to 127.0.0.1 (those are always there: the check sees real sockets)
    assert listeners, "no listening socket seen: the check is blind"
    assert all(ipaddress.ip_address(a).is_loopback for a, _ in listeners), sorted(listeners)
    train = [r for r in rows(out) if r["phase"] == "train"]
    assert [r["step"] for r in train] == [0, 1, 2, 3]
    assert train[-1]["policy_version"] == 4
    # staleness is judged against the learner's version even though engines are updated every 2nd one
    assert max(r["staleness_max"] for r in train) <= 1
    # the streamed ZeRO-3 publish reached both engines, each fed by its own learner rank (fan-out)
    assert train[-1]["weight_syncs"] >= 2
    assert sorted(train[-1]["worker_owners"].values()) == [0, 1]
    assert min(train[-1]["worker_versions"].values()) >= 2
    # vLLM's "Failed to load weights" after each reload, expected for the rotary embedding and the tied
    # LM head, is filtered in the engines' workers (rollout/weights.py); any other layer would show
    assert "Failed to load weights" not in run.stdout + run.stderr
    assert set(train[-1]["groups_by_worker"]) == {"rollout-0", "rollout-1"}
    lines = (run.stdout + run.stderr).splitlines()
    built = [line for line in lines if "learner models built" in line]
    assert len(built) == 2 and all("dtype=bfloat16" in line and "zero_stage=3" in line for line in built), (
        built
    )
    ready = [line for line in lines if "worker ready" in line]
    assert len(ready) == 2 and all("tp=2" in line for line in ready), ready  # both engines at TP 2
    # behaviour log-probs at temperature 0.7 are the learner's tempered policy: small KL on fresh data
    # (a bf16 learner against fp32 engines: 1.9e-3 was measured on one batch of a fresh-ci run, under
    # 1e-3 on the batches before it)
    assert train[0]["behaviour_kl"] < 5e-3
    assert any(r["truncated_frac"] > 0 for r in train)  # the short limit cuts some responses
    evals = [r for r in rows(out) if r["phase"] == "eval"]
    assert evals and evals[-1]["policy_version"] == 4


def test_recipe_math_task_end_to_end(tiny_model_dir, tmp_path):
    """The 32B recipe's data and reward settings through the launcher, with prompts the tiny model can
    read (additions; it never writes "Answer:", so math-verify finds no answer and every reward is the
    recipe's -1: the wrong-answer reward, not a default 0, must reach the learner)."""
    from async_vapo.tasks.arithmetic import AdditionTask

    task = AdditionTask()
    train_file, eval_file = tmp_path / "dapo.jsonl", tmp_path / "aime.jsonl"
    problems = task.problems(64, seed=3, prefix="m")
    train_file.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": task.prompt(p)}],
                    "reward_model": {"ground_truth": p.answer},
                }
            )
            + "\n"
            for p in problems[:48]
        )
    )
    eval_file.write_text(
        "".join(json.dumps({"problem": task.prompt(p), "answer": p.answer}) + "\n" for p in problems[48:])
    )
    out = tmp_path / "math"
    run, _, peak = launch_watching_listeners(
        out,
        "data.task=math",
        f"data.train_file={train_file}",
        f"data.eval_file={eval_file}",
        "data.prompt_field=prompt.0.content",
        "data.answer_field=reward_model.ground_truth",
        "data.eval_prompt_field=problem",
        "data.eval_answer_field=answer",
        'data.eval_prompt_template="{problem}"',  # quoted: YAML reads {problem} as a mapping
        "rollout.n_samples=16",
        "rollout.verifier_processes=16",
        "rollout.wrong_reward=-1.0",
        "train.filter_uniform_rewards=false",  # the recipe's (every group here is uniform)
        "train.groups_per_step=2",
        "rollout.max_tokens=40",
        "train.total_steps=2",
        "train.eval_every=2",
        "train.checkpoint_every=0",
    )
    assert run.returncode == 0, run.stderr[-4000:]
    train = [r for r in rows(out) if r["phase"] == "train"]
    assert [r["step"] for r in train] == [0, 1]
    assert all(r["trained_sequences"] == 2 * 16 for r in train)  # 2 groups of 16 samples
    assert all(r["reward_mean"] == -1.0 and r["accuracy"] == 0.0 for r in train)
    verdicts = train[-1]["controller_counters"]
    assert "verdict_timeout" not in verdicts, verdicts  # a verifier's load is never charged to a sample
    assert verdicts.get("verdict_no_answer", 0) >= 2 * 16 * 3, (
        verdicts
    )  # the math verifier scored every sample
    evals = [r for r in rows(out) if r["phase"] == "eval"]
    assert evals[-1]["eval_problems"] == 16 and evals[-1]["eval_accuracy"] == 0.0
    # launcher, learner, rollout worker, its engine core and the 16 verifier processes at once
    assert peak >= 16 + 4, peak
