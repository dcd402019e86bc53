"""The recipe's response length on the rollout side: a real rollout worker whose vLLM engine has the
recipe's context (``rollout.max_model_len`` 22,528) samples responses of its full ``max_tokens`` (20,480)
and streams them over ZeroMQ, every token tagged and carrying the behaviour log-prob of the policy.

The tiny model stops after a few dozen tokens, so the test runs a copy of it whose end-of-sequence token is
one the model cannot emit (an added token past its 17 output rows) and whose declared context is the
recipe's: every response then runs to the length limit, as the truncated responses of a long-CoT run do.
The weights are the tiny model's (rotary positions need no new parameters)."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch

from async_vapo.algo import token_logprobs
from async_vapo.protocol import Assign, Sampling, unpack_f32, unpack_i32
from tests.rollout_harness import make_prompts, start_worker, stop_worker

pytestmark = pytest.mark.slow

MAX_MODEL_LEN, MAX_TOKENS = 22528, 20480  # configs/vapo_qwen2.5_32b.yaml


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


def test_responses_of_the_recipes_length_are_sampled_tagged_and_streamed(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = never_ending_copy(tiny_model_dir, tmp_path / "long", MAX_MODEL_LEN)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.eos_token_id == 17 and tok.pad_token_id == 0
    (prompt,) = make_prompts(tok, 1, seed=3, version_tag="long")
    ids = unpack_i32(prompt.token_ids).tolist()
    side, _, proc = start_worker(model_dir, max_model_len=MAX_MODEL_LEN, max_tokens=MAX_TOKENS)
    try:

        async def go():
            await side.control.send("w0", Assign([prompt], Sampling(2, 1.0, 1.0, MAX_TOKENS)))
            return await asyncio.wait_for(side.data.recv(), 600)

        group = side.call(go(), 610)
    finally:
        stop_worker(side, proc)

    assert group.prompt.uid == prompt.uid and len(group.responses) == 2
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for r in group.responses:
        tokens = unpack_i32(r.token_ids).tolist()
        assert len(tokens) == MAX_TOKENS and r.finish_reason == "length"
        assert unpack_i32(r.versions).tolist() == [0] * MAX_TOKENS
        assert not r.correct and r.reward == 0.0  # scored like any truncated response
        got = torch.from_numpy(unpack_f32(r.logprobs).copy())
        assert got.shape == (MAX_TOKENS,) and bool(torch.isfinite(got).all()) and float(got.max()) <= 0
        # the behaviour log-probs are the policy's own up to the last token of the context
        ref = reference_logprobs(model, ids, tokens)
        torch.testing.assert_close(got, ref, atol=5e-3, rtol=0)
    first, second = (unpack_i32(r.token_ids).tolist() for r in group.responses)
    assert first != second  # two samples, not one response twice
