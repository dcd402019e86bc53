"""Fan-out: seconds per weight update with 1, 2 and 4 engines when learner rank 0 feeds every engine vs
when the engines are spread over the learner ranks (``async_vapo.weight_sync.fanout``, what a streamed
publish does).

Two learner ranks (a gloo world) walk the same ``StreamPlan`` of a synthetic model and stream it with
``RankLinks`` to N receiver processes (the engines' end of their groups: join, receive every bucket,
the learner ranks check every target's outcome); the group stores are served by rank 0 as the controller serves them. Each figure is the median
over ``reps`` updates of the wall time from the plan to every rank's last bucket. Used by
``weight_sync.py``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

import torch

MB = 2**20


def _engine(host: str, port: int, buckets: Any, reps: int, out: Any) -> None:
    from async_vapo.weight_sync.buckets import empty_flat
    from async_vapo.weight_sync.group import GroupSpec, broadcast, join_group

    torch.set_num_threads(1)
    pg = join_group(GroupSpec(host, port, 2, "gloo", 300.0), 1, serve=False)
    for _ in range(reps):
        for b in buckets:
            broadcast(pg, empty_flat(b))
        out.put(True)


def _rank(rank: int, port: int, mb: int, bucket_mb: float, cases: list, q: Any, res: Any) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    import torch.distributed as dist

    from async_vapo.protocol.messages import PublishPlan, PublishTarget
    from async_vapo.weight_sync.fanout import RankLinks, gather_status, share_plan
    from async_vapo.weight_sync.group import GroupSpec, serve_store
    from async_vapo.weight_sync.publish import StreamPlan, stream_publish

    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.ModuleList(torch.nn.Linear(1024, 1024, bias=False) for _ in range(max(1, mb // 4)))
    plan = StreamPlan.of(model.named_parameters(), int(bucket_mb * MB))
    figures: dict[str, float] = {}
    for case_i, (n_engines, spread, reps) in enumerate(cases):
        links = RankLinks(rank)
        stores = []
        targets = []
        if rank == 0:
            for k in range(n_engines):
                spec = GroupSpec("127.0.0.1", _port(), 2, "gloo", 300.0)
                stores.append(serve_store(spec))
                targets.append(PublishTarget(f"e{k}", k % 2 if spread else 0, spec.as_tuple()))
                q.put((case_i, spec.port, plan.buckets, reps))
        times = []
        for rep in range(reps):
            p = (
                PublishPlan(
                    rep,
                    targets if rep == 0 else [PublishTarget(t.worker_id, t.owner) for t in targets],
                    [t.worker_id for t in targets],
                )
                if rank == 0
                else None
            )
            dist.barrier()
            t0 = time.perf_counter()
            p = share_plan(p, "cpu")
            links.prepare(p)
            stream_publish(
                plan, links.send if links.sending else None, "cpu", gather=lambda _: contextlib.nullcontext()
            )
            outcomes = gather_status(p, links.outcomes, "cpu")
            times.append(time.perf_counter() - t0)
            assert all(o.ok for o in outcomes), [o.error for o in outcomes]
        if rank == 0:
            figures[f"{'spread' if spread else 'rank0'}_{n_engines}"] = statistics.median(times[1:] or times)
        dist.barrier()
        del stores
    if rank == 0:
        figures["model_mb"] = plan.nbytes / MB
        res.put(figures)
    dist.destroy_process_group()


def fanout(
    engines: tuple[int, ...] = (1, 2, 4), mb: int = 64, bucket_mb: float = 16.0, reps: int = 4
) -> dict:
    ctx = mp.get_context("spawn")
    q, res, sums = ctx.Queue(), ctx.Queue(), ctx.Queue()
    cases = [(n, spread, reps) for n in engines for spread in (False, True)]
    port = _port()
    ranks = [ctx.Process(target=_rank, args=(r, port, mb, bucket_mb, cases, q, res)) for r in (0, 1)]
    for p in ranks:
        p.start()
    receivers = []
    for n, _, _ in cases:
        for _ in range(n):
            _case, eport, buckets, r = q.get(timeout=300)
            proc = ctx.Process(target=_engine, args=("127.0.0.1", eport, buckets, r, sums))
            proc.start()
            receivers.append(proc)
    figures = res.get(timeout=1800)
    for p in [*ranks, *receivers]:
        p.join(60)
    out: dict[str, Any] = {
        "model_mb": round(figures.pop("model_mb"), 1),
        "bucket_mb": bucket_mb,
        "reps": reps,
    }
    for mode in ("rank0", "spread"):
        out[f"{mode}_s"] = {str(n): round(figures[f"{mode}_{n}"], 4) for n in engines}
        base = figures[f"{mode}_{engines[0]}"]
        out[f"{mode}_growth"] = {str(n): round(figures[f"{mode}_{n}"] / base, 2) for n in engines}
    out["spread_vs_rank0_at_max"] = round(
        figures[f"rank0_{engines[-1]}"] / figures[f"spread_{engines[-1]}"], 2
    )
    return out


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    import json

    print(json.dumps(fanout()))
