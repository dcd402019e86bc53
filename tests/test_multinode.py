"""Two "nodes" on one machine: two launchers (separate process trees, node ranks 0 and 1, one rendezvous
store on loopback), each with one learner rank and one rollout worker on CPU. The learner ranks form one
DeepSpeed (gloo) world; both vLLM engines get prompts and new weights from learner rank 0. While it runs,
forged drop notices and a forged "done" are written into the run's store (a TCPStore: anyone who reaches
node 0 can): the launchers ignore and log them."""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import pytest

from async_vapo.cluster.ports import free_port
from tests.test_e2e import launcher_command, launcher_env, rows

pytestmark = pytest.mark.slow


def forge_notices(state_file, port: int, timeout_s: float = 300) -> bool:
    """As anyone who can reach node 0 could: write ``drop/rollout-1`` (with the live worker's pid, unsigned
    and with a made-up signature) and ``done`` into the run's store. Returns whether it got to."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    deadline = time.monotonic() + timeout_s
    while not state_file.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    pid = json.loads(state_file.read_text())["workers"]["rollout-1"]
    store = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=30), wait_for_workers=False)
    store.set("drop/rollout-1", str(pid))
    store.get("drop/rollout-1")  # orders the SET (not acknowledged) before the next one
    time.sleep(3)  # node 1's launcher polls every second
    store.set("drop/rollout-1", json.dumps({"v": str(pid), "mac": "0" * 64}))
    store.set("done", json.dumps({"v": "1", "mac": "0" * 64}))
    time.sleep(3)
    return True


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def _diagnosis(out: Path, exits: list[dict], dropped: list[dict]) -> str:
    """Why node 1's worker left, as its launcher and the controller tell it, and its own last words."""
    worker_log = (out / "logs" / "rollout-1.log").read_text().splitlines()
    return json.dumps({"exits": exits, "drops": dropped, "rollout-1.log": worker_log[-20:]}, indent=1)


def test_two_nodes_train_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "two_nodes"
    port = free_port()
    env = launcher_env()
    common = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    cmd = launcher_command(out, "train.total_steps=2")
    err_files = [tmp_path / f"node{rank}.err" for rank in (1, 0)]  # files: a full pipe would block a node
    nodes = [
        subprocess.Popen(
            [*cmd, *common, "--node-rank", str(rank)],
            stdout=subprocess.DEVNULL,
            stderr=open(f, "w"),  # noqa: SIM115 (closed with the process)
            text=True,
            env=env,
        )
        for rank, f in zip((1, 0), err_files, strict=True)  # node 1 first: it must wait for node 0's store
    ]
    forged = forge_notices(out / "run" / "node1.json", port)
    for p in nodes:
        p.wait(timeout=600)
    errs = [f.read_text() for f in err_files]
    assert [p.returncode for p in nodes] == [0, 0], "\n\n".join(e[-3000:] for e in errs)
    # the forged drop notices for node 1's live worker were logged and killed nothing: its launcher kills
    # a worker on a drop notice only when the controller really dropped it (and said so in its log)
    assert forged
    assert "ignored a forged value in the run store" in errs[0]
    exits = json.loads((out / "run" / "node1.json").read_text())["worker_exits"]
    dropped = [e for e in _events(out / "logs" / "learner-0.log") if e.get("event") == "worker dropped"]
    killed = [e for e in exits if e["cause"] == "killed: the controller dropped it"]
    assert not killed or any(d["worker"] == "rollout-1" for d in dropped), _diagnosis(out, exits, dropped)
    if exits:  # an exit of its own (an engine that died, a real drop): not the forgery's, but worth seeing
        warnings.warn(
            f"node 1's rollout worker was restarted: {_diagnosis(out, exits, dropped)}", stacklevel=1
        )
    assert (out / ".curve" / "store.key").stat().st_mode & 0o077 == 0  # the signing key is private

    train = [r for r in rows(out) if r["phase"] == "train"]
    assert [r["step"] for r in train] == [0, 1]
    assert train[-1]["policy_version"] == 2
    # both engines (one per node) delivered groups (dynamic sampling may filter every group of the slower
    # one in two steps, so "delivered", not "admitted") and were live at the end
    assert set(train[-1]["groups_by_worker"]) == {"rollout-0", "rollout-1"}
    assert train[-1]["worker_versions"].keys() == {"rollout-0", "rollout-1"}
    states = [json.loads((out / "run" / f"node{n}.json").read_text()) for n in (0, 1)]
    assert states[0]["learners"].keys() == {"0"} and states[1]["learners"].keys() == {"1"}
    assert states[0]["workers"].keys() == {"rollout-0"} and states[1]["workers"].keys() == {"rollout-1"}
    assert states[0]["endpoints"] == states[1]["endpoints"]  # advertised through the store
    assert (out / "checkpoints" / "latest").read_text() == "step_2"
