"""Runs real DeepSpeed VAPO steps on the tiny model inside spawned ranks (gloo on CPU); results come back
as JSON files. Batches are real policy samples of the built-in task (HF sampling), scored by the verifier."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import msgspec
import torch


def make_groups(model_dir: str, n_groups: int, n: int, seed: int):
    from async_vapo.algo import token_logprobs
    from async_vapo.rewards import AdditionVerifier
    from async_vapo.tasks.arithmetic import AdditionTask
    from async_vapo.tasks.tiny_model import prompt_ids

    torch.manual_seed(seed)
    tok, model = _policy(model_dir)
    task, verify = AdditionTask(), AdditionVerifier()
    groups = []
    for p in task.problems(n_groups, seed, "h"):
        ids = prompt_ids(tok, task, p)
        x = torch.tensor([ids] * n)
        with torch.no_grad():
            out = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                do_sample=True,
                max_new_tokens=80,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            resp = out[:, len(ids) :]
            logits = model(input_ids=out).logits[:, len(ids) - 1 : -1]
            lps = token_logprobs(logits, resp)
        responses = []
        for i in range(n):
            row = resp[i].tolist()
            L = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            v = verify(tok.decode(row[:L], skip_special_tokens=True), p.answer)
            finish = "stop" if len(row) > L or row[-1] == tok.eos_token_id else "length"
            responses.append(_response(row[:L], lps[i, :L].tolist(), finish, v.correct, v.detail))
        groups.append(_group(p, ids, responses))
    return groups


def long_group(model_dir: str, response_tokens: int, seed: int):
    """One group at the recipe's response length: a response cut at ``response_tokens`` (finish "length",
    wrong) and a short correct one, with the model's own behaviour log-probs."""
    from async_vapo.algo import token_logprobs
    from async_vapo.tasks.arithmetic import AdditionTask
    from async_vapo.tasks.tiny_model import prompt_ids

    tok, model = _policy(model_dir)
    task = AdditionTask()
    (p,) = task.problems(1, seed, "long")
    ids = prompt_ids(tok, task, p)
    gen = torch.Generator().manual_seed(seed)
    responses = []
    for n, finish, correct in ((response_tokens, "length", False), (40, "stop", True)):
        row = torch.randint(3, model.config.vocab_size, (n,), generator=gen)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + row.tolist()])).logits[:, len(ids) - 1 : -1]
        lps = token_logprobs(logits, row[None])[0]
        responses.append(_response(row.tolist(), lps.tolist(), finish, correct))
    return [_group(p, ids, responses)]


def _policy(model_dir: str):
    """The tiny model's tokenizer and its policy in eval mode (the behaviour policy of the batches)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _response(row: list[int], logprobs: list[float], finish: str, correct: bool, verdict: str = ""):
    """A version-0 response with reward 1 when correct, else 0."""
    from async_vapo.protocol import Response, pack_f32, pack_i32

    return Response(
        pack_i32(row), pack_f32(logprobs), pack_i32([0] * len(row)), finish, float(correct), correct, verdict
    )


def _group(problem, prompt: list[int], responses: list):
    from async_vapo.protocol import Prompt, TrajectoryGroup, pack_i32

    return TrajectoryGroup(
        Prompt(problem.uid, pack_i32(prompt), problem.answer, "addition"), responses, "h", 0.0
    )


def micro_schedule(micro: int | str, k: int, mini_batches: int = 1):
    """The update schedule of step ``k`` under ``micro`` and whether it checkpoints gradients. ``micro``:
    sequences per micro-batch, or "T/C[/gc]": packed micro-batches of up to T tokens, the LM head in chunks
    of C, gradient checkpointing when "/gc" ends it."""
    from async_vapo.learner.schedule import UpdateSchedule

    if isinstance(micro, int):
        return UpdateSchedule(1, mini_batches, micro, k), False
    tokens, chunk, *rest = micro.split("/")
    return UpdateSchedule(1, mini_batches, 64, k, 0, int(tokens), int(chunk)), rest == ["gc"]


def rank_main(rank: int, world: int, port: int, job: dict) -> None:
    from async_vapo.learner.models import local_rank_env

    os.environ.update(local_rank_env(rank, world, port))
    torch.set_num_threads(job.get("threads", 1))
    torch.manual_seed(0)
    random.seed(0)
    from async_vapo.config import AlgoConfig, ModelConfig, TrainConfig
    from async_vapo.learner import checkpoint
    from async_vapo.learner.batch import collate
    from async_vapo.learner.lora import apply_lora
    from async_vapo.learner.models import ds_config, init_distributed, load_policy, load_value, make_engine
    from async_vapo.learner.schedule import UpdateSchedule
    from async_vapo.learner.targets import compute_targets
    from async_vapo.learner.update import fused_update, policy_update, value_update

    init_distributed("gloo")
    model_dir = job["model_dir"]
    algo = AlgoConfig(**job.get("algo", {}))
    if job.get("response_tokens"):
        groups = long_group(model_dir, job["response_tokens"], seed=1)
    else:
        groups = make_groups(model_dir, job["groups"], job["n"], seed=1)
    for gi, keep in job.get("keep_responses", {}).items():  # uneven groups: fewer rows on some rank
        groups[int(gi)] = msgspec.structs.replace(groups[int(gi)], responses=groups[int(gi)].responses[:keep])
    b = collate(groups[rank::world], 0)  # the learner's split: group i on rank i % world
    stage = job.get("zero_stage", 1)
    temperature = job.get("temperature", 1.0)

    lora = job.get("lora")  # {"rank", "critic_rank", "alpha"}: adapters as learner/setup.py applies them

    def engines(warmup: int = 0, checkpointing: bool = False):
        torch.manual_seed(0)
        train = TrainConfig(
            warmup_steps=warmup,
            zero_stage=stage,
            gradient_checkpointing=checkpointing,
            **job.get("train", {}),  # e.g. offload_optimizer / offload_params
        )
        ds = ds_config(train, False, 64)  # ZeRO-3: built partitioned, as the learner does
        actor = load_policy(model_dir, torch.float32, ds)
        critic = load_value(model_dir, "", torch.float32, ds)
        if lora:
            targets = ModelConfig().lora_target_modules
            apply_lora(actor, lora["rank"], lora["alpha"], targets)
            apply_lora(critic.backbone, lora["critic_rank"], lora["alpha"], targets)
        pol = make_engine(actor, job.get("actor_lr", 1e-4), train, False, 64)
        val = make_engine(critic, 1e-3, train, False, 64)
        return pol, val

    def step(pol, val, k, micro=64, mini_batches=1):
        sched, _ = micro_schedule(micro, k, mini_batches)
        t = compute_targets(pol, val, b, algo, temperature, sched.micro)
        vm = value_update(val, b, t, algo, sched)
        pm = policy_update(pol, b, t, algo, temperature, sched)
        return {
            **t.metrics,
            **vm,
            **pm,
            "advantages": t.advantages.tolist(),
            "lengths": b.mask.sum(1).tolist(),
        }

    def full_params(engine):
        import deepspeed

        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return [p.detach().clone() for p in params]

    out: dict = {"steps": []}
    if job["kind"] != "micro":
        pol, val = engines(job.get("warmup", 0))
        before = full_params(pol)
    if job["kind"] == "micro":
        # the same batches under several micro-batch sizes: parameters after the steps, per size
        out["params"] = {}

        def head(pol, val):
            return {
                "policy": [p.flatten()[:4096].tolist() for p in full_params(pol)],
                "value": [p.flatten()[:4096].tolist() for p in full_params(val)],
            }

        for micro in job["micros"]:
            pol, val = engines(job.get("warmup", 0), micro_schedule(micro, 0)[1])
            out.setdefault("initial", head(pol, val))
            for k in range(job["steps"]):
                out["steps"].append(step(pol, val, k, micro, job.get("mini_batches", 1)))
            out["params"][str(micro)] = {
                **head(pol, val),
                "lr": pol.get_lr()[0],
                "optimizer_steps": pol.global_steps,
            }
    elif job["kind"] == "fused":  # the same steps unfused and fused, from the same initial parameters
        for k in range(job["steps"]):
            step(pol, val, k, job.get("micro", 64))
        unfused = [p.detach().clone() for p in full_params(pol) + full_params(val)]
        pol, val = engines()
        micro = job.get("micro", 64)
        for k in range(job["steps"]):
            sched = UpdateSchedule(1, 1, micro, k)
            out["steps"].append(fused_update(pol, val, b, algo, temperature, sched))
        fused = full_params(pol) + full_params(val)
        out["max_diff"] = max(float((x - y).abs().max()) for x, y in zip(unfused, fused, strict=True))
        out["moved"] = max(float((x - y).abs().max()) for x, y in zip(before, full_params(pol), strict=True))
    elif job["kind"] == "train":
        for k in range(job["steps"]):
            out["steps"].append(step(pol, val, k))
        out["moved"] = max(
            float((p.detach() - q).abs().max()) for p, q in zip(pol.module.parameters(), before, strict=True)
        )
        out["checksum"] = float(sum(p.detach().double().sum() for p in pol.module.parameters()))
    elif job["kind"] == "value_pretrain":
        for k in range(job["steps"]):
            t = compute_targets(pol, val, b, algo, 1.0, 64)
            out["steps"].append(
                {
                    "explained_variance": t.metrics["explained_variance"],
                    **value_update(val, b, t, algo, UpdateSchedule(1, 1, 64, k)),
                }
            )
    elif job["kind"] == "resume":
        root = Path(job["ckpt"])
        for k in range(2):
            step(pol, val, k)
        checkpoint.save(root, 2, 2, pol, val, {"ledger": {}}, tokenizer_dir=model_dir, export_hf=True)
        # train.save_optimizer=false: the same step's trained weights and LR schedule, no optimizer state
        light = Path(job["ckpt"] + "_weights")
        checkpoint.save(light, 2, 2, pol, val, {"ledger": {}}, export_hf=False, save_optimizer=False)
        out["lr"] = pol.get_lr()[0]
        out["uninterrupted"] = [step(pol, val, k) for k in (2, 3)]
        pol2, val2 = engines(job.get("warmup", 0))
        state = checkpoint.load(checkpoint.latest(root), pol2, val2)
        out["resumed_step"] = state["step"]
        out["resumed"] = [step(pol2, val2, k) for k in (2, 3)]
        pol3, val3 = engines(job.get("warmup", 0))
        checkpoint.load(checkpoint.latest(light), pol3, val3)
        out["weights_only_lr"] = pol3.get_lr()[0]
        out["weights_only"] = step(pol3, val3, 2)

        def files(d: Path) -> dict[str, int]:
            return {str(f.relative_to(d)): f.stat().st_size for f in d.rglob("*") if f.is_file()}

        out["full_files"], out["weights_files"] = files(root / "step_2"), files(light / "step_2")
        out["hf_files"] = sorted(f.name for f in (root / "step_2" / "hf").iterdir())
        out["optimizer"] = type(pol2.basic_optimizer).__name__
        out["trained"] = sum(p.numel() for p in pol2.module.parameters() if p.requires_grad)
        out["total"] = sum(
            p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in pol2.module.parameters()
        )
    Path(job["out"]).with_suffix(f".rank{rank}.json").write_text(json.dumps(out))
