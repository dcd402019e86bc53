"""Misbehaving verifiers for fault-injection tests (loaded by name inside pool workers)."""

from __future__ import annotations

import time


class _Hang:
    name = "hang"

    def __call__(self, response, answer):
        time.sleep(3600)


class _Raise:
    name = "raise"

    def __call__(self, response, answer):
        raise RuntimeError("verifier blew up")


class _Garbage:
    name = "garbage"

    def __call__(self, response, answer):
        return {"reward": "lots"}


class _Exit:
    name = "exit"

    def __call__(self, response, answer):
        import os

        os._exit(3)


def hang():
    return _Hang()


def raises():
    return _Raise()


def garbage():
    return _Garbage()


def dies():
    return _Exit()


class _Chaos:
    """The addition verifier, except for some responses (chosen by a hash of the text, so a given
    response always gets the same treatment): hangs, raises or returns garbage."""

    name = "chaos"

    def __init__(self) -> None:
        from async_vapo.rewards.verifiers import AdditionVerifier

        self.inner = AdditionVerifier()

    def __call__(self, response, answer):
        import zlib

        k = zlib.crc32(response.encode()) % 32
        if k == 0:
            time.sleep(3600)
        if k == 1:
            raise RuntimeError("verifier blew up")
        if k == 2:
            return {"reward": "lots"}
        return self.inner(response, answer)


def chaos():
    return _Chaos()


def slow_load():
    """A verifier whose loading takes longer than a sample's timeout (heavy imports, a warm-up)."""
    from async_vapo.rewards.verifiers import AdditionVerifier

    time.sleep(1.5)
    return AdditionVerifier()


class _Graded:
    """Partial credit by the digits in common with the answer; reads the prompt and a row field."""

    name = "graded"
    reward_range = (-1.0, 2.0)

    def __call__(self, response, answer, prompt="", bonus=None):
        from async_vapo.tasks.arithmetic import extract_answer

        got = extract_answer(response) or ""
        if got.lstrip("0") == answer.lstrip("0"):
            return 2.0
        common = sum(a == b for a, b in zip(got[::-1], answer[::-1], strict=False))
        return -1.0 + 2.0 * common / max(1, len(answer)) + (0.5 if bonus and "+" in prompt else 0.0)


def graded():
    return _Graded()


class _Context:
    """Echoes what it was given, to check the keyword arguments (a Verdict with the context in detail)."""

    name = "context"

    def __call__(self, response, answer, **kwargs):
        from async_vapo.rewards import Verdict

        return Verdict(True, "ok: " + ",".join(f"{k}={kwargs[k]}" for k in sorted(kwargs)), 0.25)


def context():
    return _Context()


def out_of_range():
    class _Big:
        name = "big"

        def __call__(self, response, answer):
            return 5.0  # the default range is [0, 1]

    return _Big()


def bad_range():
    class _Bad:
        name = "bad_range"
        reward_range = (1.0, 0.0)

        def __call__(self, response, answer):
            return 0.5

    return _Bad()


def needs_unit():
    """A verifier that needs a row field the run does not send (data.extra_fields lacks it)."""

    class _NeedsUnit:
        name = "needs_unit"

        def __call__(self, response, answer, *, unit):
            return unit in response

    return _NeedsUnit()
