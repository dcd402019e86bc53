"""Codec: round trips, every rejection reason, and property-based fuzzing of the decoder."""

from __future__ import annotations

import contextlib
import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from async_vapo.protocol import (
    PROTOCOL_VERSION,
    Assign,
    Codec,
    Control,
    Hello,
    Prompt,
    ProtocolError,
    Response,
    TrajectoryGroup,
    WeightAck,
    WeightUpdate,
    pack_f32,
    pack_i32,
    unpack_f32,
    unpack_i32,
)
from tests.helpers import make_group

codec = Codec(max_frame_bytes=1 << 20)


@pytest.mark.parametrize(
    "msg",
    [
        make_group(),
        Assign([Prompt("a", pack_i32([1]), "7")]),
        WeightUpdate(3, [[("model.w", "float32", [2, 3])]]),
        WeightAck("w1", 3, 0.1),
        Hello("w1", 0, 123),
        Control("shutdown", "w1", 1.0, "dropped"),
    ],
)
def test_round_trip(msg):
    assert codec.decode(codec.encode(msg)) == msg


def test_arrays_travel_as_raw_little_endian_buffers():
    g = make_group(tokens=5)
    frame = bytes(codec.encode(g))
    raw = pack_i32(list(range(5)))
    assert raw in frame  # the int32 LE bytes appear verbatim, not as msgpack ints
    assert unpack_i32(g.responses[0].token_ids).tolist() == [0, 1, 2, 3, 4]
    assert unpack_f32(g.responses[0].logprobs).dtype.str == "<f4"


def test_oldest_version():
    g = make_group(version=3)
    assert g.oldest_version == 3


def reject_reason(frame: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        codec.decode(frame)
    return info.value.reason


def test_rejections_name_their_reason():
    good = bytes(codec.encode(make_group()))
    assert reject_reason(b"") == "truncated"
    assert reject_reason(b"XY" + good[2:]) == "bad_magic"
    assert reject_reason(good[:2] + struct.pack("<H", 99) + good[4:]) == "bad_version"
    assert reject_reason(good[: len(good) // 2]) == "malformed"
    header = b"AV" + struct.pack("<H", PROTOCOL_VERSION)
    assert reject_reason(header + msgspec.msgpack.encode(["nosuchtype", 1])) == "malformed"
    assert reject_reason(b"\0" * (2 << 20)) == "too_large"


def _response(**overrides):
    base = dict(
        token_ids=pack_i32([1, 2]),
        logprobs=pack_f32([-0.1, -0.2]),
        versions=pack_i32([0, 0]),
        finish_reason="stop",
        reward=1.0,
        correct=True,
        verdict="ok",
    )
    base.update(overrides)
    return Response(**base)


@pytest.mark.parametrize(
    ("resp", "reason"),
    [
        (_response(logprobs=pack_f32([-0.1])), "length_mismatch"),
        (_response(versions=pack_i32([0, 0, 0])), "length_mismatch"),
        (_response(token_ids=b"\x01\x02\x03"), "length_mismatch"),
        (_response(logprobs=pack_f32([float("nan"), -0.1])), "bad_logprobs"),
        (_response(logprobs=pack_f32([0.5, -0.1])), "bad_logprobs"),
        (_response(versions=pack_i32([2, 1])), "bad_versions"),
        (_response(reward=float("inf")), "bad_reward"),
    ],
)
def test_invalid_content_is_rejected(resp, reason):
    g = TrajectoryGroup(Prompt("p", pack_i32([1]), "1"), [resp], "w", 0.0)
    assert reject_reason(bytes(codec.encode(g))) == reason


def test_empty_group_rejected():
    g = TrajectoryGroup(Prompt("p", pack_i32([1]), "1"), [], "w", 0.0)
    assert reject_reason(bytes(codec.encode(g))) == "empty_group"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_escape_as_other_errors(data):
    for frame in (data, b"AV" + struct.pack("<H", PROTOCOL_VERSION) + data):
        with contextlib.suppress(ProtocolError):
            codec.decode(frame)


GOOD = bytes(codec.encode(make_group(n=2, tokens=3)))


@settings(max_examples=600, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, len(GOOD)),
)
def test_mutated_frames_decode_or_reject(mutations, cut):
    frame = bytearray(GOOD)
    for pos, val in mutations:
        frame[pos] = val
    for candidate in (bytes(frame), bytes(frame[:cut])):
        try:
            msg = codec.decode(candidate)
        except ProtocolError:
            continue
        msg.validate()  # anything accepted satisfies the invariants
