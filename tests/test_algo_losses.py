"""Policy, value and NLL losses, aggregation modes, whitening and the value-free baseline."""

from __future__ import annotations

import pytest
import torch

from async_vapo.algo import (
    aggregate_loss,
    explained_variance,
    gae,
    group_normalized_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    positive_nll_loss,
    value_loss,
)


def batch(b=4, t=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    prox = logp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3
    behav = prox + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    return logp, prox, behav, adv, mask


def reference_policy_loss(logp, prox, behav, adv, mask, lo, hi, cap, agg):
    b, t = logp.shape
    per_seq, total, count = [], 0.0, 0
    for i in range(b):
        s, n = 0.0, 0
        for k in range(t):
            if not mask[i, k]:
                continue
            rho = float(torch.exp(logp[i, k] - prox[i, k]))
            w = 1.0 if behav is None else min(float(torch.exp(prox[i, k] - behav[i, k])), cap)
            a = float(adv[i, k])
            term = -w * min(rho * a, min(max(rho, 1 - lo), 1 + hi) * a)
            s += term
            n += 1
        total += s
        count += n
        per_seq.append(s / max(n, 1))
    return total / count if agg == "token" else sum(per_seq) / b


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("agg", ["token", "sample"])
@pytest.mark.parametrize("off_policy", [False, True])
def test_policy_loss_matches_reference(seed, agg, off_policy):
    logp, prox, behav, adv, mask = batch(seed=seed)
    b = behav if off_policy else None
    loss, metrics = policy_loss(
        logp, prox, adv, mask, eps_low=0.2, eps_high=0.28, behaviour_logprobs=b, iw_cap=2.0, agg=agg
    )
    ref = reference_policy_loss(logp, prox, b, adv, mask, 0.2, 0.28, 2.0, agg)
    assert abs(float(loss.detach()) - ref) < 1e-9
    assert 0 <= float(metrics["clip_frac_low"]) <= 1


def test_decoupled_form_reduces_to_vapo_when_fresh():
    logp, prox, _, adv, mask = batch(seed=4)
    plain, _ = policy_loss(logp, prox, adv, mask, eps_low=0.2, eps_high=0.28)
    fresh, m = policy_loss(
        logp, prox, adv, mask, eps_low=0.2, eps_high=0.28, behaviour_logprobs=prox, iw_cap=5.0
    )
    torch.testing.assert_close(plain, fresh)
    assert float(m["iw_mean"]) == pytest.approx(1.0)


def test_clip_higher_is_asymmetric():
    mask = torch.ones(1, 2, dtype=torch.bool)
    prox = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, 1.0]])
    # ratio 1.25: inside [0.8, 1.28] so unclipped with clip-higher, clipped at 1.2 when symmetric
    logp = torch.full((1, 2), torch.log(torch.tensor(1.25)).item(), requires_grad=True)
    l_high, _ = policy_loss(logp, prox, adv, mask, eps_low=0.2, eps_high=0.28)
    l_sym, _ = policy_loss(logp, prox, adv, mask, eps_low=0.2, eps_high=0.2)
    assert float(l_high.detach()) == pytest.approx(-1.25)
    assert float(l_sym.detach()) == pytest.approx(-1.2)
    (g,) = torch.autograd.grad(l_sym, logp)
    assert torch.all(g == 0)  # clipped side: no gradient


def test_token_level_weights_long_responses_more():
    # one long sequence with advantage +1, one short with -1: token-level favours the long one
    mask = torch.tensor([[1] * 10, [1] * 2 + [0] * 8], dtype=torch.bool)
    per_token = torch.tensor([[1.0] * 10, [-1.0] * 10])
    token = aggregate_loss(per_token, mask, "token")
    sample = aggregate_loss(per_token, mask, "sample")
    assert float(token) == pytest.approx((10 - 2) / 12)
    assert float(sample) == pytest.approx(0.0)


def test_token_level_split_invariance_with_global_denominator():
    logp, prox, _, adv, mask = batch(b=6, seed=7)
    full, _ = policy_loss(logp, prox, adv, mask, eps_low=0.2, eps_high=0.28)
    n = mask.sum()
    parts = [
        policy_loss(logp[s], prox[s], adv[s], mask[s], eps_low=0.2, eps_high=0.28, denominator=n)[0]
        for s in (slice(0, 2), slice(2, 5), slice(5, 6))
    ]
    torch.testing.assert_close(sum(parts), full)


def test_unknown_aggregation_is_a_clear_error():
    with pytest.raises(ValueError, match="valid"):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), "seq")  # type: ignore[arg-type]


def test_nll_zero_with_zero_gradient_without_correct_samples():
    logp = (-torch.rand(3, 5)).requires_grad_()
    mask = torch.ones(3, 5, dtype=torch.bool)
    loss = positive_nll_loss(logp, mask, torch.zeros(3, dtype=torch.bool))
    assert float(loss.detach()) == 0.0
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.all(g == 0)


def test_nll_only_counts_correct_samples_and_is_split_invariant():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(6, 7, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 1, 6, 2])
    mask = torch.arange(7).unsqueeze(0) < lengths.unsqueeze(1)
    correct = torch.tensor([True, False, True, True, False, False])
    full = positive_nll_loss(logp, mask, correct)
    ref = -sum(float(logp[i, :n].sum()) for i, n in enumerate(lengths.tolist()) if correct[i]) / (7 + 5 + 1)
    assert float(full) == pytest.approx(ref)
    n_pos = (mask & correct.unsqueeze(1)).sum()
    split = sum(
        positive_nll_loss(logp[s], mask[s], correct[s], n_pos)
        for s in (slice(0, 1), slice(1, 4), slice(4, 6))
    )
    torch.testing.assert_close(split, full)


def test_value_loss_clipped_closed_form():
    mask = torch.ones(1, 2, dtype=torch.bool)
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]], requires_grad=True)
    returns = torch.tensor([[2.0, 0.0]])
    loss, clip_frac = value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; token 1: 0.01 vs 0.01 -> 0.01
    assert float(loss.detach()) == pytest.approx(0.5 * (3.24 + 0.01) / 2)
    assert float(clip_frac) == pytest.approx(0.5)
    loss_nc, _ = value_loss(values, old, returns, mask, clip_range=None)
    assert float(loss_nc.detach()) == pytest.approx(0.5 * (1.0 + 0.01) / 2)


def test_value_loss_ignores_masked_positions():
    mask = torch.tensor([[True, False]])
    v = torch.tensor([[1.0, 1e6]])
    loss, _ = value_loss(v, v, torch.tensor([[0.0, -1e6]]), mask, clip_range=None)
    assert float(loss.detach()) == pytest.approx(0.5)


def test_explained_variance():
    mask = torch.ones(2, 3, dtype=torch.bool)
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert float(explained_variance(g, g, mask)) == pytest.approx(1.0)
    assert float(explained_variance(torch.zeros_like(g), g, mask)) == pytest.approx(0.0, abs=1e-6)
    const = torch.ones(2, 3)
    assert float(explained_variance(torch.randn(2, 3), const, mask)) == 0.0
    mean_pred = torch.full_like(g, float(g.mean()))
    assert float(explained_variance(mean_pred, g, mask)) == pytest.approx(0.0, abs=1e-6)


def test_explained_variance_of_returns_equal_up_to_rounding_is_zero():
    """A step whose rewards were all 0: GAE's returns (A + V) are 0 up to float rounding; the critic's
    values still vary. Without the tolerance the ratio was -2e14 (a real run's step)."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(64, 40, dtype=torch.bool)
    mask[:, 30:] = False
    values = torch.rand(64, 40, generator=gen) * 0.1
    _, returns = gae(torch.zeros(64, 40), values, mask, gamma=1.0, lam=1.0)
    assert 0 < float(masked_var(returns, mask)) < 1e-12  # rounding, not spread
    assert float(explained_variance(values, returns, mask)) == 0.0
    # a real spread, however small next to the values, is still measured
    r = torch.zeros(64, 40)
    r[:32, 29] = 1e-3
    _, returns = gae(r, values, mask, gamma=1.0, lam=1.0)
    assert float(explained_variance(values, returns, mask)) < -100


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    w = masked_whiten(x, mask)
    assert float(masked_mean(w, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(w[0, 3]) == 0.0
    torch.testing.assert_close(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4, rtol=0)


def test_group_normalized_advantages():
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[0, 2] = False
    adv = group_normalized_advantages(scores, groups, mask)
    std = torch.tensor([1.0, 0.0, 1.0, 0.0]).std()
    assert float(adv[0, 0]) == pytest.approx(0.5 / float(std), rel=1e-4)
    assert float(adv[0, 2]) == 0.0
    assert torch.all(adv[4:] == 0)  # all-equal group: no signal
    assert float(adv[:4, 0].sum()) == pytest.approx(0.0, abs=1e-6)


def test_whitening_from_shard_statistics_matches_the_whole_batch():
    """Two-pass statistics summed over shards (as the learner reduces them over ranks) whiten every shard
    exactly like ``masked_whiten`` whitens the union (reference: a plain loop over valid entries)."""
    from async_vapo.algo import masked_sq_dev, masked_sum_count, whiten_with

    torch.manual_seed(3)
    x = torch.randn(6, 5) * 3 + 1
    mask = torch.rand(6, 5) > 0.3
    vals = [float(x[i, j]) for i in range(6) for j in range(5) if mask[i, j]]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    shards = [slice(0, 2), slice(2, 6)]
    total, count = sum(masked_sum_count(x[s], mask[s]) for s in shards).unbind()
    assert float(total / count) == pytest.approx(mean, rel=1e-5)
    sq = sum(masked_sq_dev(x[s], mask[s], total / count) for s in shards)
    assert float(sq / (count - 1)) == pytest.approx(var, rel=1e-5)
    whole = masked_whiten(x, mask)
    for s in shards:
        torch.testing.assert_close(whiten_with(x[s], mask[s], total / count, sq / (count - 1)), whole[s])


def test_group_normalized_advantages_keep_dtype():
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    adv = group_normalized_advantages(scores, torch.tensor([0, 0, 1, 1]), torch.ones(4, 2, dtype=torch.bool))
    assert adv.dtype == torch.float64 and adv.device == scores.device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_group_normalized_advantages_on_the_gpu():
    """The value-free baseline used to allocate its group sums on the CPU and fail on GPU tensors."""
    dev = torch.device("cuda")
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0], device=dev)
    adv = group_normalized_advantages(
        scores, torch.tensor([0, 0, 1, 1], device=dev), torch.ones(4, 3, dtype=torch.bool, device=dev)
    )
    assert adv.device.type == "cuda" and float(adv[2:].abs().sum()) == 0.0
