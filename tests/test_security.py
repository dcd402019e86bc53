"""Security of the sockets: nothing but msgspec frames is ever decoded (a pickle exploit sent to the live
sockets does nothing and is counted), CURVE lets no unauthenticated peer in or out on the control road,
binding beyond loopback without keys needs --insecure and says so, and no secret reaches a log."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from async_vapo.protocol import PROTOCOL_VERSION, Control, Hello
from async_vapo.protocol.codec import Codec
from async_vapo.protocol.keys import client_security, ensure_keys, server_security
from async_vapo.protocol.transport import ControlClient, ControlServer, GroupReceiver, GroupSender, Security
from tests.helpers import make_group
from tests.test_transport import run_async

PACKAGE = Path(__file__).resolve().parents[1] / "async_vapo"
CODE_EXECUTING = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "jsonpickle"}
CODE_EXECUTING_CALLS = {"recv_pyobj", "send_pyobj", "recv_serialized", "send_serialized", "eval", "exec"}


def test_no_code_executing_decoder_in_the_package():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            elif isinstance(node, ast.Call):
                f = node.func  # builtins eval/exec by name; pyzmq's pickling helpers as methods
                if isinstance(f, ast.Name) and f.id in {"eval", "exec"}:
                    names = [f.id]
                elif isinstance(f, ast.Attribute) and f.attr in CODE_EXECUTING_CALLS - {"eval", "exec"}:
                    names = [f.attr]
                else:
                    continue
            else:
                continue
            offenders += [
                f"{path.relative_to(PACKAGE)}:{node.lineno} {n}"
                for n in names
                if n in CODE_EXECUTING | CODE_EXECUTING_CALLS
            ]
    assert offenders == []


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EXPLOIT_MARKER']}",))


def test_a_pickle_exploit_on_the_live_sockets_does_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    payload = pickle.dumps(_Exploit())
    assert payload  # what vLLM's old pickle-over-ZeroMQ sockets would have executed

    async def main():
        ctx = zmq.asyncio.Context()
        data = GroupReceiver(ctx)
        control = ControlServer(ctx, "tcp://127.0.0.1:*")
        push = ctx.socket(zmq.PUSH)
        push.connect(data.endpoint)
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"attacker")
        dealer.connect(control.endpoint)
        framed = b"AV" + struct.pack("<H", PROTOCOL_VERSION) + payload  # even behind our header
        for frame in (payload, framed):
            await push.send(frame)
            await dealer.send(frame)
        await push.send(bytes(Codec().encode(Control("shutdown"))))  # then something valid
        await dealer.send(bytes(Codec().encode(Hello("attacker", 0, 1))))
        got_data = await asyncio.wait_for(data.recv(), 5)
        got_control = await asyncio.wait_for(control.recv(), 5)
        rejected = sum(data.rejected.values()) + sum(control.rejected.values())
        for s in (push, dealer):
            s.close(0)
        data.close()
        control.close()
        ctx.term()
        return got_data, got_control, rejected

    got_data, got_control, rejected = run_async(main())
    assert isinstance(got_data, Control) and got_control[1] == Hello("attacker", 0, 1)
    assert rejected == 4
    assert not marker.exists()


def test_curve_control_road_nothing_in_nothing_out(tmp_path):
    keys = ensure_keys(tmp_path / "keys", ["good"])

    async def main():
        ctx = zmq.asyncio.Context()
        server = ControlServer(ctx, "tcp://127.0.0.1:*", security=server_security(keys))
        good = ControlClient(ctx, server.endpoint, "good", client_security(keys, "good"))
        pub, sec = Security.generate()
        wrong = ControlClient(
            ctx, server.endpoint, "wrong", Security(pub, sec, client_security(keys, "good").server_public_key)
        )
        plain = ControlClient(ctx, server.endpoint, "plain")
        for c in (wrong, plain, good):
            await c.send(Hello(c.worker_id, 0, 1))
        heard = []
        while True:
            try:
                heard.append((await asyncio.wait_for(server.recv(), 2.0))[0])
            except asyncio.TimeoutError:
                break
        sent = {
            c.worker_id: await server.send(c.worker_id, Control("shutdown", reason="finished"))
            for c in (good, wrong, plain)
        }
        got = {c.worker_id: await c.recv_timeout(1.0) for c in (good, wrong, plain)}
        for c in (good, wrong, plain):
            c.close()
        server.close()
        ctx.term()
        return heard, sent, got

    heard, sent, got = run_async(main())
    assert heard == ["good"]  # nothing in
    assert sent == {"good": True, "wrong": False, "plain": False}  # not even routable
    assert (
        got["good"] == Control("shutdown", reason="finished")
        and got["wrong"] is None
        and got["plain"] is None
    )  # nothing out


def test_a_workers_key_speaks_only_for_that_worker(tmp_path):
    """Per-worker CURVE keys: rollout-1's key opens both roads, but only as rollout-1. A message sent with
    it as rollout-0 (the control road's identity, or a group's ``worker_id``) is dropped and counted; a
    worker without a key of its own cannot connect, and an id that cannot name a key file is refused."""
    keys = ensure_keys(tmp_path / "keys", ["rollout-0", "rollout-1"])
    assert sorted(p.name for p in (keys / "clients").iterdir()) == [
        "rollout-0.key",
        "rollout-0.key_secret",
        "rollout-1.key",
        "rollout-1.key_secret",
    ]
    with pytest.raises(FileNotFoundError, match="rollout-2"):
        client_security(keys, "rollout-2")
    with pytest.raises(ValueError, match="cannot name a key file"):
        ensure_keys(keys, ["../server"])
    one = client_security(keys, "rollout-1")

    async def main():
        ctx = zmq.asyncio.Context()
        sec = server_security(keys)
        control = ControlServer(ctx, "tcp://127.0.0.1:*", security=sec)
        data = GroupReceiver(ctx, "tcp://127.0.0.1:*", security=sec)
        honest = ControlClient(ctx, control.endpoint, "rollout-1", one)
        posing = ControlClient(ctx, control.endpoint, "rollout-0", one)  # rollout-1's key, rollout-0's name
        await posing.send(Hello("rollout-0", 0, 1))
        await honest.send(Hello("rollout-1", 0, 1))
        heard = [(await asyncio.wait_for(control.recv(), 5.0))[0]]
        with pytest.raises(asyncio.TimeoutError):
            heard.append(await asyncio.wait_for(control.recv(), 1.0))
        push = GroupSender(ctx, data.endpoint, security=one)
        await push.send(make_group("p0", worker="rollout-0"))  # a group claimed for another worker
        await push.send(make_group("p1", worker="rollout-1"))
        got = await asyncio.wait_for(data.recv(), 5.0)
        counts = control.rejected["key_identity_mismatch"], data.rejected["key_identity_mismatch"]
        for c in (honest, posing, push):
            c.close()
        control.close()
        data.close()
        ctx.term()
        return heard, got, counts

    heard, got, counts = run_async(main())
    assert heard == ["rollout-1"]
    assert got.prompt.uid == "p1" and got.worker_id == "rollout-1"
    assert counts == (1, 1)


def test_insecure_bind_warns_and_no_secret_reaches_the_logs(tmp_path, capfd):
    from async_vapo.logging import configure_logging

    configure_logging()
    keys = ensure_keys(tmp_path / "keys", ["rollout-0"])
    secrets = [
        line.split('"')[1]
        for name in ("server.key_secret", "clients/rollout-0.key_secret")
        for line in (keys / name).read_text().splitlines()
        if line.strip().startswith("secret-key")
    ]
    assert len(secrets) == 2
    assert all(oct(p.stat().st_mode)[-3:] == "600" for p in keys.rglob("*.key_secret"))

    async def main():
        ctx = zmq.asyncio.Context()
        secure = GroupReceiver(ctx, "tcp://0.0.0.0:*", security=server_security(keys))
        open_ = GroupReceiver(ctx, "tcp://0.0.0.0:*", insecure=True)
        push = ctx.socket(zmq.PUSH)
        push.connect(open_.endpoint)
        await push.send(b"garbage")  # a reject log line
        await asyncio.sleep(0.3)
        print(repr(server_security(keys)), repr(client_security(keys, "rollout-0")))
        push.close(0)
        task = asyncio.ensure_future(open_.recv())
        await asyncio.sleep(0.3)
        task.cancel()
        secure.close()
        open_.close()
        ctx.term()

    run_async(main())
    out = "".join(capfd.readouterr())
    assert "binding without authentication" in out
    assert "hidden" in out
    assert not any(s in out for s in secrets)


def test_run_store_values_are_signed_and_forgeries_ignored(tmp_path):
    """A multi-node run's TCPStore accepts writes from anyone who can reach it: the launchers act only on
    values signed with the run's key (HMAC-SHA256); a forged drop/done is ignored and counted."""
    from datetime import timedelta

    import torch.distributed as dist

    from async_vapo.cluster.rendezvous import STALE_S, Endpoints, RunStore, ensure_store_key, load_store_key

    key = ensure_store_key(tmp_path / "keys")
    assert load_store_key(tmp_path / "keys") == key and len(key) == 32
    assert (tmp_path / "keys" / "store.key").stat().st_mode & 0o077 == 0
    node0 = RunStore("127.0.0.1:0", is_master=True, key=key)
    node0.publish_endpoints(Endpoints("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", 3, "127.0.0.1"))
    node1 = RunStore.connect(node0.address, key=key)
    assert node1.endpoints().launch == node0.nonce and len(node0.nonce) == 32
    attacker = dist.TCPStore("127.0.0.1", node0.store.port, None, False, timedelta(seconds=10))

    def forge(key: str, value: str) -> None:
        attacker.set(key, value)
        attacker.get(key)  # a SET is not acknowledged: a GET on the same connection orders it

    node0.notify_drop("rollout-3", 4242)  # the controller's real notice
    node0.store.get("drop/rollout-3")
    assert node1.dropped_pid("rollout-3") == 4242
    for forged in ("777", '{"v": "777", "mac": "' + "0" * 64 + '"}', "not json {", '{"v": 1}'):
        forge("drop/rollout-5", forged)
        assert node1.dropped_pid("rollout-5") is None
    forge("done", '{"v": "1", "mac": ""}')
    assert node1.done() is False
    assert node1.forged == {"drop": 4, "done": 1}
    node0.mark_done()
    node0.store.get("done")
    assert node1.done() is True
    # a value signed with another key is a forgery too
    other = RunStore.connect(node0.address, key=b"x" * 32)
    other.notify_drop("rollout-6", 1)
    other.store.get("drop/rollout-6")
    assert node1.dropped_pid("rollout-6") is None
    # the same key in an earlier launch of the run: its values (and its endpoints) are replays
    earlier = RunStore("127.0.0.1:0", is_master=True, key=key)
    earlier.publish_endpoints(Endpoints("tcp://127.0.0.1:4", "tcp://127.0.0.1:5", 6, "127.0.0.1"))
    earlier.notify_drop("rollout-7", 99)
    earlier.mark_done()
    for name in ("drop/rollout-7", "done"):
        forge(name, earlier.store.get(name).decode())
    assert node1.dropped_pid("rollout-7") is None and node1.forged["drop"] == 6
    old_endpoints = json.loads(earlier.store.get("endpoints"))
    late = RunStore.connect(earlier.address, key=key)
    late.started = json.loads(old_endpoints["v"])["issued_at"] + STALE_S + 1  # a launch long after it
    with pytest.raises(RuntimeError, match="earlier launch"):
        late.endpoints()


def test_one_machine_run_store_is_a_file(tmp_path):
    from async_vapo.cluster.rendezvous import Endpoints, RunStore

    a = RunStore(f"file:{tmp_path / 'store'}", is_master=True)
    b = RunStore.connect(a.address)
    a.publish_endpoints(Endpoints("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", 3, "127.0.0.1"))
    assert b.endpoints().learner_master_port == 3
    assert (tmp_path / "store").exists() and not b.done()
