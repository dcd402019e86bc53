"""A weight sync that never completes: a real controller (ZeroMQ sockets, gloo weight group) and a peer
that says Hello, joins its weight group, then stops answering. The controller must drop it within the
configured timeout (never hang), requeue its prompts, tell it to exit and tell its launcher through the
rendezvous store."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import zmq

from async_vapo.buffer import PromptLedger
from async_vapo.cluster import RunStore
from async_vapo.cluster.ports import free_port
from async_vapo.config import TrainConfig
from async_vapo.controller import Controller, Wiring
from async_vapo.protocol import Control, Hello, JoinGroup, Prompt, pack_i32
from async_vapo.protocol.codec import Codec
from async_vapo.weight_sync.broadcast import snapshot
from async_vapo.weight_sync.group import GroupSpec, join_group
from tests.helpers import rules

TIMEOUT_S = 3.0


def _controller(
    n_prompts: int,
    groups_per_step: int = 1,
    max_staleness: int = 0,
    store_address: str = "",
    snapshot_at_start: bool = False,
    **train,
) -> tuple[Controller, Wiring, PromptLedger]:
    """A real controller on fresh loopback ports (not started), over ``n_prompts`` small prompts."""
    ledger = PromptLedger([Prompt(f"p{i}", pack_i32([1, 2, 3]), "5") for i in range(n_prompts)], seed=0)
    wiring = Wiring(
        data_endpoint=f"tcp://127.0.0.1:{free_port()}",
        control_endpoint=f"tcp://127.0.0.1:{free_port()}",
        store_address=store_address,
    )
    cfg = TrainConfig(groups_per_step=groups_per_step, max_staleness=max_staleness, **train)
    controller = Controller(cfg, wiring, ledger, rules=rules(), snapshot_at_start=snapshot_at_start)
    return controller, wiring, ledger


def test_worker_that_stops_answering_a_weight_sync_is_dropped_in_time():
    store = RunStore("127.0.0.1:0", is_master=True)
    controller, cfg, ledger = _controller(
        16, 2, 1, weight_sync_timeout_s=TIMEOUT_S, worker_timeout_s=60.0, store_address=store.address
    )
    controller.start()
    codec = Codec()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"w-hang")
    sock.setsockopt(zmq.RCVTIMEO, 20_000)
    sock.connect(cfg.control_endpoint)
    groups: list = []
    try:
        sock.send(codec.encode(Hello("w-hang", 0, os.getpid())))
        join = codec.decode(sock.recv())
        assert isinstance(join, JoinGroup)
        spec = GroupSpec(join.host, join.port, join.world_size, join.backend, join.timeout_s)
        joiner = threading.Thread(target=lambda: groups.append(join_group(spec, 1)), daemon=True)
        joiner.start()
        joiner.join(30)
        assert groups, "could not join the weight group"
        # the worker is ready: it gets prompts (credits), which it will never answer
        deadline = time.monotonic() + 20
        while not ledger.outstanding and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ledger.outstanding, "no prompt was assigned"
        # new weights: the peer never takes part in the broadcast nor acks
        model = torch.nn.Linear(256, 256)
        t0 = time.monotonic()
        controller.publish(snapshot(1, model.named_parameters(), 2**16))
        while controller.metrics().worker_versions and time.monotonic() - t0 < 4 * TIMEOUT_S + 10:
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        m = controller.metrics()
        assert m.worker_versions == {}, "the silent worker was not dropped"
        assert elapsed < 2 * TIMEOUT_S + 3, elapsed  # the broadcast, then the ack, each bounded
        assert m.counters["worker_dropped_weight_sync_failed"] == 1
        assert not ledger.outstanding and len(ledger.requeued) > 0  # its prompts wait for someone else
        assert store.dropped_pid("w-hang") == os.getpid()  # its launcher is told to kill it
        # and the worker itself is told to exit (if it can still listen)
        seen = []
        while True:
            msg = codec.decode(sock.recv())
            seen.append(type(msg).__name__)
            if isinstance(msg, Control) and msg.kind == "shutdown":
                assert msg.reason == "dropped"
                break
    finally:
        sock.close(0)
        ctx.term()
        controller.stop()


def _weight_peer(cfg: Wiring, identity: str, version: int, stop: threading.Event, acked: list[int]) -> None:
    """A worker that says Hello with its engine at ``version``, joins its weight group, takes part in every
    broadcast it is sent and acks it (until ``stop``)."""
    from async_vapo.protocol import WeightAck, WeightUpdate
    from async_vapo.weight_sync.buckets import FlatPool
    from async_vapo.weight_sync.group import broadcast

    codec, ctx = Codec(), zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.RCVTIMEO, 200)
    sock.connect(cfg.control_endpoint)
    sock.send(codec.encode(Hello(identity, version, os.getpid())))
    pg, pool = None, FlatPool()
    while not stop.is_set():
        try:
            msg = codec.decode(sock.recv())
        except zmq.Again:
            continue
        if isinstance(msg, JoinGroup):
            pg = join_group(GroupSpec(msg.host, msg.port, msg.world_size, msg.backend, msg.timeout_s), 1)
        elif isinstance(msg, WeightUpdate):
            for i, b in enumerate(msg.buckets):
                broadcast(pg, pool.get(i, b), root=0)
            sock.send(codec.encode(WeightAck(identity, msg.version, 0.0)))
            acked.append(msg.version)
        elif isinstance(msg, Control) and msg.kind == "shutdown":
            acked.append(-1)  # told to exit
            break
    sock.close(0)
    ctx.term()


def test_back_to_back_publishes_never_interleave_two_broadcasts():
    """Two publishes before the loop runs the first sync used to start two syncs on one group (found
    by bench/soak.py): gloo saw mismatched sizes and the worker was dropped."""
    controller, cfg, _ = _controller(8, weight_sync_timeout_s=10.0)
    controller.start()
    stop = threading.Event()
    acked: list[int] = []

    def peer() -> None:
        _weight_peer(cfg, "w-ok", 0, stop, acked)

    th = threading.Thread(target=peer, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 30
        while controller.metrics().worker_versions.get("w-ok") != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
        for v in range(1, 21):
            controller.publish(snapshot(v, model.named_parameters(), 2**18))  # 2 publishes per loop turn
        deadline = time.monotonic() + 30
        while controller.metrics().worker_versions.get("w-ok") != 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        m = controller.metrics()
        assert m.worker_versions == {"w-ok": 20}, m.counters
        assert "weight_sync_failed" not in m.counters
        assert acked == sorted(acked) and acked[-1] == 20  # only ever forward, newest last
    finally:
        stop.set()
        th.join(5)
        controller.stop()


def test_a_dying_controller_loop_fails_the_learner_instead_of_hanging_it():
    """Fault injection: the buffer raises inside the data loop. ``take_batch`` must raise at once."""
    from tests.helpers import make_group

    controller, cfg, _ = _controller(4)

    def broken_put(group):
        raise ValueError("injected buffer fault")

    controller.buffer.put = broken_put  # type: ignore[method-assign]
    controller.start()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(cfg.data_endpoint)
    try:
        push.send(bytes(Codec().encode(make_group("p0"))))
        t0 = time.monotonic()
        try:
            controller.take_batch(1, timeout_s=20)
        except RuntimeError as exc:
            assert isinstance(exc.__cause__, ValueError) and "injected" in str(exc.__cause__)
        else:
            raise AssertionError("take_batch did not raise")
        assert time.monotonic() - t0 < 5
    finally:
        push.close(0)
        ctx.term()
        controller.stop()


def test_dynamic_sampling_starved_of_signal_fails_the_learner_with_the_reason():
    """Every group uniform (a policy that solves every prompt) under dynamic sampling: the learner must be
    told why instead of waiting for a batch forever. Dynamic sampling starts with the policy phase."""
    from async_vapo.buffer import SamplingStarved
    from tests.helpers import make_group

    controller, cfg, ledger = _controller(5, filter_uniform_rewards=True, filter_patience=2)
    first, *issued = ledger.take(3, "w0")
    controller.staleness.on_started(3)
    controller.start()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(cfg.data_endpoint)
    try:
        # Value-Pretraining: the critic learns from every group, uniform ones included
        push.send(bytes(Codec().encode(make_group(prompt=first, rewards=[1.0] * 4))))
        got = controller.take_batch(1, timeout_s=20)
        assert got is not None and got[0].prompt.uid == first.uid
        controller.mark_trained(got)
        controller.start_filtering()  # the policy phase
        for p in issued:
            push.send(bytes(Codec().encode(make_group(prompt=p, rewards=[1.0] * 4))))
        with pytest.raises(RuntimeError, match="controller failed") as info:
            controller.take_batch(1, timeout_s=20)
        assert isinstance(info.value.__cause__, SamplingStarved)
        assert "last 2 groups" in str(info.value.__cause__)
        assert controller.metrics().filtered == 2
    finally:
        push.close(0)
        ctx.term()
        controller.stop()


def test_first_evaluation_waits_for_an_engine():
    """Without value pretraining the learner evaluates step 0 before any engine is up: it must wait for
    one (it used to fail the run: found by studies/ablation.py)."""
    from async_vapo.protocol import Assign, Sampling, TrajectoryGroup
    from tests.helpers import make_group

    controller, cfg, _ = _controller(1)
    controller.start()
    stop = threading.Event()

    def late_engine() -> None:
        time.sleep(1.5)  # the evaluation is already waiting
        codec, ctx = Codec(), zmq.Context()
        ctl, push = ctx.socket(zmq.DEALER), ctx.socket(zmq.PUSH)
        ctl.setsockopt(zmq.IDENTITY, b"late")
        ctl.setsockopt(zmq.RCVTIMEO, 200)
        ctl.connect(cfg.control_endpoint)
        push.connect(cfg.data_endpoint)
        ctl.send(codec.encode(Hello("late", 0, os.getpid())))
        while not stop.is_set():
            try:
                msg = codec.decode(ctl.recv())
            except zmq.Again:
                continue
            if isinstance(msg, JoinGroup):
                spec = GroupSpec(msg.host, msg.port, msg.world_size, msg.backend, msg.timeout_s)
                join_group(spec, 1)
            elif isinstance(msg, Assign) and msg.sampling is not None:
                for p in msg.prompts:
                    group = make_group(prompt=p, worker="late", n=msg.sampling.n, eval_round=msg.eval_round)
                    push.send(bytes(codec.encode(group)))
        ctl.close(0)
        push.close(0)
        ctx.term()

    th = threading.Thread(target=late_engine, daemon=True)
    th.start()
    try:
        prompts = [Prompt(f"e{i}", pack_i32([1, 2]), "3") for i in range(3)]
        groups = controller.evaluate(prompts, Sampling(2, 1.0, 1.0, 8), timeout_s=30)
        assert len(groups) == 3 and all(isinstance(g, TrajectoryGroup) for g in groups)
        assert sorted(g.prompt.uid for g in groups) == ["e0", "e1", "e2"]
        m = controller.metrics()
        assert m.admitted == 0 and m.queue_depth == 0  # evaluation groups never reach the buffer
    finally:
        stop.set()
        th.join(5)
        controller.stop()


def test_a_restarted_learner_at_version_0_syncs_an_engine_that_is_ahead():
    """A learner world restarted from the start (killed before its first checkpoint) is at version 0
    while a worker kept across the restart holds version 3: the new learner publishes its weights as it
    starts (``snapshot_at_start``), so the worker is welcomed, waits for them and is synced to version 0,
    instead of being restarted from the model (a vLLM start-up)."""
    controller, cfg, ledger = _controller(8, 2, 1, weight_sync_timeout_s=10.0, snapshot_at_start=True)
    controller.start()
    stop = threading.Event()
    acked: list[int] = []
    th = threading.Thread(target=_weight_peer, args=(cfg, "w-ahead", 3, stop, acked), daemon=True)
    th.start()
    try:
        time.sleep(1.0)  # its Hello is handled before the snapshot exists: welcomed, not dropped
        assert "hello_restarted_weights_unavailable" not in controller.metrics().counters
        assert not ledger.outstanding  # no prompt for it while its weights are unknown
        model = torch.nn.Linear(64, 64)
        controller.publish(snapshot(0, model.named_parameters(), 2**16))
        deadline = time.monotonic() + 30
        while controller.metrics().worker_versions.get("w-ahead") != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert controller.metrics().worker_versions == {"w-ahead": 0}
        assert acked == [0]  # synced once, to the learner's version 0, never told to exit
        deadline = time.monotonic() + 10
        while not ledger.outstanding and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ledger.outstanding  # then fed
    finally:
        stop.set()
        th.join(10)
        controller.stop()
