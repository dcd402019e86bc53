"""The run's rendezvous store: node 0's launcher serves it; every launcher and learner rank 0 talk through
it.

Keys:
- ``endpoints``: where learner rank 0 listens (data and control roads, the learner world's master port,
  the weight-sync host), published by node 0 before anything starts; other nodes wait for it.
- ``drop/<worker id>``: the pid of a rollout worker the controller gave up on (missed heartbeats, a
  weight sync that never completed). The launcher that owns it kills its process group and restarts it:
  a worker that is stopped or wedged cannot be trusted to exit on request.
- ``done``: the learner finished; launchers stop restarting workers and exit once theirs are gone.

Where it lives: a single-machine run uses a ``torch.distributed.FileStore`` in the run directory (no
network listener at all: a ``TCPStore`` listens on every interface whatever host it is given). A
multi-node run needs a ``TCPStore`` on node 0, which anyone who can reach node 0 can write to; there every
value is signed (HMAC-SHA256 with ``store.key`` from the run's key directory, next to the CURVE keys) and a
value whose signature does not verify is ignored, counted (``forged``) and logged: a forged ``drop/`` or
``done`` changes nothing. The key outlives a launch (it sits in the key directory), so every value but
``endpoints`` is also bound to the launch: node 0 puts a fresh random ``launch`` nonce and the time into the
endpoints it signs, every later MAC covers that nonce, and endpoints issued more than ``STALE_S`` before a
reader started are refused. A ``done`` or ``drop/`` replayed from an earlier launch of the same run does
not verify.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import msgspec
import structlog
import torch.distributed as dist

log = structlog.get_logger(__name__)

STALE_S = 900.0  # endpoints issued this long before a reader started are an earlier launch's


class _Signed(msgspec.Struct, forbid_unknown_fields=True):
    """A store value as written: the value and its HMAC (typed: anything else is forged)."""

    v: str
    mac: str


_SIGNED = msgspec.json.Decoder(_Signed)


@dataclass(frozen=True)
class Endpoints:
    data: str  # tcp://host:port of the learner's PULL socket
    control: str  # tcp://host:port of the learner's ROUTER socket
    learner_master_port: int  # torch.distributed rendezvous of the learner world (on node 0)
    weight_host: str  # address at which rollout workers reach learner rank 0's weight-sync stores
    launch: str = ""  # this launch's nonce: every other value's MAC covers it
    issued_at: float = 0.0  # unix time node 0 published them


class RunStore:
    """``address`` is ``host:port`` (a TCPStore) or ``file:<path>`` (a FileStore, one machine)."""

    def __init__(
        self, address: str, is_master: bool, key: bytes | None = None, timeout_s: float = 600.0
    ) -> None:
        self.key = key
        self.nonce = ""  # this launch's (from the endpoints); MACs of every other value cover it
        self.started = time.time()
        self.forged: Counter[str] = Counter()
        if address.startswith("file:"):
            self.path = address.removeprefix("file:")
            self.store: dist.Store = dist.FileStore(self.path, -1)
            self.store.set_timeout(timedelta(seconds=timeout_s))
            self.address = address
            return
        host, port = address.rsplit(":", 1)
        tcp = dist.TCPStore(
            host, int(port), None, is_master, timedelta(seconds=timeout_s), wait_for_workers=False
        )
        self.store = tcp
        self.address = f"{host}:{tcp.port}"

    @classmethod
    def connect(cls, address: str, key: bytes | None = None, timeout_s: float = 60.0) -> RunStore:
        """A reader; ``endpoints()`` (which the ``drop/`` and ``done`` calls need first) binds it to the
        launch."""
        return cls(address, is_master=False, key=key, timeout_s=timeout_s)

    # ---- signed values -----------------------------------------------------------------------------
    def _mac(self, name: str, value: str) -> str:
        if self.key is None:
            return ""
        bound = "" if name == "endpoints" else self.nonce
        return hmac.new(self.key, f"{bound}\n{name}\n{value}".encode(), hashlib.sha256).hexdigest()

    def _set(self, name: str, value: str) -> None:
        self.store.set(name, json.dumps({"v": value, "mac": self._mac(name, value)}))

    def _get(self, name: str, wait: bool = False) -> str | None:
        if not wait and not self.store.check([name]):
            return None
        raw = self.store.get(name)
        try:  # typed, bounded parsing: a hostile value (deep nesting, wrong types) is forged, never an error
            doc = _SIGNED.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._forged(name, "not a signed value")
            return None
        value, mac = doc.v, doc.mac
        if self.key is not None and not hmac.compare_digest(self._mac(name, value), mac):
            self._forged(name, "bad signature")
            return None
        return value

    def _forged(self, name: str, why: str) -> None:
        kind = name.split("/", 1)[0]
        self.forged[kind] += 1
        if self.forged[kind] in (1, 10, 100, 1000):
            log.warning("ignored a forged value in the run store", key=name, why=why, count=self.forged[kind])
        return None

    # ---- keys ----------------------------------------------------------------------------------------
    def publish_endpoints(self, e: Endpoints) -> None:
        """Node 0, once per launch: stamps ``e`` with a fresh nonce and the time, then signs it."""
        e = Endpoints(**(asdict(e) | {"launch": secrets.token_hex(16), "issued_at": time.time()}))
        self.nonce = e.launch
        self._set("endpoints", json.dumps(asdict(e)))

    def endpoints(self) -> Endpoints:
        """Blocks until node 0 has published them (up to the store timeout) and adopts their launch nonce;
        raises on a forged, malformed or (with a key) stale value."""
        value = self._get("endpoints", wait=True)
        if value is None:
            raise RuntimeError("the run store's endpoints are not signed with this run's key")
        try:
            e = msgspec.json.decode(value, type=Endpoints)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RuntimeError(f"the run store's endpoints are malformed: {exc}") from None
        if self.key is not None and e.issued_at < self.started - STALE_S:
            raise RuntimeError(
                f"the run store's endpoints were issued {self.started - e.issued_at:.0f} s before this "
                "process started: an earlier launch's, replayed"
            )
        self.nonce = e.launch
        return e

    def notify_drop(self, worker_id: str, pid: int) -> None:
        self._set(f"drop/{worker_id}", str(pid))

    def dropped_pid(self, worker_id: str) -> int | None:
        value = self._get(f"drop/{worker_id}")
        return int(value) if value is not None and value.isdigit() else None

    def mark_done(self) -> None:
        self._set("done", "1")

    def done(self) -> bool:
        return self._get("done") == "1"


def ensure_store_key(key_dir: str | Path) -> bytes:
    """Node 0: the run store's signing key in ``key_dir/store.key`` (mode 0600), created if missing."""
    d = Path(key_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    f = d / "store.key"
    if not f.exists():
        tmp = d / f".store.key.{os.getpid()}"
        tmp.write_bytes(secrets.token_bytes(32))
        os.chmod(tmp, 0o600)
        tmp.replace(f)
    return f.read_bytes()


def load_store_key(key_dir: str | Path, timeout_s: float = 120.0) -> bytes:
    """Other nodes (and learner rank 0): wait for node 0's key on shared storage."""
    f = Path(key_dir) / "store.key"
    deadline = time.monotonic() + timeout_s
    while not f.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no run-store key appeared at {f} within {timeout_s:.0f} s")
        time.sleep(0.5)
    return f.read_bytes()
