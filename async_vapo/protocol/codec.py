"""Framing and decoding: ``b"AV" | u16 protocol version | msgpack body``. msgspec only, never pickle.

``Codec.decode`` either returns a validated message or raises ``ProtocolError`` whose ``reason`` names the
counter to bump; it never raises anything else for bad input, so a receiver can count and keep serving.
"""

from __future__ import annotations

import struct

import msgspec

from async_vapo.protocol.messages import PROTOCOL_VERSION, Message, ProtocolError

MAGIC = b"AV"
_HEADER = struct.Struct("<2sH")
HEADER_SIZE = _HEADER.size
DEFAULT_MAX_FRAME = 256 * 1024 * 1024


class Codec:
    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Message)

    def encode(self, msg: Message) -> bytearray:
        """One buffer, header included: the payload is written in place after the header (no concat)."""
        buf = bytearray(HEADER_SIZE)
        self._encoder.encode_into(msg, buf, HEADER_SIZE)
        _HEADER.pack_into(buf, 0, MAGIC, PROTOCOL_VERSION)
        return buf

    def decode(self, frame: bytes | bytearray | memoryview) -> Message:
        view = memoryview(frame)
        if len(view) > self.max_frame_bytes:
            raise ProtocolError("too_large", f"frame of {len(view)} bytes > limit {self.max_frame_bytes}")
        if len(view) < HEADER_SIZE:
            raise ProtocolError("truncated", f"frame of {len(view)} bytes is shorter than the header")
        magic, version = _HEADER.unpack_from(view, 0)
        if magic != MAGIC:
            raise ProtocolError("bad_magic", f"frame starts with {bytes(magic)!r}, expected {MAGIC!r}")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                "bad_version", f"protocol version {version}, this side speaks {PROTOCOL_VERSION}"
            )
        try:
            msg = self._decoder.decode(view[HEADER_SIZE:])
        except (msgspec.DecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise ProtocolError("malformed", str(exc)[:200]) from None
        msg.validate()
        return msg
