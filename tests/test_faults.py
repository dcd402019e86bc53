"""Faults injected into one real run (launcher, vLLM worker, DeepSpeed learner, ZeroMQ, gloo), then a
resume, and the books checked at the end:

0. The learner is SIGKILLed at its first step, before any checkpoint: its world starts over (nothing
   trained was kept), Value-Pretraining's rows are not doubled, and every step is still numbered once.
1. 100,000 hostile frames at the learner's live data and control sockets (plus one oversized frame):
   every one is counted as rejected, memory stays bounded, training goes on. Then well-formed hostile
   traffic (``tests/chaos.py``): groups in the worker's name for prompts it was not sent or with poisoned
   contents, spoofed Hellos and acks, an object-heavy frame: each refused for its reason.
2. The rollout worker is SIGKILLed: the launcher restarts it, it gets the current weights before it
   samples, its prompts are requeued.
3. The new worker is SIGSTOPped (it stops answering): the controller drops it within the configured
   timeout, its launcher kills and restarts it. No hang.
4. Throughout, the verifier hangs, raises or returns garbage on some responses: reward 0 within the
   timeout, counted, the run unaffected.
5. The learner is SIGKILLed: the launcher restarts the learner world from the last checkpoint
   (``train.learner_restarts``), the rollout worker is told to rejoin and does so with its engine (same
   process, no restart, synced to the checkpoint's weights before it samples again), and the run finishes
   on its own with the same step numbering; the prompt ledger shows every prompt of the data order up to
   the cursor trained exactly once or still pending: none lost, none skipped, none trained twice. Nothing
   is left behind. (A resume by hand, ``--resume``, is ``tests/test_e2e.py``'s.)
6. The final checkpoint is made slower (15 s, ``ASYNC_VAPO_FAULT_SLOW_SAVE``) than the worker and
   weight-sync timeouts (8 s, 12 s): the controller keeps serving while it is written, so no worker is
   dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import msgspec
import pytest
import zmq

from tests.chaos import HOSTILE_GROUPS, Injector
from tests.fuzz import hostile_frames
from tests.test_e2e import SMALL, _run_processes, rows

pytestmark = pytest.mark.slow

STEPS = 12
GROUPS = 8  # train.groups_per_step in SMALL
FUZZ_FRAMES = 100_000
RUN = [
    *SMALL,
    "train.eval_every=0",
    "train.worker_timeout_s=8",
    "train.weight_sync_timeout_s=12",
    # 5. verifiers that hang, raise or return garbage on about 1 response in 11
    "data.verifier=tests.verifier_fixtures:chaos",
    "rollout.verifier_timeout_s=2",
    "rollout.verifier_processes=2",
]


def _launch(out: Path, log: Path, *extra: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, DS_ACCELERATOR="cpu", VLLM_CPU_KVCACHE_SPACE="1", ASYNC_VAPO_LOG_JSON="1")
    env |= env_extra or {}
    cmd = [sys.executable, "-m", "async_vapo.launch", "--output-dir", str(out), *RUN, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)


def _wait(cond, proc: subprocess.Popen, log: Path, what: str, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        assert proc.poll() is None, f"launcher exited while waiting for {what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def _train_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [r for r in rows(out) if r["phase"] == "train"] if path.exists() else []


def _state(out: Path) -> dict:
    try:
        return json.loads((out / "run" / "node0.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def _fuzz(endpoints: dict) -> Counter:
    ctx = zmq.Context()
    data = ctx.socket(zmq.PUSH)
    control = ctx.socket(zmq.DEALER)
    control.setsockopt(zmq.IDENTITY, b"fuzzer")
    for s, e in ((data, endpoints["data"]), (control, endpoints["control"])):
        s.setsockopt(zmq.LINGER, 5000)
        s.connect(e)
    kinds: Counter = Counter()
    for i, (kind, frame) in enumerate(hostile_frames(FUZZ_FRAMES, seed=7)):
        (data if i % 2 == 0 else control).send(frame)
        kinds[kind] += 1
    big = ctx.socket(zmq.PUSH)  # oversized: refused by ZeroMQ (MAXMSGSIZE) before it is buffered
    big.setsockopt(zmq.LINGER, 5000)
    big.connect(endpoints["data"])
    big.send(b"AV" + bytes(257 * 2**20))
    for s in (data, control, big):
        s.close()  # linger: wait until everything is handed to the kernel
    ctx.term()
    return kinds


def _rejections(row: dict) -> int:
    """Everything the learner side refused: undecodable frames, and decodable ones that name a prompt
    nobody issued or an evaluation round nobody opened, come from an unknown worker or arrive on the wrong
    road."""
    c = row["controller_counters"]
    return (
        sum(row["rejected_frames_by_reason"].values())
        + c.get("group_duplicate", 0)
        + c.get("eval_group_unexpected", 0)
        + c.get("message_from_unknown_worker", 0)
        + c.get("unexpected_on_data", 0)
    )


def _seconds(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def test_faults_during_a_run_then_the_learner_restarts(tiny_model_dir, tmp_path):
    out, log = tmp_path / "faults", tmp_path / "launcher.log"
    slow = {"ASYNC_VAPO_FAULT_SLOW_SAVE": f"{STEPS}:15"}
    proc = _launch(out, log, f"train.total_steps={STEPS}", "train.checkpoint_every=4", env_extra=slow)
    try:
        _wait(lambda: _train_rows(out), proc, log, "the first training step")

        # 0. SIGKILL the learner before its first checkpoint: the world starts over
        assert not (out / "checkpoints").exists()
        early_pid, wall_early = _state(out)["learners"]["0"], time.time()
        os.kill(early_pid, signal.SIGKILL)
        _wait(
            lambda: any(r["time"] > wall_early for r in _train_rows(out)),
            proc,
            log,
            "a step of the world that started over",
        )
        state = _state(out)
        learner_pid = state["learners"]["0"]
        assert learner_pid != early_pid
        wall_faults = time.time()
        # the worker's engine may hold version 1 while the world starts over at version 0: the new learner
        # publishes its version-0 weights as it starts and the worker is synced to them (a worker caught
        # in a weight load when the learner died is restarted instead, counted like any worker restart)
        restarts0 = state.get("worker_restarts", 0)

        # 1. hostile frames at the live sockets
        before_rows = _train_rows(out)
        rss0 = _rss_mb(learner_pid)
        kinds = _fuzz(state["endpoints"])
        assert sum(kinds.values()) == FUZZ_FRAMES
        base = _rejections(before_rows[-1])
        counted = _wait(
            lambda: (r := _train_rows(out)) and _rejections(r[-1]) - base >= FUZZ_FRAMES and r[-1],
            proc,
            log,
            "the fuzzed frames to be counted",
        )
        assert _rejections(counted) - base == FUZZ_FRAMES  # each one, exactly once
        rss1 = _rss_mb(learner_pid)
        assert rss1 - rss0 < 300, (rss0, rss1)  # bounded: nothing hostile is kept
        assert counted["step"] > before_rows[-1]["step"]  # training went on

        # 1b. well-formed hostile traffic in a real worker's name (tests/chaos.py): groups for predictable
        # uids without tickets, with ids beyond the vocabulary, a reward of 1e30 or 64 responses; a spoofed
        # Hello / 64-way Hello / WeightAck; a frame of two million empty responses. None gets in.
        inject = Injector(out, random.Random(0))
        c0 = counted["controller_counters"]
        for kind in ("hostile_groups", "spoofed_control", "heavy_frame"):
            assert inject(kind), kind
        inject.close()

        def refused(row):
            c = row["controller_counters"]
            # a group for a prompt not outstanding is the buffer's duplicate; one for an outstanding
            # prompt is refused by admission (it lacks the prompt's ticket)
            groups = sum(
                v - c0.get(k, 0)
                for k, v in c.items()
                if k.startswith("group_rejected_") or k == "group_duplicate"
            )
            hellos = {
                k: v - c0.get(k, 0)
                for k, v in c.items()
                if k.startswith("hello_rejected_") and v > c0.get(k, 0)
            }
            return groups, hellos

        hostile = _wait(
            lambda: (r := _train_rows(out)) and refused(r[-1])[0] >= HOSTILE_GROUPS and refused(r[-1]),
            proc,
            log,
            "the hostile groups to be refused",
        )
        # (honest groups can be duplicates too, hence >=; the heavy frame is dropped by ZeroMQ, never read)
        assert hostile[0] >= HOSTILE_GROUPS, hostile
        # a Hello in the worker's name from another socket; one from an unplanned id (with 64-way TP)
        assert hostile[1] == {"hello_rejected_identity_mismatch": 1, "hello_rejected_unplanned_worker": 1}
        assert set(_train_rows(out)[-1]["worker_versions"]) == {"rollout-0"}  # no rogue registered

        # 2. SIGKILL the rollout worker
        old_pid = state["workers"]["rollout-0"]
        t_kill = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        st = _wait(
            lambda: (s := _state(out)).get("worker_restarts") == restarts0 + 1 and s, proc, log, "restart"
        )
        assert st["worker_exits"][-1] | {"at": 0} == {
            "worker": "rollout-0",
            "pid": old_pid,
            "exitcode": -signal.SIGKILL,
            "cause": "killed by SIGKILL",
            "at": 0,
        }
        step_at_kill = _train_rows(out)[-1]["step"]
        _wait(lambda: _train_rows(out)[-1]["step"] > step_at_kill + 1, proc, log, "training after restart")
        restart_s = time.monotonic() - t_kill

        # 3. SIGSTOP the new worker: it stops answering; dropped within the timeout, killed, restarted
        stopped = st["workers"]["rollout-0"]
        t_stop = time.monotonic()
        os.kill(stopped, signal.SIGSTOP)
        _wait(
            lambda: _state(out).get("worker_restarts") == restarts0 + 2,
            proc,
            log,
            "the wedged worker's restart",
            120,
        )
        drop_s = time.monotonic() - t_stop
        # it could not hear the controller's "dropped": its launcher killed it on the signed drop notice
        assert _state(out)["worker_exits"][-1]["cause"] == "killed: the controller dropped it"
        assert drop_s < 8 + 12 + 10  # worker_timeout_s or weight_sync_timeout_s, plus polling slack
        step_at_stop = _train_rows(out)[-1]["step"]

        # 4. SIGKILL the learner once a checkpoint at step >= 4 exists and training has moved on
        def checkpointed():
            latest = out / "checkpoints" / "latest"
            return latest.exists() and int(latest.read_text().split("_")[1]) >= 4

        _wait(checkpointed, proc, log, "a checkpoint at step >= 4")
        _wait(lambda: _train_rows(out)[-1]["step"] > step_at_stop, proc, log, "training after the drop")
        killed_at = int((out / "checkpoints" / "latest").read_text().split("_")[1])
        verdicts_before_kill = Counter(_train_rows(out)[-1]["controller_counters"])
        # the ledger's counts as that world last reported them: the restarted world resumes the
        # checkpoint's ledger, whose counts stop at the checkpoint (the worker faults may come after it)
        ledger_before_kill = Counter(_train_rows(out)[-1]["ledger"])
        worker_before = _state(out)["workers"]["rollout-0"]
        t0, wall0 = time.monotonic(), time.time()
        os.kill(learner_pid, signal.SIGKILL)
        _wait(lambda: any(r["time"] > wall0 for r in _train_rows(out)), proc, log, "a step after the restart")
        resume_s = time.monotonic() - t0
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(2)
    assert _run_processes(str(out)) == []

    events = _events(log)
    ready = [e for e in events if e.get("event") == "worker ready" and _seconds(e) > wall_faults]
    assert len(ready) >= 3 and all(e["version"] >= 1 for e in ready)  # restarted ones synced before sampling
    assert any(e.get("event") == "the controller dropped this worker; killing it" for e in events)
    restarted = [e for e in events if "restarting the learner world" in str(e.get("event"))]
    assert [e["restart"] for e in restarted] == [1, 2], restarted
    assert "from the start" in restarted[0]["event"] and restarted[0]["checkpoint"] is None
    assert restarted[1]["checkpoint"] == f"step_{killed_at}"
    # the worker rejoined the restarted learner world with its engine: same process, no restart; unless
    # the kill landed in a weight load (the learner publishes right before it writes the row the kill
    # waits for): the engine's weights are then unknown, the load fails and the worker exits to be
    # restarted from the model (rollout/worker.py). Either way it is synced to the checkpoint's weights
    # before it samples.
    final = _state(out)
    rejoined = [e for e in events if e.get("event") == "rejoining a restarted learner; engine kept"]
    assert rejoined  # (phase 0's world, phase 5's, or both)
    kept = final["workers"]["rollout-0"] == worker_before
    if kept:
        assert final["worker_restarts"] == restarts0 + 2, final
        assert _seconds(rejoined[-1]) > wall0
    else:
        failed = [e for e in events if e.get("event") == "weight load failed" and _seconds(e) > wall0]
        assert failed and final["worker_restarts"] == restarts0 + 3, (final, failed)
    pid = final["workers"]["rollout-0"]
    after = [e for e in ready if e.get("pid") == pid and _seconds(e) > wall0]
    assert after and after[0]["version"] == killed_at  # synced to the checkpoint before sampling
    # 6. the slowed final checkpoint was saved, and no worker was dropped while it was written
    (slowed,) = [e for e in events if e.get("event") == "fault injection: this checkpoint is made slow"]
    later = [e for e in events if e.get("timestamp", "") > slowed["timestamp"]]
    assert any(e.get("event") == "checkpoint saved" for e in later)
    assert not [e for e in later if "drop" in str(e.get("event"))], (
        later
    )  # "dropping it", "dropped this worker"

    r = rows(out)
    train = [x for x in r if x["phase"] == "train"]
    assert [x["step"] for x in train] == list(range(STEPS))  # same numbering, no step twice
    # no world had to restart a worker for want of weights to sync it to (the version-0 snapshot)
    assert not any("hello_restarted_weights_unavailable" in x["controller_counters"] for x in train)
    assert sum(x["phase"] == "value_pretrain" for x in r) == 1  # SMALL: one step, done again, written once
    assert train[killed_at]["policy_version"] == killed_at + 1

    state = msgspec.msgpack.decode(
        (out / "checkpoints" / f"step_{STEPS}" / "learner_state.msgpack").read_bytes()
    )
    ledger = state["ledger"]
    trained = ledger["trained_uids"]
    pending = {p[0] for p in ledger["pending"]}
    filtered = set(ledger["filtered_uids"])  # dynamic sampling (the embedded default): spent, not lost
    assert len(trained) == len(set(trained)) == (1 + STEPS) * GROUPS  # value pretraining + training
    assert not set(trained) & pending and not set(trained) & filtered and not filtered & pending
    # the data order an uninterrupted run of this seed draws (PromptLedger: seeded per-epoch shuffle)
    from async_vapo.tasks.arithmetic import AdditionTask

    uids = [p.uid for p in AdditionTask().problems(100_000, 0, "train-")]
    order = list(range(len(uids)))
    random.Random(0 * 1_000_003 + 0).shuffle(order)
    drawn = {f"{uids[order[i]]}@0" for i in range(ledger["cursor"])}
    assert set(trained) | filtered | pending == drawn  # none lost, none skipped
    verdicts = verdicts_before_kill + Counter(train[-1]["controller_counters"])
    for kind in ("verdict_timeout", "verdict_error", "verdict_bad_output", "verdict_ok"):
        assert verdicts[kind] > 0, dict(verdicts)
    counts = ledger_before_kill | Counter(ledger["counts"])  # the larger of each (the same books)
    requeued = {k: v for k, v in counts.items() if k.startswith("requeued_")}
    assert sum(requeued.values()) > 0, ledger["counts"]
    print(
        f"\nfuzz: {FUZZ_FRAMES} frames {dict(kinds)} all rejected; learner RSS {rss0:.0f} -> {rss1:.0f} MB;"
        f" worker restart to next trained step {restart_s:.1f} s; wedged worker replaced in {drop_s:.1f} s;"
        f" learner killed to first step of the restarted world {resume_s:.1f} s; requeued {requeued};"
        f" verdicts { ({k: v for k, v in verdicts.items() if k.startswith('verdict_')}) }"
    )
