"""ZeroMQ transport on asyncio: a data road (rollout PUSH -> learner PULL) and a control road
(learner ROUTER <-> rollout DEALER).

How it fails, and what the caller sees:
- A slow learner: PUSH sockets queue up to ``sndhwm`` frames, then ``GroupSender.send`` waits. Nothing is
  dropped and memory stays bounded. The stronger bound is the credit scheme above the transport: a worker
  only samples prompts the learner side assigned to it (``Assign``), so the data in flight is at most the
  credits granted.
- A dead peer: ZeroMQ reconnects on its own; frames queued for a dead PUSH peer wait for it. Liveness is
  judged by the supervisor (heartbeats on the control road), not by the socket.
- Bad input on a receiving socket (garbage, truncated, oversized, wrong protocol version, invalid arrays):
  the frame is dropped, ``rejected[reason]`` is incremented, one log line is written (rate-limited), and the
  receiver keeps serving. Frames above ``max_frame_bytes`` are refused by ZeroMQ itself (``MAXMSGSIZE``),
  before they are buffered.
- Binding to a non-loopback address needs CURVE keys (``Security``) or an explicit ``insecure=True``,
  which logs a warning. With CURVE, an unauthenticated peer's connection is refused by the ZAP handler:
  it can neither send nor receive.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

import structlog
import zmq
import zmq.asyncio

from async_vapo.protocol.codec import DEFAULT_MAX_FRAME, Codec
from async_vapo.protocol.messages import Message, ProtocolError

log = structlog.get_logger(__name__)
ZAP_DOMAIN = "async_vapo"
YIELD_EVERY = 16  # frames a receiver may take in a row before letting other tasks run


@dataclass(frozen=True)
class Security:
    """CURVE keys (z85 bytes). The server side needs its secret key and the clients' public keys; a
    client needs its own key pair and the server's public key.

    ``client_ids`` maps a client's public key to the one worker id it may speak for: a receiving socket
    drops (and counts as ``key_identity_mismatch``) a message whose sender identity or ``worker_id`` is
    not its key's. Keys in ``allowed_client_keys`` are accepted without such a binding."""

    public_key: bytes
    secret_key: bytes
    server_public_key: bytes | None = None
    allowed_client_keys: tuple[bytes, ...] = ()
    client_ids: Mapping[bytes, str] = field(default_factory=dict)

    def accepted_keys(self) -> tuple[bytes, ...]:
        return (*self.allowed_client_keys, *self.client_ids)

    @staticmethod
    def generate() -> tuple[bytes, bytes]:
        return zmq.curve_keypair()

    def __repr__(self) -> str:  # never print a secret
        return f"Security(public_key={self.public_key[:8]!r}..., secret_key=<hidden>)"


def is_loopback(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// endpoints on 127.0.0.0/8, ::1 or localhost."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a hostname: not loopback


def check_bind(endpoint: str, security: Security | None, insecure: bool) -> None:
    """Refuse to bind beyond loopback without CURVE keys unless ``insecure`` is set explicitly."""
    if is_loopback(endpoint):
        return
    if security is not None:
        return
    if not insecure:
        raise PermissionError(
            f"refusing to bind {endpoint}: non-loopback addresses need CURVE keys "
            "(transport.security) or an explicit --insecure"
        )
    log.warning("binding without authentication or encryption", endpoint=endpoint)


class _Zap:
    """One ZAP authenticator per context, shared by its CURVE servers, stopped with the last of them."""

    _running: ClassVar[dict[int, tuple[Any, int]]] = {}

    @classmethod
    def acquire(cls, ctx: zmq.asyncio.Context, keys: tuple[bytes, ...]) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        auth, users = cls._running.get(id(ctx), (None, 0))
        if auth is None:
            auth = ThreadAuthenticator(ctx)
            auth.start()
        auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_KeyList(keys))
        cls._running[id(ctx)] = (auth, users + 1)

    @classmethod
    def release(cls, ctx: zmq.asyncio.Context) -> None:
        auth, users = cls._running.get(id(ctx), (None, 0))
        if auth is None:
            return
        if users <= 1:
            auth.stop()
            del cls._running[id(ctx)]
        else:
            cls._running[id(ctx)] = (auth, users - 1)


def _apply_server_security(ctx: zmq.asyncio.Context, sock: zmq.Socket, security: Security | None) -> None:
    if security is None:
        return
    _Zap.acquire(ctx, security.accepted_keys())
    sock.curve_server = True
    sock.curve_secretkey = security.secret_key
    sock.curve_publickey = security.public_key
    sock.zap_domain = ZAP_DOMAIN.encode()


class _KeyList:
    def __init__(self, keys: tuple[bytes, ...]) -> None:
        self._keys = set(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self._keys


def _apply_client_security(sock: zmq.Socket, security: Security | None) -> None:
    if security is None:
        return
    if security.server_public_key is None:
        raise ValueError("a CURVE client needs the server's public key")
    sock.curve_serverkey = security.server_public_key
    sock.curve_publickey = security.public_key
    sock.curve_secretkey = security.secret_key


class _Receiving:
    """Shared decode-count-log logic for every receiving socket."""

    def __init__(self, codec: Codec, name: str) -> None:
        self.codec = codec
        self.name = name
        self.received = 0
        self.rejected: Counter[str] = Counter()
        self._last_log = 0.0
        self._frames = 0

    async def _fair(self) -> None:
        """Yield to the event loop every ``YIELD_EVERY`` frames. Awaiting a receive that is already
        complete does not yield, so without this a socket that never runs dry (a flood of frames, valid
        or not) would starve every other task on the loop: heartbeats, acks, dispatch."""
        self._frames += 1
        if self._frames % YIELD_EVERY == 0:
            await asyncio.sleep(0)

    def _decode(self, frame: bytes | memoryview) -> Message | None:
        try:
            msg = self.codec.decode(frame)
        except ProtocolError as exc:
            self.rejected[exc.reason] += 1
            now = time.monotonic()
            if now - self._last_log > 1.0:  # one line a second at most, however hostile the peer
                self._last_log = now
                log.warning(
                    "rejected frame",
                    socket=self.name,
                    reason=exc.reason,
                    detail=str(exc)[:160],
                    rejected_total=sum(self.rejected.values()),
                )
            return None
        self.received += 1
        return msg


class _BoundServer(_Receiving):
    """A receiving socket bound on the learner side: bind policy, frame-size limit, CURVE, close."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        kind: int,
        name: str,
        endpoint: str,
        max_frame_bytes: int,
        security: Security | None,
        insecure: bool,
    ) -> None:
        super().__init__(Codec(max_frame_bytes), name)
        check_bind(endpoint, security, insecure)
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        self.sock.setsockopt(zmq.LINGER, 0)
        _apply_server_security(ctx, self.sock, security)
        self._ctx, self._secure = ctx, security is not None
        # z85 public key (ZAP's User-Id of an authenticated frame) -> the worker id that key was made for
        self._key_ids = {k.decode(): wid for k, wid in (security.client_ids if security else {}).items()}

    def _speaks_for(self, frame: zmq.Frame, worker_id: str) -> bool:
        """False (counted) when ``frame`` came over a key made for another worker than ``worker_id``."""
        if not self._key_ids:
            return True
        if self._key_ids.get(str(frame.get("User-Id"))) == worker_id:
            return True
        self.rejected["key_identity_mismatch"] += 1
        return False

    def _bind(self, endpoint: str) -> None:
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def close(self) -> None:
        self.sock.close(linger=0)
        if self._secure:
            _Zap.release(self._ctx)


class GroupReceiver(_BoundServer):
    """Learner side of the data road: a PULL socket bound at ``endpoint`` (use port 0 / ``tcp://127.0.0.1:*``
    for an ephemeral port; ``endpoint`` is then updated)."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str = "tcp://127.0.0.1:*",
        rcvhwm: int = 64,
        max_frame_bytes: int = DEFAULT_MAX_FRAME,
        security: Security | None = None,
        insecure: bool = False,
    ) -> None:
        super().__init__(ctx, zmq.PULL, "data", endpoint, max_frame_bytes, security, insecure)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._bind(endpoint)

    async def recv(self) -> Message:
        """The next valid message; invalid frames are counted and skipped."""
        while True:
            frame = await self.sock.recv(copy=False)
            await self._fair()
            msg = self._decode(frame.buffer)
            if msg is not None and self._speaks_for(frame, getattr(msg, "worker_id", "")):
                return msg


class GroupSender:
    """Rollout side of the data road: a PUSH socket connected to the learner's PULL."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        sndhwm: int = 16,
        security: Security | None = None,
    ) -> None:
        self.codec = Codec()
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.setsockopt(zmq.LINGER, 2000)
        _apply_client_security(self.sock, security)
        self.sock.connect(endpoint)
        self.sent = 0

    async def send(self, msg: Message) -> None:
        """Waits (never drops) while the peer's queue is full: this is the back-pressure."""
        await self.sock.send(self.codec.encode(msg), copy=False)
        self.sent += 1

    def close(self, linger_ms: int = 2000) -> None:
        self.sock.close(linger=linger_ms)


class ControlServer(_BoundServer):
    """Learner side of the control road: a ROUTER socket; peers are addressed by their worker id."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str = "tcp://127.0.0.1:*",
        max_frame_bytes: int = 16 * 1024 * 1024,
        security: Security | None = None,
        insecure: bool = False,
    ) -> None:
        super().__init__(ctx, zmq.ROUTER, "control", endpoint, max_frame_bytes, security, insecure)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._bind(endpoint)

    async def recv(self) -> tuple[str, Message]:
        while True:
            parts = await self.sock.recv_multipart(copy=False)
            await self._fair()
            if len(parts) != 2:
                self.rejected["bad_envelope"] += 1
                continue
            msg = self._decode(parts[1].buffer)
            identity = bytes(parts[0].buffer).decode("utf-8", "replace")
            if msg is not None and self._speaks_for(parts[1], identity):
                return identity, msg

    async def send(self, worker_id: str, msg: Message) -> bool:
        """False (and no exception) when the worker is not connected."""
        try:
            await self.sock.send_multipart([worker_id.encode(), self.codec.encode(msg)])
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            raise
        return True


class ControlClient(_Receiving):
    """Rollout side of the control road: a DEALER socket whose identity is the worker id."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        worker_id: str,
        security: Security | None = None,
    ) -> None:
        super().__init__(Codec(), "control")
        self.worker_id = worker_id
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, worker_id.encode())
        self.sock.setsockopt(zmq.LINGER, 1000)
        _apply_client_security(self.sock, security)
        self.sock.connect(endpoint)

    async def recv(self) -> Message:
        while True:
            frame = await self.sock.recv(copy=False)
            await self._fair()
            msg = self._decode(frame.buffer)
            if msg is not None:
                return msg

    async def recv_timeout(self, seconds: float) -> Message | None:
        try:
            return await asyncio.wait_for(self.recv(), seconds)
        except asyncio.TimeoutError:
            return None

    async def send(self, msg: Message) -> None:
        await self.sock.send(self.codec.encode(msg))

    def close(self) -> None:
        self.sock.close(linger=500)
