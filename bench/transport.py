"""Transport benchmark: msgspec frames over ZeroMQ vs the same payload pickled over ZeroMQ (what users
would write) vs raw bytes of the same size over ZeroMQ (the ceiling), for small (8 x 256 tokens) and large
(16 x 16k tokens) groups. Sender and receiver are separate processes on loopback TCP; the receiver decodes
(and for msgspec validates) every frame. Prints one JSON object on its last line.

    .venv/bin/python bench/transport.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import pickle
import time

import numpy as np
import zmq

from async_vapo.cluster.ports import free_port
from async_vapo.protocol import Codec, Prompt, Response, TrajectoryGroup, pack_f32, pack_i32


def make_group(n: int, tokens: int) -> TrajectoryGroup:
    rng = np.random.default_rng(0)
    resp = [
        Response(
            pack_i32(rng.integers(0, 150_000, tokens)),
            pack_f32(-rng.random(tokens)),
            pack_i32(np.zeros(tokens, dtype=np.int32)),
            "stop",
            1.0,
            True,
            "ok",
        )
        for _ in range(n)
    ]
    return TrajectoryGroup(
        Prompt("p", pack_i32(rng.integers(0, 150_000, 512)), "42"), resp, "w0", time.time()
    )


def as_python(g: TrajectoryGroup) -> dict:
    """What a pickle-based sender typically ships: lists of Python numbers."""
    return {
        "prompt": np.frombuffer(g.prompt.token_ids, "<i4").tolist(),
        "responses": [
            {
                "ids": np.frombuffer(r.token_ids, "<i4").tolist(),
                "logprobs": np.frombuffer(r.logprobs, "<f4").tolist(),
                "versions": np.frombuffer(r.versions, "<i4").tolist(),
                "reward": r.reward,
            }
            for r in g.responses
        ],
    }


def receiver(port: int, mode: str, count: int, q) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.bind(f"tcp://127.0.0.1:{port}")
    codec = Codec()
    t0 = None
    for _ in range(count):
        frame = s.recv(copy=False)
        if t0 is None:
            t0 = time.perf_counter()
        if mode == "msgspec":
            codec.decode(frame.buffer)
        elif mode == "pickle":
            pickle.loads(frame.buffer)
    q.put(time.perf_counter() - (t0 or time.perf_counter()))
    s.close(0)
    ctx.term()


def run(mode: str, group: TrajectoryGroup, count: int) -> tuple[float, int]:
    codec = Codec()
    port = free_port()
    q = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=receiver, args=(port, mode, count, q))
    proc.start()
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 16)
    s.connect(f"tcp://127.0.0.1:{port}")
    payload = bytes(codec.encode(group))
    size = len(payload)
    py = as_python(group) if mode == "pickle" else None
    for _ in range(count):
        if mode == "msgspec":
            s.send(codec.encode(group), copy=False)
        elif mode == "pickle":
            s.send(pickle.dumps(py, protocol=pickle.HIGHEST_PROTOCOL), copy=False)
        else:
            s.send(payload, copy=False)
    seconds = q.get(timeout=600)
    proc.join()
    s.close(0)
    ctx.term()
    return seconds, size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small-count", type=int, default=5000)
    ap.add_argument("--large-count", type=int, default=200)
    a = ap.parse_args()
    out: dict = {"benchmark": "transport"}
    for name, (n, tokens, count) in {
        "small": (8, 256, a.small_count),
        "large": (16, 16_384, a.large_count),
    }.items():
        g = make_group(n, tokens)
        res = {}
        for mode in ("raw", "msgspec", "pickle"):
            seconds, size = run(mode, g, count)
            res[mode] = {
                "groups_per_s": round(count / seconds, 1),
                "MB_per_s": round(count * size / seconds / 1e6, 1),
            }
            print(f"{name:5s} {mode:8s} {res[mode]}", flush=True)
        res["msgspec_over_pickle"] = round(res["msgspec"]["groups_per_s"] / res["pickle"]["groups_per_s"], 2)
        res["msgspec_of_raw"] = round(res["msgspec"]["groups_per_s"] / res["raw"]["groups_per_s"], 3)
        res["frame_bytes"] = size
        out[name] = res
    print(json.dumps(out))


if __name__ == "__main__":
    main()
