"""Small builders shared by tests (no mocks: real messages, real sockets)."""

from __future__ import annotations

import socket
import time

from async_vapo.protocol import Prompt, Response, TrajectoryGroup, pack_f32, pack_i32


def make_group(
    uid: str = "p0",
    n: int = 4,
    tokens: int = 8,
    version: int = 0,
    rewards=None,
    worker: str = "w0",
    seq: int = 0,
) -> TrajectoryGroup:
    rewards = rewards if rewards is not None else [float(i % 2) for i in range(n)]
    responses = [
        Response(
            token_ids=pack_i32(list(range(seq, seq + tokens))),
            logprobs=pack_f32([-0.5] * tokens),
            versions=pack_i32([version] * tokens),
            finish_reason="stop",
            reward=rewards[i],
            correct=rewards[i] > 0,
            verdict="ok",
        )
        for i in range(n)
    ]
    return TrajectoryGroup(Prompt(uid, pack_i32([1, 2, 3]), "42"), responses, worker, time.time())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
