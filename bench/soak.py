"""Soak: the learner-side data path at full speed for ``--minutes`` (default 10).

The real learner side (``Controller``: ZeroMQ sockets, staleness-aware admission, buffer, ledger, weight
sync over gloo) is fed by ``--workers`` load-generating rollout processes that speak the real protocol
(Hello, JoinGroup, WeightUpdate + broadcast + WeightAck, heartbeats) and answer every assigned prompt at
once with a synthetic group (no vLLM: the point is to send as fast as the path allows), plus one flood
process pushing valid frames for prompts nobody issued, ungated by credits. A consumer thread trains on
nothing: it takes batches, bumps the version and publishes a new ~4 MB snapshot every step, so workers
are updated continuously. Every ``--sample-s`` it records each process's RSS, the buffer's queue depth
against its bound ((max_staleness + 1) x groups_per_step), the ledger and the rejection counters.

Prints progress, writes ``soak.png`` (RSS and queue depth over time) and one JSON object on its last line.

    .venv/bin/python bench/soak.py [--minutes 10] [--workers 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

import torch
import zmq

from async_vapo.buffer import PromptLedger
from async_vapo.config import Config, RolloutConfig, TrainConfig
from async_vapo.controller import Controller, Wiring
from async_vapo.controller.admission import GroupRules
from async_vapo.protocol import (
    Assign,
    Codec,
    Control,
    Hello,
    JoinGroup,
    Prompt,
    Response,
    TrajectoryGroup,
    WeightAck,
    WeightUpdate,
    WorkerStats,
    pack_f32,
    pack_i32,
)
from async_vapo.weight_sync.buckets import FlatPool
from async_vapo.weight_sync.group import GroupSpec, broadcast, join_group


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return float("nan")


def synthetic_group(prompt: Prompt, worker: str, version: int, n: int, tokens: int) -> TrajectoryGroup:
    responses = [
        Response(
            pack_i32([(i * 7 + k) % 1000 for k in range(tokens)]),
            pack_f32([-0.5] * tokens),
            pack_i32([version] * tokens),
            "stop",
            float(i % 2),
            bool(i % 2),
            "ok",
        )
        for i in range(n)
    ]
    return TrajectoryGroup(prompt, responses, worker, time.time())


def worker(worker_id: str, data: str, control: str, n: int, tokens: int) -> None:
    import uvloop

    async def main() -> None:
        import zmq.asyncio

        from async_vapo.protocol.transport import ControlClient, GroupSender

        ctx = zmq.asyncio.Context()
        ctl = ControlClient(ctx, control, worker_id)
        out = GroupSender(ctx, data)
        state = {"version": 0, "pg": None}
        pool = FlatPool()
        await ctl.send(Hello(worker_id, 0, os.getpid()))

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(1.0)
                await ctl.send(WorkerStats(worker_id, 1.0, 1.0, 0, 0, state["version"]))

        hb = asyncio.create_task(heartbeat())
        while True:
            msg = await ctl.recv()
            if isinstance(msg, Assign):
                for p in msg.prompts:
                    await out.send(synthetic_group(p, worker_id, state["version"], n, tokens))
            elif isinstance(msg, JoinGroup):
                spec = GroupSpec(msg.host, msg.port, msg.world_size, msg.backend, msg.timeout_s)
                state["pg"] = await asyncio.to_thread(join_group, spec, 1)
            elif isinstance(msg, WeightUpdate):

                def receive(buckets=msg.buckets) -> None:
                    for i, b in enumerate(buckets):
                        broadcast(state["pg"], pool.get(i, b), root=0)

                await asyncio.to_thread(receive)
                state["version"] = msg.version
                await ctl.send(WeightAck(worker_id, msg.version, 0.0))
            elif isinstance(msg, Control) and msg.kind == "shutdown":
                break
        hb.cancel()
        out.close()
        ctl.close()
        ctx.term()

    torch.set_num_threads(1)
    uvloop.run(main())


def flood(data: str, n: int, tokens: int, stop_at: float) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 64)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(data)
    codec = Codec()
    k = 0
    while time.time() < stop_at:
        g = synthetic_group(Prompt(f"flood-{k}", pack_i32([1, 2]), "3"), "flood", 0, n, tokens)
        s.send(codec.encode(g))
        k += 1
    s.close()
    ctx.term()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--groups-per-step", type=int, default=32)
    ap.add_argument("--max-staleness", type=int, default=1)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--out", default="runs/bench_soak")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    def free() -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    data, control = f"tcp://127.0.0.1:{free()}", f"tcp://127.0.0.1:{free()}"
    prompts = [Prompt(f"p{i}", pack_i32([1, 2, 3, i % 100]), "5") for i in range(10_000)]
    ledger = PromptLedger(prompts, seed=0)
    ctl = Controller(
        TrainConfig(
            groups_per_step=args.groups_per_step, max_staleness=args.max_staleness, worker_timeout_s=30.0
        ),
        Wiring(data, control),
        ledger,
        rules=GroupRules.of(
            Config(rollout=RolloutConfig(n_samples=args.samples, max_tokens=args.tokens, max_model_len=4096)),
            vocab_size=1000,
        ),
    )
    ctl.start()
    bound = (args.max_staleness + 1) * args.groups_per_step
    stop_at = time.time() + args.minutes * 60
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=worker, args=(f"soak-{i}", data, control, args.samples, args.tokens), daemon=True)
        for i in range(args.workers)
    ] + [ctx.Process(target=flood, args=(data, args.samples, args.tokens, stop_at), daemon=True)]
    for p in procs:
        p.start()
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])  # ~4 MB of weights
    steps = [0]
    stop = threading.Event()

    def consume() -> None:
        from async_vapo.weight_sync.broadcast import snapshot

        v = 0
        while not stop.is_set():
            batch = ctl.take_batch(args.groups_per_step, timeout_s=1.0)
            if batch is None:
                continue
            ctl.mark_trained(batch)
            v += 1
            ctl.set_version(v)
            ctl.publish(snapshot(v, model.named_parameters(), 2**20))
            steps[0] = v

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    samples = []
    t0 = time.time()
    while time.time() < stop_at:
        time.sleep(args.sample_s)
        m = ctl.metrics()
        row = {
            "t": round(time.time() - t0, 1),
            "steps": steps[0],
            "rss_mb": {"learner_side": rss_mb(os.getpid())}
            | {f"worker{i}": rss_mb(p.pid) for i, p in enumerate(procs[:-1]) if p.pid}
            | {"flood": rss_mb(procs[-1].pid) if procs[-1].pid else float("nan")},
            "queue_depth": m.queue_depth,
            "outstanding": len(ledger.outstanding),
            "admitted": m.admitted,
            "duplicate_or_unknown": m.duplicate,
            "rejected_frames": sum(m.rejected_frames.values()),
            "weight_syncs": m.syncs.count,
            "dropped": {k: v for k, v in m.counters.items() if k.startswith("worker_dropped")},
            "worker_versions": m.worker_versions,
            "capacity": m.capacity,
        }
        samples.append(row)
        print(
            f"[soak {row['t']:>6.0f}s] steps {row['steps']} | queue {row['queue_depth']}/{bound} | "
            f"outstanding {row['outstanding']} | flood refused {row['duplicate_or_unknown']} | "
            f"RSS learner {row['rss_mb']['learner_side']:.0f} MB | workers {row['worker_versions']} "
            f"capacity {row['capacity']} dropped {row['dropped']}",
            file=sys.stderr,
            flush=True,
        )
    stop.set()
    consumer.join(5)
    ctl.stop()
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
    warm = [s for s in samples if s["t"] >= min(120.0, samples[-1]["t"] / 2)]
    names = list(samples[-1]["rss_mb"])
    report = {
        "bench": "soak",
        "minutes": args.minutes,
        "workers": args.workers,
        "steps": samples[-1]["steps"],
        "groups_trained": samples[-1]["steps"] * args.groups_per_step,
        "groups_per_s": round(samples[-1]["steps"] * args.groups_per_step / samples[-1]["t"], 1),
        "flood_frames_refused": samples[-1]["duplicate_or_unknown"],
        "weight_syncs": samples[-1]["weight_syncs"],
        "queue_depth_max": max(s["queue_depth"] for s in samples),
        "queue_bound": bound,
        "outstanding_max": max(s["outstanding"] for s in samples),
        "rss_peak_mb": {n: _num(max(s["rss_mb"][n] for s in samples)) for n in names},
        "rss_growth_after_warmup_mb": {n: _num(warm[-1]["rss_mb"][n] - warm[0]["rss_mb"][n]) for n in names},
        "workers_dropped": samples[-1]["dropped"],
    }
    plot(out, samples, bound)
    (out / "soak.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    print(json.dumps(report))


def _num(x: float) -> float | None:
    return None if x != x else round(x, 1)  # NaN (process already gone) -> null


def plot(out: Path, samples: list[dict], bound: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    ts = [s["t"] / 60 for s in samples]
    for name in samples[-1]["rss_mb"]:
        a.plot(ts, [s["rss_mb"][name] for s in samples], label=name)
    a.set_xlabel("minutes")
    a.set_ylabel("RSS (MB)")
    a.legend(fontsize=8)
    b.plot(ts, [s["queue_depth"] for s in samples], label="buffer queue depth")
    b.plot(ts, [s["outstanding"] for s in samples], label="prompts outstanding")
    b.axhline(bound, color="k", linestyle="--", label="(max_staleness + 1) x G")
    b.set_xlabel("minutes")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=110)


if __name__ == "__main__":
    main()
