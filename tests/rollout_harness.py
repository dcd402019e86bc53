"""The learner's end of a real rollout worker for the rollout tests: the worker process (vLLM's CPU
backend) with its ZeroMQ sockets and weight group, prompts of the built-in task, transformers' reference
log-probs, and the two-update check that the TP, bf16 and TP-1 engines share."""

from __future__ import annotations

import asyncio
import copy
import json
import multiprocessing as mp
import shutil
import threading

import torch
import uvloop
import zmq.asyncio

from async_vapo.algo import token_logprobs
from async_vapo.cluster.ports import free_port
from async_vapo.config import RolloutConfig
from async_vapo.protocol import (
    Assign,
    Control,
    Hello,
    JoinGroup,
    Prompt,
    Sampling,
    WeightAck,
    WeightUpdate,
    pack_i32,
    unpack_f32,
    unpack_i32,
)
from async_vapo.protocol.transport import ControlServer, GroupReceiver
from async_vapo.rollout.engine import EngineConfig
from async_vapo.rollout.worker import WorkerConfig
from async_vapo.tasks.arithmetic import AdditionTask
from async_vapo.tasks.tiny_model import prompt_ids
from async_vapo.weight_sync.adapter import LoRASpec
from async_vapo.weight_sync.broadcast import EngineLink, snapshot
from async_vapo.weight_sync.group import GroupSpec


class LearnerSide:
    """The learner's sockets on a private event loop thread, so one worker process serves every test."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ctx = zmq.asyncio.Context()
        self.data = self.call(self._make(GroupReceiver, self.ctx))
        self.control = self.call(self._make(ControlServer, self.ctx))

    @staticmethod
    async def _make(cls, ctx):
        return cls(ctx)

    def call(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def next_of(self, kind, timeout=90):
        while True:
            _, msg = await asyncio.wait_for(self.control.recv(), timeout)
            if isinstance(msg, kind):
                return msg

    def close(self):
        self.call(self._close())
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _close(self):
        self.data.close()
        self.control.close()


def start_worker(
    model_dir,
    tp: int = 1,
    env: dict | None = None,
    max_model_len: int = 256,
    max_tokens: int = 80,
    dtype: str = "float32",
    lora: LoRASpec | None = None,
):
    """A real rollout worker process (vLLM engine in ``dtype`` with ``tp`` workers and a context of
    ``max_model_len`` tokens; serving an adapter of shape ``lora``, which updates replace, when given)
    joined to a weight group of world 1 + tp whose learner end is returned: (side, link, proc)."""
    from async_vapo.launch.supervisor import _worker_entry

    side = LearnerSide()
    cfg = WorkerConfig(
        worker_id="w0",
        data_endpoint=side.data.endpoint,
        control_endpoint=side.control.endpoint,
        engine=EngineConfig(
            str(model_dir),
            seed=0,
            max_model_len=max_model_len,
            dtype=dtype,
            tensor_parallel_size=tp,
            lora=lora,
        ),
        rollout=RolloutConfig(n_samples=4, max_tokens=max_tokens, verifier_timeout_s=5.0),
    )
    proc = mp.get_context("spawn").Process(target=_worker_entry, args=(env or {}, [], cfg))
    proc.start()
    hello = side.call(side.next_of(Hello, timeout=240), timeout=250)
    assert hello.worker_id == "w0" and hello.version == 0 and hello.tensor_parallel_size == tp
    spec = GroupSpec("127.0.0.1", free_port(), 1 + tp, "gloo", 60.0)
    link = EngineLink(spec)
    side.call(
        side.control.send(
            "w0", JoinGroup(spec.host, spec.port, spec.world_size, spec.backend, spec.timeout_s)
        )
    )
    link.connect()  # blocks until every worker of the engine joined the group
    return side, link, proc


def stop_worker(side, proc) -> None:
    side.call(side.control.send("w0", Control("shutdown")))
    proc.join(30)
    if proc.is_alive():
        proc.kill()
    side.close()


def hf_logprobs(model, prompt: list[int], response: list[int], temperature: float = 1.0) -> torch.Tensor:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, len(prompt) - 1 : -1] / temperature
    return token_logprobs(logits, torch.tensor([response]))[0]


def assign_and_collect(side, prompts, timeout=120):
    async def go():
        await side.control.send("w0", Assign(prompts))
        return [await asyncio.wait_for(side.data.recv(), timeout) for _ in prompts]

    return side.call(go(), timeout + 10)


def make_prompts(tok, n, seed, version_tag):
    task = AdditionTask()
    return [
        Prompt(f"{version_tag}-{p.uid}", pack_i32(prompt_ids(tok, task, p)), p.answer, "addition")
        for p in task.problems(n, seed, "q")
    ]


def two_updates_then_compare(
    side,
    link,
    model,
    tok,
    atol: float = 2e-3,
    dtype=torch.float32,
    held: dict | None = None,
    make_version=None,
    bucket_bytes: int = 256 * 1024,
    versions: tuple[int, int] = (1, 2),
) -> None:
    """``versions`` (random perturbations of ``model``) are broadcast in buckets of ``dtype``; after
    each, the engine's behaviour log-probs are transformers' log-probs (in fp32) on the new weights within
    ``atol``, not the old ones'. ``held`` (when given) is kept naming the ``model`` whose weights the
    engine holds and its ``version``. ``make_version(version)``, when given, makes each version instead: it
    returns the named tensors to send and the model (fp32) whose log-probs the engine must then give."""
    previous = model
    for version in versions:
        if make_version is None:
            new = perturbed(model, 100 + version).to(dtype)
            snap = snapshot(version, new.named_parameters(), bucket_bytes=bucket_bytes)
            new = new.float()  # the weights the engine holds now (bf16-valued ones), computed in fp32
        else:
            named, new = make_version(version)
            snap = snapshot(version, named, bucket_bytes=bucket_bytes)
        assert len(snap.buckets) > 1  # really bucketed

        async def update(snap=snap, version=version):
            await side.control.send("w0", WeightUpdate(version, snap.buckets))
            seconds = await asyncio.to_thread(link.send, snap)
            ack = await side.next_of(WeightAck)
            return seconds, ack

        seconds, ack = side.call(update())
        assert ack.ok and ack.version == version and seconds < 30
        if held is not None:
            held.update(model=new, version=version)

        groups = assign_and_collect(side, make_prompts(tok, 2, seed=2 + version, version_tag=f"v{version}"))
        for g in groups:
            for r in g.responses:
                ids = unpack_i32(r.token_ids).tolist()
                assert unpack_i32(r.versions).tolist() == [version] * len(ids)
                got = torch.from_numpy(unpack_f32(r.logprobs).copy())
                prompt = unpack_i32(g.prompt.token_ids).tolist()
                torch.testing.assert_close(got, hf_logprobs(new, prompt, ids), atol=atol, rtol=0)
                # not the old weights
                assert (got - hf_logprobs(previous, prompt, ids)).abs().max() > max(1e-2, 5 * atol)
        previous = new


def perturbed(model, seed: int):
    new = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return new.eval()


def never_ending_copy(src, dst, context: int):
    """The model of ``src`` in ``dst`` with a context of ``context`` tokens and an end-of-sequence token
    (id = the model's vocabulary size) that has no output row, so that no response ends before its limit."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    eos = cfg["vocab_size"]
    cfg.update(max_position_embeddings=context, eos_token_id=eos)
    (dst / "config.json").write_text(json.dumps(cfg))
    gen = json.loads((dst / "generation_config.json").read_text())
    (dst / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": eos}))
    tok = json.loads((dst / "tokenizer.json").read_text())
    tok["added_tokens"].append(
        {"id": eos, "content": "<never>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
    )  # fmt: skip
    tok["model"]["vocab"]["<never>"] = eos
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "eos_token": "<never>"}))
    return dst


def reference_logprobs(model, prompt: list[int], response: list[int], chunk: int = 2048) -> torch.Tensor:
    """transformers' log-probs of ``response`` after ``prompt``, the sequence fed in chunks through the KV
    cache (a whole-sequence pass would build a [heads, 22k, 22k] attention matrix)."""
    from transformers import DynamicCache

    ids = torch.tensor([prompt + response])
    cache, logits = DynamicCache(), []
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, start : start + chunk], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    all_logits = torch.cat(logits, 1)[:, len(prompt) - 1 : -1]
    return token_logprobs(all_logits, torch.tensor([response]))[0]


def update_while_sampling(side, link, tok, snap, old, new, prompts: int = 64) -> int:
    """Sends ``snap`` (version = the engine's + 1) while ``prompts`` x 8 responses are being sampled and
    checks what keep mode promises: every response's version tags switch once from the old version to
    the new one, each token's behaviour log-prob is that of the model its tag names (``old`` / ``new``,
    given the whole prefix: the KV cache is recomputed after the load). Returns how many responses span
    both versions."""
    v_new = snap.version
    batch = make_prompts(tok, prompts, seed=31, version_tag=f"keep{v_new}")  # 64 x 8 = 512 > max_num_seqs

    async def go():
        await side.control.send("w0", Assign(batch, Sampling(8, 1.0, 1.0, 80)))
        groups = [await asyncio.wait_for(side.data.recv(), 120)]  # sampling is under way
        await side.control.send("w0", WeightUpdate(v_new, snap.buckets))
        await asyncio.to_thread(link.send, snap)
        ack = await side.next_of(WeightAck)
        groups += [await asyncio.wait_for(side.data.recv(), 120) for _ in range(len(batch) - 1)]
        return ack, groups

    ack, groups = side.call(go(), 400)
    assert ack.ok and ack.version == v_new
    spanning = 0
    for g in groups:
        prompt = unpack_i32(g.prompt.token_ids).tolist()
        for r in g.responses:
            ids = unpack_i32(r.token_ids).tolist()
            versions = unpack_i32(r.versions).tolist()
            k = versions.count(v_new - 1)  # old-version tokens first, then new ones
            assert versions == [v_new - 1] * k + [v_new] * (len(ids) - k), versions
            spanning += 0 < k < len(ids)
            got = torch.from_numpy(unpack_f32(r.logprobs).copy())
            torch.testing.assert_close(got[:k], hf_logprobs(old, prompt, ids)[:k], atol=2e-3, rtol=0)
            torch.testing.assert_close(got[k:], hf_logprobs(new, prompt, ids)[k:], atol=2e-3, rtol=0)
    return spanning
