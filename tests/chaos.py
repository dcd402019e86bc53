"""Faults injected into a live run from outside, shared by ``tests/test_faults.py`` (one of each, in
order) and ``bench/chaos.py`` (at random times for minutes). Each method takes the launcher's state file
(``<output_dir>/run/node0.json``: pids and endpoints) and returns whether it could inject.

- ``worker_kill``: SIGKILL of a rollout worker (the launcher restarts it, its prompts are requeued);
- ``engine_kill``: SIGKILL of a vLLM engine-core process under a live worker (the worker reports the
  prompts it loses and exits; the launcher restarts it);
- ``learner_kill``: SIGKILL of learner rank 0 (the launcher restarts the learner world from its latest
  checkpoint; the workers rejoin with their engines);
- ``hostile_groups``: a rogue peer on the data road sends well-formed groups for predictable prompt uids
  in a real worker's name: without the prompt's ticket, with token ids beyond the vocabulary, a reward of
  1e30, too many responses (none may be admitted);
- ``spoofed_control``: a rogue peer on the control road says Hello in a real worker's name and with a
  64-way tensor-parallel engine, and acks weights for a real worker (all refused);
- ``heavy_frame``: a 40 MB frame of two million empty responses (refused before it is decoded).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import zmq

from async_vapo.protocol import Codec, Hello, Prompt, Response, TrajectoryGroup, WeightAck, pack_f32, pack_i32
from tests.helpers import process_tree

HOSTILE_GROUPS = 20  # per hostile_groups injection


def node_state(out: Path) -> dict[str, Any]:
    """The launcher's state file of node 0, or {} while it is being written."""
    try:
        return json.loads((out / "run" / "node0.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _title(pid: int) -> str:
    """A process's title: vLLM renames its engine core "VLLM::EngineCore" in its command line (``comm``
    keeps only 15 characters of it)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


class Injector:
    """Injects the faults into the run under ``out``; counts what it did."""

    def __init__(self, out: Path, rng: random.Random) -> None:
        self.out, self.rng, self.codec = out, rng, Codec()
        self.ctx = zmq.Context()
        self.injected: Counter[str] = Counter()
        self.hostile_sent: list[tuple[float, int]] = []  # (wall time, groups) per injection
        self.times: list[tuple[float, str]] = []  # (wall time, kind) of every fault injected

    def __call__(self, kind: str) -> bool:
        state = node_state(self.out)
        if not state.get("workers") or not getattr(self, kind)(state):
            return False
        self.injected[kind] += 1
        self.times.append((time.time(), kind))
        return True

    def close(self) -> None:
        self.ctx.term()

    def worker_kill(self, state: dict[str, Any]) -> bool:
        os.kill(self.rng.choice(list(state["workers"].values())), signal.SIGKILL)
        return True

    def engine_kill(self, state: dict[str, Any]) -> bool:
        for wpid in state["workers"].values():
            for kid in process_tree(wpid) - {wpid}:
                if "EngineCore" in _title(kid):
                    os.kill(kid, signal.SIGKILL)
                    return True
        return False

    def learner_kill(self, state: dict[str, Any]) -> bool:
        pid = state.get("learners", {}).get("0")
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        return True

    def _push(self, state: dict[str, Any], frames: list[bytes]) -> None:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.connect(state["endpoints"]["data"])
        for f in frames:
            sock.send(f)
        sock.close()

    def hostile_groups(self, state: dict[str, Any]) -> bool:
        worker = next(iter(state["workers"]))
        good = Response(pack_i32([5] * 4), pack_f32([-0.5] * 4), pack_i32([0] * 4), "stop", 1.0, True, "ok")
        variants = [
            [good] * 8,  # no ticket
            [msgspec.structs.replace(good, token_ids=pack_i32([100_000] * 4))] * 8,
            [msgspec.structs.replace(good, reward=1e30)] * 8,
            [good] * 64,
        ]
        frames = []
        for _ in range(HOSTILE_GROUPS):
            prompt = Prompt(f"train-{self.rng.randrange(2000)}@0", pack_i32([1, 2, 3]), "0", "addition")
            group = TrajectoryGroup(prompt, self.rng.choice(variants), worker, time.time())
            frames.append(bytes(self.codec.encode(group)))
        self._push(state, frames)
        self.hostile_sent.append((time.time(), len(frames)))
        return True

    def spoofed_control(self, state: dict[str, Any]) -> bool:
        worker = next(iter(state["workers"]))
        sock = self.ctx.socket(zmq.DEALER)
        ident = f"rogue-{self.rng.randrange(10**6)}"
        sock.setsockopt(zmq.IDENTITY, ident.encode())
        sock.setsockopt(zmq.LINGER, 5000)
        sock.connect(state["endpoints"]["control"])
        for msg in (
            Hello(worker, 0, 1),
            Hello(ident, 0, 1, tensor_parallel_size=64),
            WeightAck(worker, 10**6, 0.0),
        ):
            sock.send(bytes(self.codec.encode(msg)))
        sock.close()
        return True

    def heavy_frame(self, state: dict[str, Any]) -> bool:
        empty = Response(b"", b"", b"", "stop", 0.0, False, "")
        group = TrajectoryGroup(Prompt("train-0@0", pack_i32([1]), "0"), [empty] * 2_000_000, "x", 0.0)
        self._push(state, [bytes(self.codec.encode(group))])
        return True


def audit(out: Path) -> dict[str, int]:
    """The prompt ledger of the final checkpoint: every row the data cursor passed (first epoch) is
    trained, filtered, failed or pending, exactly once."""
    ck = out / "checkpoints"
    latest = ck / (ck / "latest").read_text().strip()
    ledger = msgspec.msgpack.decode((latest / "learner_state.msgpack").read_bytes())["ledger"]
    trained = ledger["trained_uids"]
    pending = [p[0] for p in ledger["pending"]]
    spent = [*trained, *ledger["filtered_uids"], *ledger.get("failed_uids", []), *pending]
    seen = Counter(spent)
    return {
        "cursor": int(ledger["cursor"]),
        "trained": len(trained),
        "failed": len(ledger.get("failed_uids", [])),
        "pending": len(pending),
        "prompts_trained_twice": len(trained) - len(set(trained)),
        "prompts_accounted_twice": sum(1 for n in seen.values() if n > 1),
        "prompts_lost": int(ledger["cursor"]) - len(seen),
    }
