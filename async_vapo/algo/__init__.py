"""Pure VAPO math on tensors (imports torch only; no config objects, no torch.distributed)."""

from async_vapo.algo.advantages import group_normalized_advantages
from async_vapo.algo.gae import (
    decoupled_gae,
    gae,
    length_adaptive_lambda,
    length_adaptive_lambda_clamped,
    terminal_rewards,
    truncation_mask,
    vtrace,
)
from async_vapo.algo.losses import (
    LossAgg,
    aggregate_loss,
    entropy_from_logits,
    explained_variance,
    policy_loss,
    positive_nll_loss,
    token_logprobs,
    value_loss,
)
from async_vapo.algo.masked import (
    masked_mean,
    masked_sq_dev,
    masked_sum,
    masked_sum_count,
    masked_var,
    masked_whiten,
    whiten_with,
)

__all__ = [
    "LossAgg",
    "aggregate_loss",
    "decoupled_gae",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_normalized_advantages",
    "length_adaptive_lambda",
    "length_adaptive_lambda_clamped",
    "masked_mean",
    "masked_sq_dev",
    "masked_sum",
    "masked_sum_count",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "positive_nll_loss",
    "terminal_rewards",
    "token_logprobs",
    "truncation_mask",
    "value_loss",
    "vtrace",
    "whiten_with",
]
