"""Verifiers on real AIME 2024 answers in several surface forms, and the pool's fault handling."""

from __future__ import annotations

import json
import time
from fractions import Fraction
from pathlib import Path

import pytest

from async_vapo.rewards import AdditionVerifier, MathVerifier, Verdict, VerifierPool, extract_math_answer

AIME = Path(__file__).resolve().parents[1] / "data" / "aime24.jsonl"  # shipped with the repository


def aime_rows():
    rows = [json.loads(line) for line in AIME.read_text().splitlines() if line.strip()]
    assert len(rows) == 30
    return rows


@pytest.fixture(scope="module")
def pool():
    p = VerifierPool(processes=2, timeout_s=1.5)
    yield p
    p.close()


def surface_forms(answer: str):
    n = int(answer)
    return [
        f"Some reasoning... so the result is \\boxed{{{n}}}.",
        f"Let me compute.\nAnswer: {n}",
        f"Answer: ${n}$",
        f"Answer: \\frac{{{2 * n}}}{{2}}",
        f"Thus \\boxed{{{n}.0}}",
    ]


def test_aime_answers_in_every_surface_form_are_correct(pool):
    items = [("math", form, row["answer"]) for row in aime_rows() for form in surface_forms(row["answer"])]
    verdicts = pool.score(items)
    bad = [(it[1], v) for it, v in zip(items, verdicts, strict=True) if not v.correct]
    assert not bad, bad[:5]


def test_aime_wrong_answers_are_wrong(pool):
    items = []
    for row in aime_rows():
        n = int(row["answer"])
        items += [
            ("math", f"\\boxed{{{n + 1}}}", row["answer"]),
            ("math", f"Answer: {n - 7}", row["answer"]),
            ("math", "I am not sure.", row["answer"]),
        ]
    verdicts = pool.score(items)
    assert not any(v.correct for v in verdicts)
    assert sum(v.detail == "no_answer" for v in verdicts) == 30


def test_fractions_and_decimals_agree():
    v = MathVerifier()
    assert v("Answer: 0.5", "\\frac{1}{2}").correct
    assert v("\\boxed{\\frac{3}{4}}", "0.75").correct
    assert not v("\\boxed{\\frac{3}{5}}", str(float(Fraction(3, 4)))).correct


def test_extraction_prefers_last_answer_line_and_nested_boxes():
    assert extract_math_answer("Answer: 1\nmore\nAnswer: 2") == "2"
    assert extract_math_answer("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert extract_math_answer("no answer here") is None
    assert extract_math_answer("\\boxed{unclosed") is None


def test_addition_verifier():
    v = AdditionVerifier()
    assert v("1+2+0=3;|3", "3").correct
    assert not v("1+2+0=3;|4", "3").correct
    assert v("garbage", "3").detail == "no_answer"


@pytest.mark.parametrize(
    ("factory", "detail"),
    [
        ("tests.verifier_fixtures:hang", "timeout"),
        ("tests.verifier_fixtures:raises", "error"),
        ("tests.verifier_fixtures:garbage", "bad_output"),
        ("tests.verifier_fixtures:dies", "error"),
    ],
)
def test_misbehaving_verifiers_give_zero_within_timeout_and_pool_survives(pool, factory, detail):
    before = pool.counts[detail]
    t0 = time.perf_counter()
    (v,) = pool.score([(factory, "x", "1")])
    assert time.perf_counter() - t0 < pool.timeout_s + 5  # a respawn costs a little more than the timeout
    assert not v.correct and v.detail.startswith(detail)
    assert pool.counts[detail] == before + 1
    # the pool still serves good requests afterwards
    assert pool.score([("addition", "|5", "5")])[0].correct


def test_loading_a_verifier_is_not_charged_to_the_sample():
    """Start-up and loading (a replacement worker after a hang, heavy imports under load) must not make
    a well-behaved sample time out; before this, one hang cascaded into many timeouts on a busy machine."""
    pool = VerifierPool(processes=1, timeout_s=0.5)
    try:
        (v,) = pool.score([("tests.verifier_fixtures:slow_load", "|5", "5")])  # loads in 1.5 s > 0.5 s
        assert v.correct and v.detail == "ok", v
        assert pool.score([("tests.verifier_fixtures:hang", "x", "1")])[0].detail == "timeout"
        (v,) = pool.score([("tests.verifier_fixtures:slow_load", "|7", "7")])  # a fresh worker loads again
        assert v.correct, v
        assert pool.counts["timeout"] == 1
    finally:
        pool.close()


def test_graded_rewards_context_and_several_weighted_verifiers():
    """Rewards v2: a verifier may return a bool, a number within its declared range or a Verdict; it gets
    the prompt and the row's fields it names; several verifiers give the weighted sum of their rewards
    (binary ones at correct_reward / wrong_reward), the first deciding ``correct``."""
    from async_vapo.rewards.base import Scoring
    from async_vapo.rewards.pool import check_verifier

    pool = VerifierPool(processes=1, timeout_s=5.0, correct_reward=1.0, wrong_reward=-1.0)
    try:
        ctx = {"prompt": "12+30=", "bonus": "yes", "unused": 1}
        (full,) = pool.score([("tests.verifier_fixtures:graded", "|42", "42", ctx)])
        assert full == Verdict(True, "ok", 2.0)  # the top of its range (-1, 2): correct
        (part,) = pool.score([("tests.verifier_fixtures:graded", "|12", "42", ctx)])
        assert part == Verdict(False, "wrong", -1.0 + 2.0 * 1 / 2 + 0.5)  # one digit right, the bonus
        (echo,) = pool.score([("tests.verifier_fixtures:context", "x", "1", ctx)])
        assert echo == Verdict(True, "ok: bonus=yes,prompt=12+30=,unused=1", 0.25)  # **kwargs: all of it
        (big,) = pool.score([("tests.verifier_fixtures:out_of_range", "x", "1")])
        assert big == Verdict(False, "bad_output")  # 5.0 outside the default [0, 1]
        spec = Scoring.spec(["tests.verifier_fixtures:graded", "addition"], [0.5, 2.0])
        assert spec == "tests.verifier_fixtures:graded@0.5|addition@2.0"
        (mixed,) = pool.score([(spec, "|12", "42", ctx)])
        assert mixed.correct is False and mixed.reward == pytest.approx(0.5 * 0.5 + 2.0 * -1.0)
        (both,) = pool.score([(spec, "|42", "42", ctx)])
        assert both.correct and both.reward == pytest.approx(0.5 * 2.0 + 2.0 * 1.0)
        hung = Scoring.spec(["addition", "tests.verifier_fixtures:raises"], [1.0, 1.0])
        (err,) = pool.score([(hung, "|42", "42")])
        assert err.correct and err.detail.startswith("error") and err.reward == pytest.approx(1.0 - 1.0)
    finally:
        pool.close()
    assert check_verifier("tests.verifier_fixtures:graded").reward_range == (-1.0, 2.0)
    assert check_verifier("addition") == check_verifier("math").__class__(None, (0.0, 1.0))
    assert "not a finite interval" in (check_verifier("tests.verifier_fixtures:bad_range").error or "")


def test_the_controller_accepts_exactly_the_declared_reward_range():
    from async_vapo.config import load_config
    from async_vapo.controller.admission import GroupRules

    binary = GroupRules.of(load_config(), 17)
    assert binary.reward_bounds is None and binary.reward_ok(1.0, True) and not binary.reward_ok(0.5, True)
    cfg = load_config(
        None,
        ["data.verifiers=[tests.verifier_fixtures:graded, addition]", "data.verifier_weights=[0.5, 2.0]",
         "rollout.wrong_reward=-1"],
    )  # fmt: skip
    rules = GroupRules.of(cfg, 17, ranges={"tests.verifier_fixtures:graded": (-1.0, 2.0)})
    assert rules.reward_bounds == (0.5 * -1.0 + 2.0 * -1.0, 0.5 * 2.0 + 2.0 * 1.0)
    assert rules.reward_ok(3.0, False) and rules.reward_ok(-2.5, True)
    assert not rules.reward_ok(3.01, True) and not rules.reward_ok(1e30, True)
