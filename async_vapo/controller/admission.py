"""What a worker sends is input, not truth: every group and every control message is checked against
what the controller issued before anything else sees it.

A group is admitted only when it answers a prompt that is outstanding, comes from the worker that prompt
was sent to, carries the prompt exactly as sent (its random ticket included, so a peer that never received
the prompt cannot answer it), and has the shape the run's config allows: ``rollout.n_samples`` responses
(the ``Sampling`` of an evaluation round), each of 1..``max_tokens`` tokens with ids in ``[0, vocab)``,
prompt + response within ``max_model_len``, token versions between the worker's version when the prompt
was sent and the learner's version now, and a reward the verifiers can give that agrees with ``correct``.

Pure functions: the controller (``controller.service``) calls them under its lock and counts the reason a
group is refused (``GroupRejection``); nothing invalid reaches the buffer or ``collate``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum

from async_vapo.config import Config
from async_vapo.protocol import Hello, Prompt, TrajectoryGroup, unpack_i32

# worker ids come from the launcher's node plan (``cluster.nodes``: "w<node>-<engine>" and the like); they
# name files and log lines, so they are never free text
WORKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


PLANNED_ID = re.compile(r"rollout-(0|[1-9][0-9]{0,8})")  # rollout_worker_id's names


def rollout_worker_id(engine: int) -> str:
    """The launcher's name for the worker of engine ``engine`` (0-based over the whole run)."""
    return f"rollout-{engine}"


class GroupRejection(str, Enum):
    """Why a group was refused (counted as ``group_rejected_<value>``)."""

    WRONG_WORKER = "wrong_worker"  # answered by a worker the prompt was not sent to
    PROMPT_MISMATCH = "prompt_mismatch"  # the prompt on the wire is not the one sent (ticket included)
    SAMPLE_COUNT = "sample_count"  # not the number of responses asked for
    LENGTH = "length"  # a response with no tokens or more than max_tokens
    MODEL_LEN = "model_len"  # prompt + response over max_model_len
    TOKEN_RANGE = "token_range"  # a token id outside [0, vocab)
    VERSIONS = "versions"  # token versions older than the worker's at assignment or newer than the learner's
    REWARD = "reward"  # a reward no verifier gives, or one that disagrees with ``correct``


@dataclass(frozen=True, kw_only=True)
class GroupRules:
    """The bounds a group must respect, all from the run's config (and the model's vocabulary)."""

    vocab_size: int
    n_samples: int
    max_tokens: int
    max_model_len: int
    correct_reward: float
    wrong_reward: float
    tensor_parallel_size: int
    eval_samples: int = 1
    engines: int = 0  # > 0: the launcher's plan has this many engines, and only their workers may join
    # graded or several verifiers: the interval their (weighted) rewards lie in; None = exactly
    # correct_reward / wrong_reward, agreeing with ``correct``
    reward_bounds: tuple[float, float] | None = None

    @classmethod
    def of(
        cls,
        cfg: Config,
        vocab_size: int,
        engines: int = 0,
        ranges: dict[str, tuple[float, float]] | None = None,
    ) -> GroupRules:
        """``ranges``: the reward range each of the run's verifiers declares (``reward_bounds``)."""
        r = cfg.rollout
        return cls(
            reward_bounds=reward_bounds(cfg, ranges or {}),
            engines=engines,
            vocab_size=vocab_size,
            n_samples=r.n_samples,
            max_tokens=r.max_tokens,
            max_model_len=r.max_model_len,
            correct_reward=r.correct_reward,
            wrong_reward=r.wrong_reward,
            tensor_parallel_size=r.tensor_parallel_size,
            eval_samples=r.eval_samples,
        )

    @property
    def max_frame_bytes(self) -> int:
        """The largest data-road frame an honest worker sends: the bigger of a training and an evaluation
        group at full length (12 bytes a token: id, log-prob, version; a verdict of up to 4 KiB each),
        the prompt and its answer. ZeroMQ refuses anything larger before it is read."""
        per_response = 12 * self.max_tokens + 4096
        prompt = 4 * self.max_model_len + (1 << 16)
        return max(self.n_samples, self.eval_samples) * per_response + prompt + (1 << 16)

    def reward_ok(self, reward: float, correct: bool) -> bool:
        """``reward`` is what the verifiers give for a response judged ``correct`` (or not)."""
        if self.reward_bounds is not None:
            lo, hi = self.reward_bounds
            slack = 1e-6 * max(1.0, abs(lo), abs(hi))  # a weighted sum's rounding
            return lo - slack <= reward <= hi + slack
        if self.correct_reward == self.wrong_reward:
            return reward == self.correct_reward
        return reward == (self.correct_reward if correct else self.wrong_reward)


def reward_bounds(cfg: Config, ranges: dict[str, tuple[float, float]]) -> tuple[float, float] | None:
    """The interval a response's reward lies in when the run's verifiers may grade (None: one binary
    verifier, whose rewards are exactly correct_reward / wrong_reward). Each verifier contributes its
    weight times the hull of its declared range (``ranges``; the built-in ones are binary) and the
    binary rewards (a verifier that times out or errs gives the wrong reward)."""
    from async_vapo.config import verifier_names
    from async_vapo.rewards.verifiers import REGISTRY

    names = verifier_names(cfg)
    weights = list(cfg.data.verifier_weights) or [1.0] * len(names)
    if not names or (len(names) == 1 and weights == [1.0] and names[0] in REGISTRY):
        return None
    r = cfg.rollout
    binary = (min(r.correct_reward, r.wrong_reward), max(r.correct_reward, r.wrong_reward))
    lo = hi = 0.0
    for name, w in zip(names, weights, strict=True):
        a, b = binary if name in REGISTRY else ranges.get(name, binary)
        lo += w * min(a, binary[0])
        hi += w * max(b, binary[1])
    return lo, hi


def check_group(
    group: TrajectoryGroup,
    *,
    sent_to: str,
    sent: Prompt,
    n_samples: int,
    max_tokens: int,
    oldest_version: int,
    newest_version: int,
    rules: GroupRules,
) -> GroupRejection | None:
    """Why ``group`` must be refused, or None when it may be admitted.

    ``sent_to`` / ``sent``: the worker and the exact prompt the controller issued for ``group.prompt.uid``;
    ``n_samples`` / ``max_tokens``: the sampling it was issued with; versions: the worker's policy version
    when the prompt was sent and the learner's now (no token can lie outside them)."""
    if group.worker_id != sent_to:
        return GroupRejection.WRONG_WORKER
    if group.prompt != sent:
        return GroupRejection.PROMPT_MISMATCH
    if len(group.responses) != n_samples:
        return GroupRejection.SAMPLE_COUNT
    prompt_len = len(sent.token_ids) // 4
    for r in group.responses:
        n = r.n_tokens
        if not 1 <= n <= max_tokens:
            return GroupRejection.LENGTH
        if prompt_len + n > rules.max_model_len:
            return GroupRejection.MODEL_LEN
        ids = unpack_i32(r.token_ids)
        if int(ids.min()) < 0 or int(ids.max()) >= rules.vocab_size:
            return GroupRejection.TOKEN_RANGE
        ver = unpack_i32(r.versions)
        if int(ver[0]) < oldest_version or int(ver[-1]) > newest_version:
            return GroupRejection.VERSIONS
        if not math.isfinite(r.reward) or not rules.reward_ok(r.reward, r.correct):
            return GroupRejection.REWARD
    return None


PROMPT_TIMEOUT_FLOOR_S = 300.0
SLOWEST_TOKENS_PER_S = 5.0  # per request: a long response decoded in a full batch on a busy engine


def prompt_timeout_s(configured_s: float, max_tokens: int) -> float:
    """How long an issued prompt may stay out: ``train.prompt_timeout_s``, or ``rollout.max_tokens`` at
    ``SLOWEST_TOKENS_PER_S`` with a floor (20,480 tokens: 68 minutes; 96 tokens: 5 minutes)."""
    return (
        configured_s if configured_s > 0 else max(PROMPT_TIMEOUT_FLOOR_S, max_tokens / SLOWEST_TOKENS_PER_S)
    )


def check_hello(hello: Hello, sender: str, rules: GroupRules) -> str | None:
    """Why a ``Hello`` must be refused (a counter suffix), or None. ``sender`` is the socket identity."""
    if not WORKER_ID.fullmatch(hello.worker_id):
        return "bad_worker_id"
    if hello.worker_id != sender:
        return "identity_mismatch"
    if rules.engines:
        m = PLANNED_ID.fullmatch(hello.worker_id)
        if m is None or int(m.group(1)) >= rules.engines:
            return "unplanned_worker"
    if hello.tensor_parallel_size != rules.tensor_parallel_size:
        return "tp_mismatch"
    return None


def prompt_fits(prompt: Prompt, max_model_len: int) -> bool:
    """A prompt of at least one token that leaves room for a response (vLLM refuses a prompt of
    ``max_model_len`` tokens or more, and the learner needs a token to predict the first response token
    from)."""
    return 1 <= len(prompt.token_ids) // 4 < max_model_len
