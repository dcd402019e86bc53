"""Hostile frames for robustness tests and benchmarks: every kind of bad input a receiving socket must
count and survive. ``hostile_frames`` is deterministic for a seed.

Kinds: random bytes; valid frames truncated; valid frames with a few bytes flipped (these can still
decode, e.g. a flipped token id: the receiver must then refuse them one level up, as an unknown prompt or
an unknown worker); wrong magic; wrong protocol version; valid tags with fields of the wrong types; msgpack
headers declaring huge strings, arrays and maps that the body does not contain; deep nesting.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Iterator

import msgspec

from async_vapo.protocol.codec import HEADER_SIZE, MAGIC, Codec
from async_vapo.protocol.messages import (
    PROTOCOL_VERSION,
    Prompt,
    Response,
    TrajectoryGroup,
    WorkerStats,
    pack_f32,
    pack_i32,
)

KINDS = (
    "random",
    "truncated",
    "mutated",
    "bad_magic",
    "bad_version",
    "wrong_types",
    "huge_length",
    "deep_nesting",
)


def _header(version: int = PROTOCOL_VERSION, magic: bytes = MAGIC) -> bytes:
    return struct.pack("<2sH", magic, version)


def templates() -> list[bytes]:
    """Valid frames to truncate and mutate: a group whose prompt nobody issued, and worker stats."""
    codec = Codec()
    group = TrajectoryGroup(
        Prompt("fuzz-prompt", pack_i32([5, 6, 7]), "12"),
        [
            Response(
                pack_i32(list(range(16))),
                pack_f32([-0.25] * 16),
                pack_i32([0] * 16),
                "stop",
                1.0,
                True,
                "ok",
            )
            for _ in range(4)
        ],
        "fuzz-worker",
        time.time(),
    )
    stats = WorkerStats("fuzz-worker", 1.0, 2.0, 3, 0, 0)
    return [bytes(codec.encode(group)), bytes(codec.encode(stats))]


def _huge_length(rng: random.Random) -> bytes:
    kind = rng.choice([b"\xdb", b"\xc6", b"\xdd", b"\xdf"])  # str32, bin32, array32, map32
    declared = rng.choice([2**31 - 1, 2**32 - 1, 2**30])
    body = b"\x92\xb0trajectory_group" if rng.random() < 0.5 else b""
    return _header() + body + kind + struct.pack(">I", declared) + rng.randbytes(rng.randint(0, 64))


def _wrong_types(rng: random.Random) -> bytes:
    tag = rng.choice(["trajectory_group", "worker_stats", "weight_ack", "control", "assign"])
    junk: object = rng.choice([None, "x" * rng.randint(0, 40), -1, 2**63 - 1, 1.5, [], {}, [1, "a"], b"\x00"])
    fields = [junk] * rng.randint(0, 9)
    return _header() + msgspec.msgpack.encode([tag, *fields])


def hostile_frames(n: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """``n`` (kind, frame) pairs, kinds in rotation."""
    rng = random.Random(seed)
    valid = templates()
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        base = rng.choice(valid)
        if kind == "random":
            frame = rng.randbytes(rng.randint(0, 2048))
        elif kind == "truncated":
            frame = base[: rng.randint(0, len(base) - 1)]
        elif kind == "mutated":
            b = bytearray(base)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(HEADER_SIZE, len(b))] = rng.randrange(256)
            frame = bytes(b)
        elif kind == "bad_magic":
            frame = rng.randbytes(2).replace(b"A", b"X") + base[2:]
        elif kind == "bad_version":
            frame = _header(rng.choice([0, PROTOCOL_VERSION + 1, 0xFFFF])) + base[HEADER_SIZE:]
        elif kind == "wrong_types":
            frame = _wrong_types(rng)
        elif kind == "huge_length":
            frame = _huge_length(rng)
        else:
            depth = rng.randint(100, 5000)
            frame = _header() + b"\x91" * depth + b"\xc0"
        yield kind, frame
