"""A real vLLM engine (CPU backend) in a rollout worker process: groups scored and streamed over ZeroMQ,
and weights replaced in place through the dedicated process group."""

from __future__ import annotations

import asyncio

import pytest
import torch

from async_vapo.protocol import (
    Assign,
    Prompt,
    RolloutFailed,
    Sampling,
    TrajectoryGroup,
    pack_i32,
    unpack_f32,
    unpack_i32,
)
from async_vapo.weight_sync.broadcast import snapshot
from tests.rollout_harness import (
    assign_and_collect,
    hf_logprobs,
    make_prompts,
    perturbed,
    start_worker,
    stop_worker,
    two_updates_then_compare,
    update_while_sampling,
)

pytestmark = pytest.mark.slow


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
    two_updates_then_compare(side, link, model, tok, held=ENGINE_WEIGHTS)


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
    spanning = update_while_sampling(side, link, tok, snap, old, new)
    ENGINE_WEIGHTS.update(model=new, version=v_old + 1)
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


def test_a_prompt_the_engine_refuses_is_reported_and_the_worker_goes_on(rollout):
    """A prompt over max_model_len makes vLLM raise: the worker must say so (``RolloutFailed``, with the
    prompt's ticket) instead of only logging it, which left the prompt outstanding and the run waiting."""
    side, _, _, tok, _ = rollout
    (good,) = make_prompts(tok, 1, seed=5, version_tag="f")
    first_id = int(unpack_i32(good.token_ids)[0])
    too_long = Prompt("too-long@0", pack_i32([first_id] * 300), "1", "addition", 0, "tk")

    async def go():
        await side.control.send("w0", Assign([too_long]))
        return await side.next_of(RolloutFailed, timeout=60)

    failed = side.call(go(), timeout=90)
    assert (failed.worker_id, failed.uid, failed.ticket) == ("w0", "too-long@0", "tk") and failed.error
    (group,) = assign_and_collect(side, [good])  # the worker still serves
    assert group.prompt == good and len(group.responses) == 4


def test_a_dead_engine_ends_the_worker_with_its_cause(rollout):
    """(Last: it kills the module's engine.) vLLM's engine core SIGKILLed under a live worker: the prompt
    sent next is reported (``RolloutFailed``, so the controller hands it to another worker) and the worker
    exits with ``exits.ENGINE_DEAD``, which its launcher records and restarts, instead of failing every later
    prompt."""
    import os
    import signal

    from async_vapo.rollout import exits
    from tests.chaos import _title
    from tests.helpers import process_tree

    side, _, _, tok, proc = rollout
    (core,) = [k for k in process_tree(proc.pid) - {proc.pid} if "EngineCore" in _title(k)]
    os.kill(core, signal.SIGKILL)
    (prompt,) = make_prompts(tok, 1, seed=6, version_tag="d")

    async def go():
        await side.control.send("w0", Assign([prompt]))
        return await side.next_of(RolloutFailed, timeout=60)

    failed = side.call(go(), timeout=90)
    assert (failed.uid, failed.ticket) == (prompt.uid, prompt.ticket)
    proc.join(60)
    assert proc.exitcode == exits.ENGINE_DEAD and exits.restartable(proc.exitcode)
    assert exits.cause(proc.exitcode) == "its vLLM engine died"
