"""CURVE key files for sockets that leave loopback: one key pair for the learner, one per rollout worker.

A key directory holds ``server.key`` / ``server.key_secret`` (learner rank 0) and, for every worker the
launcher plans, ``clients/<worker_id>.key`` / ``clients/<worker_id>.key_secret``, in pyzmq's certificate
format. Node 0 creates them; put the directory on storage every node reads (or copy each node the server's
public key and its own workers' pairs). Secret files are created mode 0600 and their contents never reach
a log.

A worker's key is its identity: the learner's sockets accept only the planned workers' public keys, and a
message is taken only when the worker id it speaks for is the one its key was made for (see
``Security.client_ids`` and ``protocol.transport``). A leaked worker secret lets its holder speak as that one
worker, not as any other; removing its ``clients/`` files revokes it at the next launch.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

import zmq.auth

from async_vapo.protocol.transport import Security

CLIENTS = "clients"
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a worker id is a file name here


def _client_stem(key_dir: Path, worker_id: str) -> Path:
    if not _SAFE_ID.fullmatch(worker_id):
        raise ValueError(f"worker id {worker_id!r} cannot name a key file")
    return key_dir / CLIENTS / worker_id


def _secret_file(stem: Path) -> Path:
    return stem.parent / f"{stem.name}.key_secret"  # not with_suffix: a worker id may hold a dot


def _create(directory: Path, name: str) -> None:
    if not _secret_file(directory / name).exists():
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)


def ensure_keys(key_dir: str | Path, worker_ids: Iterable[str]) -> Path:
    """Create the server's key pair and one per worker in ``key_dir`` unless they exist."""
    d = Path(key_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    _create(d, "server")
    for wid in worker_ids:
        stem = _client_stem(d, wid)
        _create(stem.parent, stem.name)
    return d


def wait_for_keys(key_dir: str | Path, worker_ids: Iterable[str], timeout_s: float = 120.0) -> Path:
    """On nodes other than node 0: wait for node 0 to create the server's key and these workers' pairs."""
    d = Path(key_dir)
    needed = [d / "server.key"] + [_secret_file(_client_stem(d, w)) for w in worker_ids]
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in needed):
        if time.monotonic() > deadline:
            missing = [str(p) for p in needed if not p.exists()][:3]
            raise TimeoutError(f"no CURVE keys appeared in {d} within {timeout_s:.0f} s (missing {missing})")
        time.sleep(0.5)
    return d


def server_security(key_dir: str | Path) -> Security:
    """The learner's keys and every worker's public key, each bound to the worker id it was made for."""
    d = Path(key_dir)
    public, secret = zmq.auth.load_certificate(d / "server.key_secret")
    assert secret is not None
    clients = {}
    for path in sorted((d / CLIENTS).glob("*.key")):
        client_public, _ = zmq.auth.load_certificate(path)
        clients[client_public] = path.name.removesuffix(".key")
    return Security(public, secret, client_ids=clients)


def client_security(key_dir: str | Path, worker_id: str) -> Security:
    """Worker ``worker_id``'s own key pair and the learner's public key."""
    d = Path(key_dir)
    secret_file = _secret_file(_client_stem(d, worker_id))
    if not secret_file.exists():
        raise FileNotFoundError(f"no CURVE key for worker {worker_id!r} in {d / CLIENTS}")
    public, secret = zmq.auth.load_certificate(secret_file)
    server_public, _ = zmq.auth.load_certificate(d / "server.key")
    assert secret is not None
    return Security(public, secret, server_public_key=server_public)
