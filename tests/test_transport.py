"""ZeroMQ transport on loopback with real processes: delivery, order, back-pressure, garbage, CURVE."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import random

import msgspec
import pytest
import uvloop
import zmq
import zmq.asyncio

from async_vapo.protocol import Control, TrajectoryGroup
from async_vapo.protocol.transport import (
    ControlClient,
    ControlServer,
    GroupReceiver,
    GroupSender,
    Security,
    check_bind,
    is_loopback,
)
from tests.helpers import make_group


def _sender_main(endpoint: str, worker: str, count: int) -> None:
    async def run() -> None:
        ctx = zmq.asyncio.Context()
        sender = GroupSender(ctx, endpoint, sndhwm=8)
        for i in range(count):
            await sender.send(make_group(f"{worker}-{i}", n=2, tokens=16, worker=worker, seq=i))
        sender.close(linger_ms=10_000)
        ctx.term()

    uvloop.run(run())


def run_async(coro):
    return uvloop.run(coro)


def test_thousands_of_groups_from_two_processes_nothing_lost_order_kept():
    per_sender = 1500

    async def main():
        ctx = zmq.asyncio.Context()
        recv = GroupReceiver(ctx)
        spawn = mp.get_context("spawn")
        procs = [
            spawn.Process(target=_sender_main, args=(recv.endpoint, f"w{k}", per_sender)) for k in range(2)
        ]
        for p in procs:
            p.start()
        got: dict[str, list[int]] = {"w0": [], "w1": []}
        for _ in range(2 * per_sender):
            msg = await asyncio.wait_for(recv.recv(), 60)
            assert isinstance(msg, TrajectoryGroup)
            got[msg.worker_id].append(int(msg.prompt.uid.split("-")[1]))
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        recv.close()
        ctx.term()
        return got

    got = run_async(main())
    for seqs in got.values():
        assert seqs == list(range(per_sender))  # nothing lost, nothing duplicated, order kept


def test_garbage_on_live_socket_is_counted_and_service_continues():
    rng = random.Random(0)

    async def main():
        ctx = zmq.asyncio.Context()
        recv = GroupReceiver(ctx, max_frame_bytes=1 << 16)
        raw = ctx.socket(zmq.PUSH)
        raw.connect(recv.endpoint)
        hog = ctx.socket(zmq.PUSH)  # oversized frames: ZeroMQ drops the frame and disconnects this peer
        hog.connect(recv.endpoint)
        good = GroupSender(ctx, recv.endpoint)
        garbage = 0
        for i in range(300):
            kind = i % 4
            if kind == 0:
                frame = os.urandom(rng.randint(0, 200))
            elif kind == 1:
                frame = b"AV\x07\x00" + os.urandom(20)  # wrong version
            elif kind == 2:
                frame = bytes(good.codec.encode(make_group(f"x{i}")))[:-7]  # truncated
            else:
                await hog.send(b"AV" + b"\x00" * (1 << 17), flags=zmq.NOBLOCK)
                frame = msgspec.msgpack.encode(["group", 1, 2])  # no header at all
            garbage += 1
            await raw.send(frame)
            await good.send(make_group(f"g{i}"))
        uids = [(await asyncio.wait_for(recv.recv(), 10)).prompt.uid for _ in range(300)]
        await asyncio.sleep(0.1)
        rejected = sum(recv.rejected.values())
        raw.close(0)
        hog.close(0)
        good.close(0)
        recv.close()
        ctx.term()
        return uids, rejected, garbage

    uids, rejected, garbage = run_async(main())
    assert uids == [f"g{i}" for i in range(300)]
    assert rejected == garbage


def test_slow_receiver_back_pressures_sender_without_dropping():
    async def main():
        ctx = zmq.asyncio.Context()
        recv = GroupReceiver(ctx, rcvhwm=2)
        sender = GroupSender(ctx, recv.endpoint, sndhwm=2)
        big = make_group("big", n=4, tokens=50_000)
        sent = 0
        with pytest.raises(asyncio.TimeoutError):
            for _ in range(1000):
                await asyncio.wait_for(sender.send(big), 1.0)
                sent += 1
        assert sent < 50  # bounded by the high-water marks, not by memory
        received = 0
        while True:
            try:
                await asyncio.wait_for(recv.recv(), 1.0)
                received += 1
            except asyncio.TimeoutError:
                break
        sender.close(0)
        recv.close()
        ctx.term()
        return sent, received

    sent, received = run_async(main())
    assert received >= sent  # everything that send() accepted arrived (plus the one in flight)


def test_bind_policy():
    assert (
        is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://[::1]:5") and is_loopback("ipc:///tmp/x")
    )
    assert not is_loopback("tcp://0.0.0.0:5555") and not is_loopback("tcp://*:5555")
    check_bind("tcp://127.0.0.1:*", None, insecure=False)
    with pytest.raises(PermissionError, match="CURVE"):
        check_bind("tcp://0.0.0.0:5555", None, insecure=False)
    check_bind("tcp://0.0.0.0:5555", None, insecure=True)  # allowed, with a warning


def test_control_round_trip_and_unknown_worker():
    async def main():
        ctx = zmq.asyncio.Context()
        server = ControlServer(ctx)
        client = ControlClient(ctx, server.endpoint, "w7")
        await client.send(Control("shutdown", "w7", 1.0, "finished"))
        who, msg = await asyncio.wait_for(server.recv(), 5)
        assert who == "w7" and isinstance(msg, Control)
        assert await server.send("w7", Control("shutdown", reason="finished"))
        back = await asyncio.wait_for(client.recv(), 5)
        assert isinstance(back, Control) and back.kind == "shutdown"
        assert not await server.send("nobody", Control("shutdown", reason="finished"))
        client.close()
        server.close()
        ctx.term()

    run_async(main())


def test_curve_refuses_peers_without_the_key():
    async def main():
        ctx = zmq.asyncio.Context()
        server_pub, server_sec = Security.generate()
        client_pub, client_sec = Security.generate()
        server_sec_obj = Security(server_pub, server_sec, allowed_client_keys=(client_pub,))
        assert "hidden" in repr(server_sec_obj) and server_sec.decode() not in repr(server_sec_obj)
        recv = GroupReceiver(ctx, "tcp://127.0.0.1:*", security=server_sec_obj)
        ok = GroupSender(ctx, recv.endpoint, security=Security(client_pub, client_sec, server_pub))
        intruder_pub, intruder_sec = Security.generate()
        intruder = GroupSender(ctx, recv.endpoint, security=Security(intruder_pub, intruder_sec, server_pub))
        plain = GroupSender(ctx, recv.endpoint)  # no CURVE at all
        for i in range(5):
            await intruder.send(make_group(f"bad{i}"))
        for i in range(5):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(plain.send(make_group(f"plain{i}")), 0.2)
        await ok.send(make_group("good"))
        uids = []
        while True:
            try:
                uids.append((await asyncio.wait_for(recv.recv(), 2.0)).prompt.uid)
            except asyncio.TimeoutError:
                break
        for s in (ok, intruder, plain):
            s.close(0)
        recv.close()
        ctx.term()
        return uids

    assert run_async(main()) == ["good"]


def test_a_flooded_receiver_still_lets_other_tasks_run():
    """A socket that never runs dry must not starve the loop (heartbeats, acks, dispatch share it):
    awaiting a receive that is already complete does not yield, so the receiver yields itself."""
    from async_vapo.protocol import Codec

    async def main() -> tuple[int, int]:
        ctx = zmq.asyncio.Context()
        rx = GroupReceiver(ctx, rcvhwm=10_000)
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 10_000)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(rx.endpoint)
        for i in range(3000):
            await push.send(b"garbage %d" % i)
        await push.send(bytes(Codec().encode(make_group())))
        await asyncio.sleep(0.5)  # everything is queued on the receiving side
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        ticks = 0
        msg = await rx.recv()  # 3000 rejects, then the valid group
        during = ticks
        done = True
        await t
        assert isinstance(msg, TrajectoryGroup)
        push.close(0)
        rx.close()
        ctx.term()
        return during, sum(rx.rejected.values())

    during, rejected = run_async(main())
    assert rejected == 3000
    assert during >= 3000 // 16 // 2, during  # the ticker ran all along, not only after the burst
