"""The recipe's context on the rollout side: a real rollout worker whose vLLM engine has the recipe's
``rollout.max_model_len`` (22,528) and ``max_tokens`` (20,480) samples until the context is full and streams
the responses over ZeroMQ, every token tagged and carrying the behaviour log-prob of the policy at positions
up to the last one of the context.

The prompt fills all but the last 512 positions, so the engine prefills 22k tokens and then decodes to the
context's end (vLLM caps a request there, ``finish_reason == "length"``): the far positions are reached
without 20,480 decode steps. A response of the full 20,480 tokens (about five minutes of decoding on two
cores) is ``bench/recipe_length.py``'s. The tiny model stops after a few dozen tokens, so the test runs a
copy of it whose end-of-sequence token is one the model cannot emit (``never_ending_copy``)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import torch

from async_vapo.protocol import Assign, Sampling, pack_i32, unpack_f32, unpack_i32
from tests.rollout_harness import (
    make_prompts,
    never_ending_copy,
    reference_logprobs,
    start_worker,
    stop_worker,
)

pytestmark = pytest.mark.slow

MAX_MODEL_LEN, MAX_TOKENS = 22528, 20480  # configs/vapo_qwen2.5_32b.yaml
DECODED = 512  # the positions left to the responses


def long_prompt(prompt, length: int):
    """``prompt`` with its problem repeated until it is ``length`` tokens long (the first token kept)."""
    ids = unpack_i32(prompt.token_ids).tolist()
    body = ids[1:] * (length // max(len(ids) - 1, 1) + 1)
    return msgspec.structs.replace(prompt, token_ids=pack_i32(ids[:1] + body[: length - 1]))


def test_responses_run_to_the_end_of_the_recipes_context_tagged_and_streamed(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = never_ending_copy(tiny_model_dir, tmp_path / "long", MAX_MODEL_LEN)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.eos_token_id == 17 and tok.pad_token_id == 0
    (short,) = make_prompts(tok, 1, seed=3, version_tag="long")
    prompt = long_prompt(short, MAX_MODEL_LEN - DECODED)
    ids = unpack_i32(prompt.token_ids).tolist()
    assert len(ids) == MAX_MODEL_LEN - DECODED
    side, _, proc = start_worker(model_dir, max_model_len=MAX_MODEL_LEN, max_tokens=MAX_TOKENS)
    try:

        async def go():
            await side.control.send("w0", Assign([prompt], Sampling(2, 1.0, 1.0, MAX_TOKENS)))
            return await asyncio.wait_for(side.data.recv(), 300)

        group = side.call(go(), 310)
    finally:
        stop_worker(side, proc)

    assert group.prompt.uid == prompt.uid and len(group.responses) == 2
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for r in group.responses:
        tokens = unpack_i32(r.token_ids).tolist()
        assert len(ids) + len(tokens) == MAX_MODEL_LEN and r.finish_reason == "length"
        assert unpack_i32(r.versions).tolist() == [0] * DECODED
        assert not r.correct and r.reward == 0.0  # scored like any truncated response
        got = torch.from_numpy(unpack_f32(r.logprobs).copy())
        assert got.shape == (DECODED,) and bool(torch.isfinite(got).all()) and float(got.max()) <= 0
        # the behaviour log-probs are the policy's own up to the last position of the context
        ref = reference_logprobs(model, ids, tokens)
        torch.testing.assert_close(got, ref, atol=5e-3, rtol=0)
    first, second = (unpack_i32(r.token_ids).tolist() for r in group.responses)
    assert first != second  # two samples, not one response twice
