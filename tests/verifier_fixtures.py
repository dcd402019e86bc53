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
