"""Verifiers on real AIME 2024 answers in several surface forms, and the pool's fault handling."""

from __future__ import annotations

import json
import time
from fractions import Fraction
from pathlib import Path

import pytest

from async_vapo.rewards import AdditionVerifier, MathVerifier, VerifierPool, extract_math_answer

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
