"""GAE, Decoupled-GAE and Length-adaptive GAE against reference loops and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from async_vapo.algo import (
    decoupled_gae,
    gae,
    length_adaptive_lambda,
    length_adaptive_lambda_clamped,
    terminal_rewards,
    truncation_mask,
    vtrace,
)


def random_batch(b: int, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0] = t  # one full-length row
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    rewards = torch.randn(b, t, generator=g, dtype=torch.float64)
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    lam = torch.rand(b, generator=g, dtype=torch.float64)
    return rewards, values, mask, lengths, lam


def reference_gae(rewards, values, lengths, gamma, lams):
    """Plain Python loop, one sequence at a time, straight from the formulas."""
    b, t = rewards.shape
    adv = torch.zeros(b, t, dtype=torch.float64)
    ret = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        n = int(lengths[i])
        last = 0.0
        for k in reversed(range(n)):
            next_v = float(values[i, k + 1]) if k + 1 < n else 0.0
            delta = float(rewards[i, k]) + gamma * next_v - float(values[i, k])
            last = delta + gamma * float(lams[i]) * last
            adv[i, k] = last
            ret[i, k] = last + float(values[i, k])
    return adv, ret


@pytest.mark.parametrize("b", [1, 3, 8])
@pytest.mark.parametrize("t", [1, 5, 17])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_matches_reference_loop(b, t, seed):
    rewards, values, mask, lengths, lam = random_batch(b, t, seed)
    gamma = 0.97
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = reference_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


@pytest.mark.parametrize("seed", range(4))
def test_float_lambda_equals_constant_tensor(seed):
    rewards, values, mask, _, _ = random_batch(6, 9, seed)
    a1, r1 = gae(rewards, values, mask, gamma=1.0, lam=0.9)
    a2, r2 = gae(rewards, values, mask, gamma=1.0, lam=torch.full((6,), 0.9, dtype=torch.float64))
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(r1, r2)


@pytest.mark.parametrize("seed", range(4))
def test_values_and_rewards_under_mask_change_nothing(seed):
    rewards, values, mask, _, lam = random_batch(5, 12, seed)
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=lam)
    noise = torch.randn_like(rewards) * 1e3
    adv2, ret2 = gae(
        torch.where(mask, rewards, noise), torch.where(mask, values, -noise), mask, gamma=0.99, lam=lam
    )
    torch.testing.assert_close(adv, adv2)
    torch.testing.assert_close(ret, ret2)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


def test_nan_under_mask_does_not_leak():
    rewards, values, mask, _, lam = random_batch(4, 6, 3)
    values = torch.where(mask, values, torch.full_like(values, float("nan")))
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=lam)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()


def test_extra_padding_columns_change_nothing():
    rewards, values, mask, _, lam = random_batch(4, 7, 5)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=lam)
    pad = 5
    rewards_p = torch.cat([rewards, torch.randn(4, pad, dtype=torch.float64)], dim=1)
    values_p = torch.cat([values, torch.randn(4, pad, dtype=torch.float64)], dim=1)
    mask_p = torch.cat([mask, torch.zeros(4, pad, dtype=torch.bool)], dim=1)
    adv_p, ret_p = gae(rewards_p, values_p, mask_p, gamma=1.0, lam=lam)
    torch.testing.assert_close(adv_p[:, :7], adv)
    torch.testing.assert_close(ret_p[:, :7], ret)
    assert torch.all(adv_p[:, 7:] == 0)


def test_terminal_reward_on_last_valid_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    scores = torch.tensor([1.0, -1.0, 5.0, 2.0])
    r = terminal_rewards(scores, mask)
    expected = torch.tensor(
        [[0, 0, 1.0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 2.0]], dtype=torch.float32
    )
    torch.testing.assert_close(r, expected)


def test_gamma_lambda_one_returns_equal_terminal_reward():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([4, 1, 6])
    mask = torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)
    scores = torch.tensor([1.0, 0.0, -1.0])
    rewards = terminal_rewards(scores, mask)
    values = torch.randn(3, 6, generator=g)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    expected = scores.unsqueeze(1).expand(3, 6) * mask
    torch.testing.assert_close(ret, expected)
    # and the advantage is the return minus the value
    torch.testing.assert_close(adv, torch.where(mask, expected - values, torch.zeros(())))


def test_lambda_zero_is_one_step_td():
    rewards, values, mask, lengths, _ = random_batch(3, 5, 9)
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    for i in range(3):
        n = int(lengths[i])
        for k in range(n):
            nv = values[i, k + 1] if k + 1 < n else 0.0
            assert math.isclose(
                float(adv[i, k]), float(rewards[i, k] + 0.9 * nv - values[i, k]), rel_tol=1e-9
            )


@pytest.mark.parametrize("seed", range(3))
def test_critic_returns_do_not_depend_on_policy_lambda(seed):
    rewards, values, mask, _, lam = random_batch(6, 10, seed)
    pa1, cr1 = decoupled_gae(rewards, values, mask, gamma=1.0, lam_critic=1.0, lam_policy=lam)
    pa2, cr2 = decoupled_gae(rewards, values, mask, gamma=1.0, lam_critic=1.0, lam_policy=0.3)
    torch.testing.assert_close(cr1, cr2)
    assert not torch.allclose(pa1, pa2)
    # critic returns are Monte-Carlo reward-to-go with lambda_critic = 1
    _, mc = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(cr1, mc)


def test_length_adaptive_lambda_values():
    lengths = torch.tensor([0, 1, 19, 20, 21, 100, 1000])
    lam = length_adaptive_lambda(lengths, alpha=0.05)
    expected = torch.tensor([0.0, 0.0, 0.0, 0.0, 1 - 1 / 1.05, 0.8, 0.98])
    torch.testing.assert_close(lam, expected)
    clamped = length_adaptive_lambda_clamped(lengths, alpha=0.05)
    assert clamped.tolist() == [True, True, True, False, False, False, False]


def test_length_adaptive_lambda_monotone_and_bounded():
    lengths = torch.arange(0, 5000)
    lam = length_adaptive_lambda(lengths, alpha=0.05)
    assert torch.all(lam >= 0) and torch.all(lam < 1)
    assert torch.all(lam[1:] >= lam[:-1])


def test_truncation_policy():
    mask = torch.ones(3, 4, dtype=torch.bool)
    truncated = torch.tensor([False, True, False])
    assert torch.equal(truncation_mask(mask, truncated, drop_truncated=False), mask)
    dropped = truncation_mask(mask, truncated, drop_truncated=True)
    assert dropped[1].sum() == 0 and dropped[0].all() and dropped[2].all()


def test_truncated_response_is_terminal_with_its_reward():
    # A cut response is treated like a finished one: no bootstrap from V at the cut.
    mask = torch.ones(1, 3, dtype=torch.bool)
    values = torch.tensor([[0.5, 0.5, 0.5]])
    rewards = terminal_rewards(torch.tensor([0.0]), mask)
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.zeros(1, 3))


def reference_vtrace(rewards, values, lengths, gamma, lams, log_ratio, rho_bar, c_bar):
    """The sum form, one sequence and one position at a time:
    A_t = sum_{k>=t} gamma^(k-t) (prod_{i=t}^{k-1} lam * min(c_bar, w_i)) min(rho_bar, w_k) delta_k."""
    b, t = rewards.shape
    adv = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        n = int(lengths[i])
        lam = float(lams[i])
        w = [math.exp(float(log_ratio[i, k])) for k in range(n)]
        delta = [
            float(rewards[i, k])
            + gamma * (float(values[i, k + 1]) if k + 1 < n else 0.0)
            - float(values[i, k])
            for k in range(n)
        ]
        for s in range(n):
            total, trace = 0.0, 1.0
            for k in range(s, n):
                total += gamma ** (k - s) * trace * min(rho_bar, w[k]) * delta[k]
                trace *= lam * min(c_bar, w[k])
            adv[i, s] = total
    ret = torch.where(
        torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1), adv + values, torch.zeros_like(adv)
    )
    return adv, ret


@pytest.mark.parametrize(("rho_bar", "c_bar"), [(1.0, 1.0), (2.0, 0.5), (0.7, 1.5)])
def test_vtrace_matches_the_reference_sum(rho_bar, c_bar):
    rewards, values, mask, lengths, lam = random_batch(6, 9, seed=11)
    log_ratio = torch.randn(6, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5
    adv, ret = vtrace(rewards, values, mask, log_ratio, gamma=0.97, lam=lam, rho_bar=rho_bar, c_bar=c_bar)
    ref_adv, ref_ret = reference_vtrace(rewards, values, lengths, 0.97, lam, log_ratio, rho_bar, c_bar)
    torch.testing.assert_close(adv, ref_adv, atol=1e-10, rtol=0)
    torch.testing.assert_close(ret, ref_ret, atol=1e-10, rtol=0)


def test_vtrace_on_policy_is_gae():
    rewards, values, mask, _, lam = random_batch(5, 8, seed=12)
    on_policy = torch.zeros(5, 8, dtype=torch.float64)
    for lam_i in (lam, 1.0, 0.9):
        torch.testing.assert_close(
            vtrace(rewards, values, mask, on_policy, gamma=1.0, lam=lam_i),
            gae(rewards, values, mask, gamma=1.0, lam=lam_i),
        )
    # off-policy tokens whose ratio exceeds both bounds are truncated to the on-policy case
    torch.testing.assert_close(
        vtrace(rewards, values, mask, on_policy + 2.0, gamma=1.0, lam=lam),
        gae(rewards, values, mask, gamma=1.0, lam=lam),
    )
