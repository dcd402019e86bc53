"""Chaos: the embedded default trained while faults are injected at random times, then the books audited.

Faults (one every ``--every`` seconds on average, each kind in turn, at random moments):
- ``worker_kill``: SIGKILL of a rollout worker (the launcher restarts it, its prompts are requeued);
- ``engine_kill``: SIGKILL of a vLLM engine-core process under a live worker (the worker reports the
  prompts it loses and exits; the launcher restarts it);
- ``hostile_groups``: a rogue peer on the data road sends well-formed groups for predictable prompt uids
  in a real worker's name, without the prompt's ticket, with token ids beyond the vocabulary, a reward
  of 1e30, too many responses (none may be admitted);
- ``spoofed_control``: a rogue peer on the control road says Hello in a real worker's name and with a
  64-way tensor-parallel engine, and acks weights for a real worker (all refused);
- ``heavy_frame``: a 40 MB frame of two million empty responses (refused before it is decoded).
The run must finish on its own within ``2 x --minutes + 5`` minutes. Then the audit, from the final
checkpoint's prompt ledger and the last metrics row: every prompt the data cursor passed is trained,
filtered, failed or pending, exactly once (``prompts_lost``, ``prompts_trained_twice``), hostile groups
admitted (``hostile_groups_accepted``: those sent minus those refused or dropped as duplicates), and the
growth of learner rank 0's resident memory from the first to the last step (``rss_growth_mb``). Its last
line is one JSON object.

    .venv/bin/python bench/chaos.py [--minutes 6] [--every 20] [--seed 0] [--out runs/bench_chaos]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import zmq

from soak import rss_mb

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("worker_kill", "hostile_groups", "engine_kill", "spoofed_control", "heavy_frame")


def _state(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "run" / "node0.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids.append(int(d.name))
    return kids


def _cmdline(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")).decode(errors="replace")
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _rows(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return [r for r in rows if r.get("phase") == "train"]


class Injector:
    """Injects the faults into the run under ``out``; counts what it did."""

    def __init__(self, out: Path, rng: random.Random) -> None:
        from async_vapo.protocol import Codec

        self.out, self.rng, self.codec = out, rng, Codec()
        self.ctx = zmq.Context()
        self.injected: Counter[str] = Counter()
        self.hostile_sent: list[tuple[float, int]] = []  # (wall time, groups) per injection

    def __call__(self, kind: str) -> bool:
        state = _state(self.out)
        if not state.get("workers"):
            return False
        return bool(getattr(self, kind)(state))

    def worker_kill(self, state: dict[str, Any]) -> bool:
        pid = self.rng.choice(list(state["workers"].values()))
        os.kill(pid, signal.SIGKILL)
        return True

    def engine_kill(self, state: dict[str, Any]) -> bool:
        for wpid in state["workers"].values():
            for kid in _children(wpid):
                if "EngineCore" in _comm(kid) or "EngineCore" in _cmdline(kid):
                    os.kill(kid, signal.SIGKILL)
                    return True
        return False

    def _push(self, state: dict[str, Any], frames: list[bytes]) -> None:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.connect(state["endpoints"]["data"])
        for f in frames:
            sock.send(f)
        sock.close()

    def hostile_groups(self, state: dict[str, Any]) -> bool:
        from async_vapo.protocol import Prompt, Response, TrajectoryGroup, pack_f32, pack_i32

        worker = next(iter(state["workers"]))
        frames = []
        for _ in range(20):
            k = self.rng.randrange(2000)
            prompt = Prompt(f"train-{k}@0", pack_i32([1, 2, 3]), "0", "addition")
            good = Response(
                pack_i32([5] * 4), pack_f32([-0.5] * 4), pack_i32([0] * 4), "stop", 1.0, True, "ok"
            )
            variants = [
                [good] * 8,  # no ticket
                [msgspec.structs.replace(good, token_ids=pack_i32([100_000] * 4))] * 8,
                [msgspec.structs.replace(good, reward=1e30)] * 8,
                [good] * 64,
            ]
            responses = self.rng.choice(variants)
            group = TrajectoryGroup(prompt, responses, worker, time.time())
            frames.append(bytes(self.codec.encode(group)))
        self._push(state, frames)
        self.hostile_sent.append((time.time(), len(frames)))
        return True

    def spoofed_control(self, state: dict[str, Any]) -> bool:
        from async_vapo.protocol import Hello, WeightAck

        worker = next(iter(state["workers"]))
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"rogue-{self.rng.randrange(10**6)}".encode())
        sock.setsockopt(zmq.LINGER, 5000)
        sock.connect(state["endpoints"]["control"])
        ident = sock.getsockopt(zmq.IDENTITY).decode()
        for msg in (
            Hello(worker, 0, 1),
            Hello(ident, 0, 1, tensor_parallel_size=64),
            WeightAck(worker, 10**6, 0.0),
        ):
            sock.send(bytes(self.codec.encode(msg)))
        sock.close()
        return True

    def heavy_frame(self, state: dict[str, Any]) -> bool:
        from async_vapo.protocol import Prompt, Response, TrajectoryGroup, pack_i32

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--every", type=float, default=20.0, help="mean seconds between faults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_chaos")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    steps = max(10, int(args.minutes * 10))
    cmd = [
        sys.executable,
        "-m",
        "async_vapo.launch",
        "--output-dir",
        str(out),
        f"train.total_steps={steps}",
        "algo.value_pretrain_steps=3",
        "train.eval_every=0",
        "train.checkpoint_every=10",
        "train.worker_timeout_s=10",
        "train.weight_sync_timeout_s=20",
        "train.prompt_timeout_s=60",
        # the budget covers the injected rate (every fault may cost one worker a restart): a week-long
        # run's default (5 an hour per worker) would end this one on purpose, as in the first chaos run
        f"train.worker_restarts={max(5, int(args.minutes * 60 / args.every))}",
        *args.overrides,
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", VLLM_CPU_KVCACHE_SPACE="1", ASYNC_VAPO_LOG_JSON="1")
    log = (out / "launcher.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    bound = (2 * args.minutes + 5) * 60
    rng = random.Random(args.seed)
    inj = Injector(out, rng)
    rss: list[float] = []
    stop = threading.Event()

    def inject() -> None:
        i = 0
        while not stop.wait(rng.expovariate(1 / args.every)):
            if not _rows(out):
                continue  # faults start once training does
            kind = KINDS[i % len(KINDS)]
            try:
                if inj(kind):
                    inj.injected[kind] += 1
                    i += 1
                    print(f"[chaos] {time.monotonic() - t0:6.0f}s injected {kind}", flush=True)
            except Exception as exc:  # a fault that could not be injected is reported, not fatal
                print(f"[chaos] could not inject {kind}: {exc!r}", flush=True)

    th = threading.Thread(target=inject, daemon=True)
    th.start()
    while proc.poll() is None and time.monotonic() - t0 < bound:
        time.sleep(2)
        rows = _rows(out)
        learner = _state(out).get("learners", {}).get("0")
        if rows and learner:
            if not math.isnan(mb := rss_mb(int(learner))):  # (nan: the process is gone)
                rss.append(mb)
            print(
                f"[chaos] step {rows[-1]['step'] + 1}/{steps}, faults {sum(inj.injected.values())}", end="\r"
            )
    stop.set()
    # on its own and to the end: a run stopped early (e.g. a worker over its restart budget) exits 0 too
    finished = proc.poll() == 0 and len(_rows(out)) == steps
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    rows = _rows(out)
    counters = rows[-1].get("controller_counters", {}) if rows else {}
    refused = sum(v for k, v in counters.items() if k.startswith("group_rejected_")) + counters.get(
        "group_duplicate", 0
    )
    # only groups sent before the last metrics row can be in its counters
    last_row = rows[-1].get("time", 0.0) if rows else 0.0
    counted_sent = sum(n for t, n in inj.hostile_sent if t < last_row - 1.0)
    figures: dict[str, Any] = {
        "finished": finished,
        "wall_s": round(time.monotonic() - t0),
        "steps": len(rows),
        "faults_injected": sum(inj.injected.values()),
        "faults_by_kind": dict(inj.injected),
        "faults_survived": sum(inj.injected.values()) if finished else 0,
        "hostile_groups_sent": sum(n for _, n in inj.hostile_sent),
        "hostile_groups_sent_before_last_row": counted_sent,
        "hostile_groups_accepted": max(0, counted_sent - refused),
        "groups_refused": refused,
        "rejected_frames": rows[-1].get("rejected_frames_by_reason", {}) if rows else {},
        "hello_rejected": {k: v for k, v in counters.items() if k.startswith("hello_rejected_")},
        "rss_growth_mb": round(rss[-1] - rss[min(len(rss) - 1, 5)], 1) if len(rss) > 6 else None,
    }
    if finished or (out / "checkpoints" / "latest").exists():
        figures |= audit(out)
    print()
    for k, v in figures.items():
        print(f"{k}: {v}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
