"""Packed micro-batches and the chunked LM head (learner/forward.py) against the padded layout and the
model's own logits: same log-probs, entropies, values and gradients, for lengths from 1 to 10x the
shortest."""

from __future__ import annotations

import pytest
import torch

from async_vapo import algo
from async_vapo.learner.batch import collate
from async_vapo.learner.forward import Micro, pack, policy_forward, token_slices, trim, value_forward
from async_vapo.protocol import Prompt, Response, TrajectoryGroup, pack_f32, pack_i32

PROMPTS = [3, 9]  # tokens, one prompt per group
RESPONSES = [[4, 40, 1], [12, 27, 9]]  # tokens of each group's responses


def _batch(vocab: int):
    gen = torch.Generator().manual_seed(0)
    groups = []
    for g in range(2):
        responses = []
        prompt = torch.randint(3, vocab, (PROMPTS[g],), generator=gen).tolist()
        for r_len in RESPONSES[g]:
            toks = torch.randint(3, vocab, (r_len,), generator=gen).tolist()
            responses.append(
                Response(pack_i32(toks), pack_f32([-1.0] * r_len), pack_i32([0] * r_len), "stop", 1.0, True)
            )
        groups.append(TrajectoryGroup(Prompt(f"p{g}", pack_i32(prompt), "1"), responses, "w", 0.0))
    return collate(groups, 0)


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from async_vapo.learner.models import load_policy, load_value

    torch.manual_seed(0)
    policy = load_policy(str(tiny_model_dir), torch.float32).eval()
    value = load_value(str(tiny_model_dir), "", torch.float32).eval()
    with torch.no_grad():  # a non-zero head, so that values depend on the positions
        value.head.weight.normal_(0, 0.1)
    return policy, value


def test_pack_maps_every_response_token_to_its_predicting_position():
    b = _batch(17)
    ids, pos, index = pack(b)
    lengths = b.attention_mask.sum(1)
    assert ids.shape == (1, int(lengths.sum())) and pos[0, : int(lengths[0])].tolist() == list(
        range(int(lengths[0]))
    )
    for r in range(b.size):
        for t in range(int(b.mask[r].sum())):  # the flat token at index + 1 is response token t
            assert ids[0, index[r, t] + 1] == b.response_ids[r, t]


def test_token_slices_match_a_reference_loop():
    def reference(lengths, budget):
        out, cur = [], []
        for i, n in enumerate(lengths):
            if cur and sum(lengths[j] for j in cur) + n > budget:
                out.append(slice(cur[0], cur[-1] + 1))
                cur = []
            cur.append(i)
        return out + ([slice(cur[0], cur[-1] + 1)] if cur else [])

    for lengths, budget in [([5, 5, 5], 10), ([30, 2, 2, 40, 1], 32), ([100], 10), ([], 8), ([3, 4, 3], 100)]:
        assert token_slices(lengths, budget) == reference(lengths, budget)


@pytest.mark.parametrize(
    "micro", [Micro(tokens=1000), Micro(tokens=1000, logit_chunk=7), Micro(logit_chunk=5), Micro()]
)
def test_policy_log_probs_entropy_and_gradients_match_the_padded_model(models, micro):
    policy, _ = models
    b = _batch(policy.config.vocab_size)
    assert b.mask.sum(1).max() >= 10 * b.mask.sum(1).min()  # lengths from 1 to 40
    # the model's own full logits, gathered at the predicting positions (the padded reference)
    logits = policy(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    idx = b.resp_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    ref = algo.token_logprobs(logits.gather(1, idx) / 0.7, b.response_ids)
    ref_ent = algo.entropy_from_logits(logits.gather(1, idx) / 0.7)
    w = torch.randn(b.mask.shape, generator=torch.Generator().manual_seed(1)) * b.mask
    (ref * w).sum().backward()
    ref_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    logp, ent = policy_forward(policy, b, 0.7, micro, with_entropy=True)
    (logp * w).sum().backward()
    torch.testing.assert_close(logp[b.mask], ref[b.mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[b.mask], ref_ent[b.mask], atol=1e-5, rtol=0)
    for p, g in zip(policy.parameters(), ref_grads, strict=True):
        torch.testing.assert_close(p.grad, g, atol=5e-5, rtol=1e-4)
    policy.zero_grad()


def test_values_and_gradients_match_between_packed_and_padded(models):
    _, value = models
    b = _batch(17)
    w = torch.randn(b.mask.shape, generator=torch.Generator().manual_seed(2)) * b.mask
    grads = []
    outs = []
    for micro in (Micro(), Micro(tokens=1000)):
        v = value_forward(value, b, micro)
        (v * w).sum().backward()
        outs.append(v)
        grads.append([p.grad.clone() for p in value.parameters()])
        value.zero_grad()
    torch.testing.assert_close(outs[0][b.mask], outs[1][b.mask], atol=1e-5, rtol=0)
    ref = value(b.input_ids, b.attention_mask).gather(1, b.resp_index)  # the model's own forward
    torch.testing.assert_close(outs[1][b.mask], ref[b.mask], atol=1e-5, rtol=0)
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1, atol=5e-5, rtol=1e-4)


def _outputs_and_grads(model, fn, w):
    out = fn()
    (out * w).sum().backward()
    grads = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    return out, grads


def test_a_micro_batch_of_short_rows_runs_at_its_own_width_with_the_full_width_results(models):
    """A micro-batch selected from a batch keeps the batch's width; the padded forward trims it to its
    longest row: same log-probs, values and gradients as the model's own forward at the full width."""
    policy, value = models
    b = _batch(policy.config.vocab_size)
    short = b.select(torch.tensor([0, 2, 3]))  # rows of 7, 4 and 21 tokens; the batch is 43 wide
    ids, attn, resp_index = trim(short)
    assert ids.shape[1] == 21 < short.input_ids.shape[1] == 43
    assert torch.equal(attn, short.attention_mask[:, :21]) and int(attn[:, 20].sum()) == 1
    assert int(resp_index.max()) == 20 and torch.equal(resp_index[short.mask], short.resp_index[short.mask])
    w = torch.randn(short.mask.shape, generator=torch.Generator().manual_seed(3)) * short.mask

    def full_width_logprobs():
        logits = policy(input_ids=short.input_ids, attention_mask=short.attention_mask).logits
        idx = short.resp_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
        return algo.token_logprobs(logits.gather(1, idx) / 0.7, short.response_ids)

    cases = [
        (policy, lambda: policy_forward(policy, short, 0.7, Micro(sequences=8))[0], full_width_logprobs),
        (
            value,
            lambda: value_forward(value, short, Micro(sequences=8)),
            lambda: value(short.input_ids, short.attention_mask).gather(1, short.resp_index),
        ),
    ]
    for model, trimmed, full in cases:
        out, grads = _outputs_and_grads(model, trimmed, w)
        ref, ref_grads = _outputs_and_grads(model, full, w)
        torch.testing.assert_close(out[short.mask], ref[short.mask], atol=1e-5, rtol=0)
        for g, rg in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, rg, atol=5e-5, rtol=1e-4)


def test_the_scoring_head_keeps_the_checkpoint_layout_and_refuses_post_processed_logits(
    models, tiny_model_dir
):
    from transformers import AutoConfig, AutoModelForCausalLM

    from async_vapo.learner.forward import ScoringHead, install_scoring_head, scoring_head

    policy, _ = models
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert isinstance(scoring_head(policy), ScoringHead)
    assert policy.state_dict().keys() == plain.state_dict().keys()  # same names: exports, publishing
    assert policy.lm_head.weight is policy.model.embed_tokens.weight  # still tied
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.final_logit_softcapping = 30.0  # a forward that rescales the head's output
    capped = AutoModelForCausalLM.from_config(config)
    assert not install_scoring_head(capped) and scoring_head(capped) is None
