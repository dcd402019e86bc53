"""CURVE key files for sockets that leave loopback.

A key directory holds ``server.key`` / ``server.key_secret`` (learner rank 0) and ``client.key`` /
``client.key_secret`` (every rollout worker), in pyzmq's certificate format. Put it on storage every node
reads (or copy it there); secret files are created mode 0600 and their contents never reach a log.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import zmq.auth

from async_vapo.protocol.transport import Security


def ensure_keys(key_dir: str | Path) -> Path:
    """Create the server and client key pairs in ``key_dir`` unless they exist."""
    d = Path(key_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in ("server", "client"):
        if not (d / f"{name}.key_secret").exists():
            _, secret = zmq.auth.create_certificates(d, name)
            os.chmod(secret, 0o600)
    return d


def wait_for_keys(key_dir: str | Path, timeout_s: float = 120.0) -> Path:
    """On nodes other than node 0: wait for node 0 to create the keys on shared storage."""
    d = Path(key_dir)
    deadline = time.monotonic() + timeout_s
    while not all((d / f"{n}.key_secret").exists() for n in ("server", "client")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no CURVE keys appeared in {d} within {timeout_s:.0f} s")
        time.sleep(0.5)
    return d


def server_security(key_dir: str | Path) -> Security:
    d = Path(key_dir)
    public, secret = zmq.auth.load_certificate(d / "server.key_secret")
    client_public, _ = zmq.auth.load_certificate(d / "client.key")
    assert secret is not None
    return Security(public, secret, allowed_client_keys=(client_public,))


def client_security(key_dir: str | Path) -> Security:
    d = Path(key_dir)
    public, secret = zmq.auth.load_certificate(d / "client.key_secret")
    server_public, _ = zmq.auth.load_certificate(d / "server.key")
    assert secret is not None
    return Security(public, secret, server_public_key=server_public)
