"""Streamed publish + fan-out with real processes: two DeepSpeed ZeRO-3 learner ranks (gloo) stream the
tiny policy bucket by bucket to three engines' groups, spread over the ranks; the engines' ends are
plain processes that receive and check every tensor against the model on disk. One engine never joins:
its owner reports it failed after the group timeout and the other two get every byte."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch

from async_vapo.cluster.ports import free_port
from async_vapo.protocol.messages import PublishPlan, PublishTarget
from async_vapo.weight_sync.fanout import Outcome, RankLinks, gather_status, share_plan
from async_vapo.weight_sync.publish import StreamPlan, full_shape, stream_publish

pytestmark = pytest.mark.slow


def _engine(model_dir: str, port: int, buckets, out, ready) -> None:
    from transformers import AutoModelForCausalLM

    from async_vapo.weight_sync.buckets import empty_flat, unpack
    from async_vapo.weight_sync.group import GroupSpec, broadcast, join_group

    torch.set_num_threads(1)
    want = dict(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).named_parameters())
    ready.put(port)  # a live engine: it joins as soon as it is told (as a rollout worker does)
    pg = join_group(GroupSpec("127.0.0.1", port, 2, "gloo", 30.0), 1, serve=False)
    worst, names = 0.0, 0
    for b in buckets:
        flat = empty_flat(b)
        broadcast(pg, flat)
        for name, t in unpack(b, flat):
            worst = max(worst, float((t - want[name].detach()).abs().max()))
            names += 1
    out.put((port, names == len(want), worst))


def _rank(rank: int, port: int, model_dir: str, q, res, go) -> None:
    from async_vapo.learner.models import local_rank_env

    os.environ.update(local_rank_env(rank, 2, port))
    torch.set_num_threads(1)
    from async_vapo.config import TrainConfig
    from async_vapo.learner.models import init_distributed, load_policy, make_engine
    from async_vapo.weight_sync.group import GroupSpec, serve_store

    init_distributed("gloo")
    engine = make_engine(load_policy(model_dir, torch.float32), 1e-4, TrainConfig(zero_stage=3), False, 4)
    named = list(engine.module.named_parameters())
    assert any(p.numel() == 0 for _, p in named)  # really partitioned: ZeRO-3 holds shards only
    plan = StreamPlan.of(named, 256 * 1024)
    stores, pp = [], None
    if rank == 0:
        targets = []
        for k in range(3):  # engines 0, 2 fed by rank 0; engine 1 by rank 1 (it never joins)
            spec = GroupSpec("127.0.0.1", free_port(), 2, "gloo", 5.0)
            stores.append(serve_store(spec))
            targets.append(PublishTarget(f"e{k}", k % 2, spec.as_tuple()))
            q.put((k, spec.port, plan.buckets))
        pp = PublishPlan(1, targets, [t.worker_id for t in targets])
        go.wait(240)
    pp = share_plan(pp, "cpu")
    links = RankLinks(rank)
    t0 = time.perf_counter()
    links.prepare(pp)
    sent = stream_publish(plan, links.send if links.sending else None, "cpu")
    outcomes = gather_status(pp, links.outcomes, "cpu")
    res.put((rank, sent, [(o.ok, o.nbytes) for o in outcomes], time.perf_counter() - t0, plan.nbytes))


def test_streamed_zero3_publish_spread_over_ranks_survives_a_dead_engine(tiny_model_dir):
    ctx = mp.get_context("spawn")
    q, res, got, ready, go = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Event()
    port = free_port()
    ranks = [ctx.Process(target=_rank, args=(r, port, str(tiny_model_dir), q, res, go)) for r in (0, 1)]
    for p in ranks:
        p.start()
    engines = []
    for _ in range(3):
        k, eport, buckets = q.get(timeout=240)
        if k != 1:  # engine 1 is dead: nobody joins its group
            engines.append(
                ctx.Process(target=_engine, args=(str(tiny_model_dir), eport, buckets, got, ready))
            )
            engines[-1].start()
    for _ in engines:
        ready.get(timeout=240)
    go.set()
    results = sorted(res.get(timeout=240) for _ in ranks)
    received = [got.get(timeout=120) for _ in engines]
    for p in [*ranks, *engines]:
        p.join(60)
        assert p.exitcode == 0
    (_, sent0, status0, _, model_bytes), (_, sent1, status1, seconds1, _) = results
    assert status0 == status1  # every rank knows every target's outcome
    assert [ok for ok, _ in status0] == [True, False, True]
    assert status0[0][1] == status0[2][1] == model_bytes  # the live engines got the whole model
    assert sent0 == model_bytes and sent1 == 0  # rank 1's only engine died before the first bucket
    assert seconds1 < 60  # the dead engine cost its owner one group timeout (5 s), not a hang
    for _, every_tensor, worst in received:
        assert every_tensor and worst == 0.0  # the whole tiny model, bit-exact from the ZeRO-3 shards


def test_plan_and_status_on_one_rank():
    """Without a distributed world the plan passes through and the outcomes are the rank's own."""
    plan = PublishPlan(3, [PublishTarget("w", 0)], ["w"])
    assert share_plan(plan, "cpu") is plan
    links = RankLinks(0, lookup=lambda wid: None)
    links.prepare(plan)  # no link for "w" on its owner: a failed target, not an exception
    assert links.outcomes[0].ok is False
    [status] = gather_status(plan, links.outcomes, "cpu")
    assert not status.ok and "no link" in status.error
    assert gather_status(plan, {0: Outcome(nbytes=7)}, "cpu")[0].nbytes == 7


def test_stream_plan_uses_full_shapes():
    lin = torch.nn.Linear(3, 5)
    plan = StreamPlan.of(lin.named_parameters(), 1 << 20)
    assert plan.buckets == [[("weight", "float32", [5, 3]), ("bias", "float32", [5])]]
    assert plan.nbytes == 20 * 4
    assert full_shape(lin.weight) == [5, 3]


def test_a_collective_that_never_completes_aborts_only_its_group_at_the_deadline():
    """NCCL's ``wait()`` returns before the collective ran, and past the communicator's timeout the
    watchdog ends the process: the host must judge completion itself (``is_completed``), abort only that
    group at its deadline and raise, the way a gloo timeout does."""
    import time

    import pytest

    from async_vapo.weight_sync.group import CollectiveTimeout, WeightGroup, broadcast

    class NeverDone:  # a work object whose peer is gone: queued, never completed
        waited = False

        def is_completed(self) -> bool:
            return False

        def wait(self) -> bool:
            NeverDone.waited = True  # on NCCL this would return at once, having done nothing
            return True

    class Comm:
        aborted = 0

        def broadcast(self, tensor, root):
            return NeverDone()

        def abort(self) -> None:
            Comm.aborted += 1

    t0 = time.monotonic()
    with pytest.raises(CollectiveTimeout, match="aborted"):
        broadcast(WeightGroup(Comm(), deadline_s=0.3), torch.zeros(4))
    assert 0.3 <= time.monotonic() - t0 < 2.0
    assert Comm.aborted == 1 and not NeverDone.waited  # never reported as done
