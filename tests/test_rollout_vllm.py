"""A real vLLM engine (CPU backend) in a rollout worker process: groups scored and streamed over ZeroMQ,
and weights replaced in place through the dedicated process group."""

from __future__ import annotations

import asyncio
import copy
import multiprocessing as mp
import threading

import pytest
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
    TrajectoryGroup,
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
from async_vapo.weight_sync.broadcast import EngineLink, snapshot
from async_vapo.weight_sync.group import GroupSpec

pytestmark = pytest.mark.slow


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
):
    """A real rollout worker process (vLLM engine in ``dtype`` with ``tp`` workers and a context of
    ``max_model_len`` tokens) joined to a weight group of world 1 + tp whose learner end is returned:
    (side, link, proc)."""
    from async_vapo.launch.supervisor import _worker_entry

    side = LearnerSide()
    cfg = WorkerConfig(
        worker_id="w0",
        data_endpoint=side.data.endpoint,
        control_endpoint=side.control.endpoint,
        engine=EngineConfig(
            str(model_dir), seed=0, max_model_len=max_model_len, dtype=dtype, tensor_parallel_size=tp
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


@pytest.fixture(scope="module")
def rollout(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    side, link, proc = start_worker(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ENGINE_WEIGHTS.update(model=model, version=0)
    yield side, link, model, tok, proc
    stop_worker(side, proc)


ENGINE_WEIGHTS: dict = {}  # the transformers "model" whose weights the engine holds now, its "version"


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


def test_group_sampled_scored_and_streamed(rollout):
    side, _, model, tok, _ = rollout
    prompts = make_prompts(tok, 3, seed=1, version_tag="a")
    groups = assign_and_collect(side, prompts)
    assert sorted(g.prompt.uid for g in groups) == sorted(p.uid for p in prompts)
    for g in groups:
        assert isinstance(g, TrajectoryGroup) and len(g.responses) == 4 and g.worker_id == "w0"
        for r in g.responses:
            ids = unpack_i32(r.token_ids).tolist()
            assert ids and unpack_i32(r.versions).tolist() == [0] * len(ids)
            text = tok.decode(ids, skip_special_tokens=True)
            assert r.correct == (text.rsplit("|", 1)[-1] == g.prompt.answer and "|" in text)
            assert r.reward == (1.0 if r.correct else 0.0)
            # the behaviour log-probs vLLM reported are the policy's own log-probs of those tokens
            ref = hf_logprobs(model, unpack_i32(g.prompt.token_ids).tolist(), ids)
            torch.testing.assert_close(
                torch.from_numpy(unpack_f32(r.logprobs).copy()), ref, atol=2e-3, rtol=0
            )


def test_weight_update_changes_outputs_to_the_new_weights(rollout):
    """Two updates in a row: the second reuses the first one's receive buffers (FlatPool)."""
    side, link, model, tok, _ = rollout
    two_updates_then_compare(side, link, model, tok)


def two_updates_then_compare(side, link, model, tok, atol: float = 2e-3, dtype=torch.float32) -> None:
    """Versions 1 and 2 (random perturbations of ``model``) are broadcast in buckets of ``dtype``; after
    each, the engine's behaviour log-probs are transformers' log-probs (in fp32) on the new weights within
    ``atol``, not the old ones'."""
    previous = model
    for version in (1, 2):
        new = perturbed(model, 100 + version).to(dtype)
        snap = snapshot(version, new.named_parameters(), bucket_bytes=256 * 1024)
        new = new.float()  # the weights the engine holds now (bf16-valued ones), computed in fp32
        assert len(snap.buckets) > 1  # really bucketed

        async def update(snap=snap, version=version):
            await side.control.send("w0", WeightUpdate(version, snap.buckets))
            seconds = await asyncio.to_thread(link.send, snap)
            ack = await side.next_of(WeightAck)
            return seconds, ack

        seconds, ack = side.call(update())
        assert ack.ok and ack.version == version and seconds < 30
        ENGINE_WEIGHTS.update(model=new, version=version)

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


def test_keep_mode_update_continues_requests_under_the_new_weights(rollout):
    """``rollout.weight_update = keep`` (the default): an update that arrives while 512 responses are
    being sampled does not wait for them. Responses in flight continue under the new weights: their
    version tags switch once from the old version to the new one, every token's behaviour log-prob is
    that of the weights its tag names (given the whole prefix: the KV cache is recomputed after the
    load), and some responses span both versions."""
    side, link, _, tok, _ = rollout
    old = ENGINE_WEIGHTS["model"]
    v_old = ENGINE_WEIGHTS["version"]
    new = perturbed(old, 300)
    snap = snapshot(v_old + 1, new.named_parameters(), bucket_bytes=256 * 1024)
    prompts = make_prompts(tok, 64, seed=31, version_tag="keep")  # 64 x 8 = 512 > max_num_seqs (256)

    async def go():
        await side.control.send("w0", Assign(prompts, Sampling(8, 1.0, 1.0, 80)))
        groups = [await asyncio.wait_for(side.data.recv(), 120)]  # sampling is under way
        await side.control.send("w0", WeightUpdate(v_old + 1, snap.buckets))
        await asyncio.to_thread(link.send, snap)
        ack = await side.next_of(WeightAck)
        groups += [await asyncio.wait_for(side.data.recv(), 120) for _ in range(len(prompts) - 1)]
        return ack, groups

    ack, groups = side.call(go(), 400)
    assert ack.ok and ack.version == v_old + 1
    ENGINE_WEIGHTS.update(model=new, version=v_old + 1)
    spanning = 0
    for g in groups:
        prompt = unpack_i32(g.prompt.token_ids).tolist()
        for r in g.responses:
            ids = unpack_i32(r.token_ids).tolist()
            versions = unpack_i32(r.versions).tolist()
            k = versions.count(v_old)  # old-version tokens first, then new ones
            assert versions == [v_old] * k + [v_old + 1] * (len(ids) - k), versions
            spanning += 0 < k < len(ids)
            got = torch.from_numpy(unpack_f32(r.logprobs).copy())
            torch.testing.assert_close(got[:k], hf_logprobs(old, prompt, ids)[:k], atol=2e-3, rtol=0)
            torch.testing.assert_close(got[k:], hf_logprobs(new, prompt, ids)[k:], atol=2e-3, rtol=0)
    assert spanning > 0  # requests in flight were continued, not drained before the load


def test_behaviour_logprobs_follow_the_sampling_temperature(rollout):
    """At temperature 0.7 the behaviour log-probs are those of softmax(logits / 0.7), the distribution
    the learner computes (vLLM's processed log-probs; raw ones would be the temperature-1 model's)."""
    side, _, _, tok, _ = rollout
    prompts = make_prompts(tok, 2, seed=9, version_tag="t07")

    async def go():
        await side.control.send("w0", Assign(prompts, Sampling(4, 0.7, 1.0, 80)))
        return [await asyncio.wait_for(side.data.recv(), 120) for _ in prompts]

    reference = ENGINE_WEIGHTS["model"]  # whatever version the engine holds now
    for g in side.call(go(), 130):
        prompt = unpack_i32(g.prompt.token_ids).tolist()
        for r in g.responses:
            ids = unpack_i32(r.token_ids).tolist()
            got = torch.from_numpy(unpack_f32(r.logprobs).copy())
            torch.testing.assert_close(got, hf_logprobs(reference, prompt, ids, 0.7), atol=2e-3, rtol=0)
            assert (got - hf_logprobs(reference, prompt, ids, 1.0)).abs().max() > 1e-2
