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
