"""The run's rendezvous store: node 0's launcher serves a ``torch.distributed.TCPStore``; every launcher
and learner rank 0 talk through it.

Keys:
- ``endpoints``: where learner rank 0 listens (data and control roads, the learner world's master port,
  the weight-sync host), published by node 0 before anything starts; other nodes wait for it.
- ``drop/<worker id>``: the pid of a rollout worker the controller gave up on (missed heartbeats, a
  weight sync that never completed). The launcher that owns it kills its process group and restarts it:
  a worker that is stopped or wedged cannot be trusted to exit on request.
- ``done``: the learner finished; launchers stop restarting workers and exit once theirs are gone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass(frozen=True)
class Endpoints:
    data: str  # tcp://host:port of the learner's PULL socket
    control: str  # tcp://host:port of the learner's ROUTER socket
    learner_master_port: int  # torch.distributed rendezvous of the learner world (on node 0)
    weight_host: str  # address at which rollout workers reach learner rank 0's weight-sync stores


class RunStore:
    def __init__(self, host: str, port: int, is_master: bool, timeout_s: float = 600.0) -> None:
        self.host = host
        self.store = dist.TCPStore(
            host,
            port,
            None,
            is_master,
            timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
        self.port = self.store.port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def connect(cls, address: str, timeout_s: float = 60.0) -> RunStore:
        host, port = address.rsplit(":", 1)
        return cls(host, int(port), is_master=False, timeout_s=timeout_s)

    def publish_endpoints(self, e: Endpoints) -> None:
        self.store.set("endpoints", json.dumps(asdict(e)))

    def endpoints(self) -> Endpoints:
        """Blocks until node 0 has published them (up to the store timeout)."""
        return Endpoints(**json.loads(self.store.get("endpoints")))

    def notify_drop(self, worker_id: str, pid: int) -> None:
        self.store.set(f"drop/{worker_id}", str(pid))

    def dropped_pid(self, worker_id: str) -> int | None:
        key = f"drop/{worker_id}"
        if not self.store.check([key]):
            return None
        return int(self.store.get(key))

    def mark_done(self) -> None:
        self.store.set("done", "1")

    def done(self) -> bool:
        return bool(self.store.check(["done"]))
