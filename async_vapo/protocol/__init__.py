"""The road between rollout and learner: wire types (messages), framing (codec), sockets (transport)."""

from async_vapo.protocol.codec import Codec
from async_vapo.protocol.messages import (
    PROTOCOL_VERSION,
    Assign,
    Control,
    Hello,
    Message,
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

__all__ = [
    "PROTOCOL_VERSION",
    "Assign",
    "Codec",
    "Control",
    "Hello",
    "Message",
    "Prompt",
    "ProtocolError",
    "Response",
    "TrajectoryGroup",
    "WeightAck",
    "WeightUpdate",
    "pack_f32",
    "pack_i32",
    "unpack_f32",
    "unpack_i32",
]
