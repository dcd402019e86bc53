"""A worker's message is input, not truth: groups are checked against what was issued, control messages
against the socket they came on. Pure checks first, then a real controller (ZeroMQ on loopback, a gloo
weight group) with an honest worker and hostile peers."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from unittest import mock

import msgspec
import pytest
import zmq

from async_vapo.buffer import PromptLedger
from async_vapo.cluster.ports import free_port
from async_vapo.config import TrainConfig
from async_vapo.controller import Controller, Wiring
from async_vapo.controller.admission import GroupRejection, check_group, check_hello
from async_vapo.protocol import (
    Assign,
    Control,
    Hello,
    JoinGroup,
    Prompt,
    Response,
    RolloutFailed,
    WeightAck,
    WorkerStats,
    pack_f32,
    pack_i32,
)
from async_vapo.protocol.codec import Codec
from async_vapo.weight_sync.group import GroupSpec, join_group
from tests.helpers import make_group, rules

SENT = Prompt("train-7@0", pack_i32([5, 6, 7]), "42", "addition", 0, "t1cket")


def _check(group, **over):
    kw = dict(
        sent_to="w0", sent=SENT, n_samples=4, max_tokens=64, oldest_version=2, newest_version=5, rules=rules()
    )
    return check_group(group, **(kw | over))


def _response(ids, versions=None, reward=1.0, correct=True):
    return Response(
        pack_i32(ids),
        pack_f32([-0.5] * len(ids)),
        pack_i32(versions if versions is not None else [3] * len(ids)),
        "stop",
        reward,
        correct,
        "ok",
    )


def _with(group, **fields):
    return msgspec.structs.replace(group, **fields)


def test_an_honest_group_is_admitted():
    assert _check(make_group(prompt=SENT, version=3)) is None


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda g: _with(g, worker_id="w1"), GroupRejection.WRONG_WORKER),
        (lambda g: _with(g, prompt=_with(SENT, ticket="guessed")), GroupRejection.PROMPT_MISMATCH),
        (lambda g: _with(g, prompt=_with(SENT, ticket="")), GroupRejection.PROMPT_MISMATCH),
        (lambda g: _with(g, prompt=_with(SENT, token_ids=pack_i32([9]))), GroupRejection.PROMPT_MISMATCH),
        (lambda g: _with(g, prompt=_with(SENT, answer="41")), GroupRejection.PROMPT_MISMATCH),
        (lambda g: _with(g, responses=g.responses[:3]), GroupRejection.SAMPLE_COUNT),
        (lambda g: _with(g, responses=g.responses * 2), GroupRejection.SAMPLE_COUNT),
        (lambda g: _with(g, responses=[*g.responses[:3], _response([])]), GroupRejection.LENGTH),
        (lambda g: _with(g, responses=[*g.responses[:3], _response([1] * 65)]), GroupRejection.LENGTH),
        (lambda g: _with(g, responses=[*g.responses[:3], _response([100_000])]), GroupRejection.TOKEN_RANGE),
        (lambda g: _with(g, responses=[*g.responses[:3], _response([1000])]), GroupRejection.TOKEN_RANGE),
        (lambda g: _with(g, responses=[*g.responses[:3], _response([-1])]), GroupRejection.TOKEN_RANGE),
        (lambda g: _with(g, responses=[*g.responses[:3], _response([1], [10**9])]), GroupRejection.VERSIONS),
        (lambda g: _with(g, responses=[*g.responses[:3], _response([1], [1])]), GroupRejection.VERSIONS),
        (
            lambda g: _with(g, responses=[*g.responses[:3], _response([1], reward=1e30)]),
            GroupRejection.REWARD,
        ),
        (lambda g: _with(g, responses=[*g.responses[:3], _response([1], reward=0.5)]), GroupRejection.REWARD),
        (
            lambda g: _with(g, responses=[*g.responses[:3], _response([1], correct=False)]),
            GroupRejection.REWARD,
        ),
    ],
)
def test_each_hostile_or_broken_group_is_refused_for_its_reason(mutate, reason):
    assert _check(mutate(make_group(prompt=SENT, version=3))) is reason


def test_prompt_and_response_must_fit_the_engine_context():
    long = make_group(prompt=SENT, version=3, tokens=60)
    assert _check(long) is None
    assert _check(long, rules=rules(max_model_len=62)) is GroupRejection.MODEL_LEN


def test_hello_must_come_from_its_own_socket_with_the_planned_tp():
    r = rules(tensor_parallel_size=2)
    assert check_hello(Hello("w0-1", 0, 1, 2), "w0-1", r) is None
    assert check_hello(Hello("w0-1", 0, 1, 2), "w0-2", r) == "identity_mismatch"
    assert check_hello(Hello("w0-1", 0, 1, 4), "w0-1", r) == "tp_mismatch"
    assert check_hello(Hello("../../etc/x", 0, 1, 2), "../../etc/x", r) == "bad_worker_id"
    # with the launcher's plan (3 engines): only its workers' names join
    planned = dataclasses.replace(r, engines=3)
    assert check_hello(Hello("rollout-2", 0, 1, 2), "rollout-2", planned) is None
    for rogue in ("rollout-3", "rollout-01", "w0-1", "rollout--1"):
        assert check_hello(Hello(rogue, 0, 1, 2), rogue, planned) == "unplanned_worker"


# ---- a real controller ---------------------------------------------------------------------------------


class Peer:
    """A rollout worker's two sockets (control DEALER with ``identity``, data PUSH), speaking the real
    protocol; ``handshake`` says Hello and joins the weight group like a worker."""

    def __init__(self, wiring: Wiring, identity: str) -> None:
        self.codec, self.ctx = Codec(), zmq.Context()
        self.ctl = self.ctx.socket(zmq.DEALER)
        self.ctl.setsockopt(zmq.IDENTITY, identity.encode())
        self.ctl.setsockopt(zmq.RCVTIMEO, 200)
        self.ctl.connect(wiring.control_endpoint)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.connect(wiring.data_endpoint)
        self.assigned: list[Prompt] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def send(self, msg) -> None:
        self.ctl.send(self.codec.encode(msg))

    def push_group(self, group) -> None:
        self.push.send(bytes(self.codec.encode(group)))

    def handshake(self, hello: Hello) -> None:
        self.send(hello)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.codec.decode(self.ctl.recv())
            except zmq.Again:
                continue
            if isinstance(msg, JoinGroup):
                join_group(GroupSpec(msg.host, msg.port, msg.world_size, msg.backend, msg.timeout_s), 1)
            elif isinstance(msg, Assign):
                self.assigned.extend(msg.prompts)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.ctl.close(0)
        self.push.close(0)
        self.ctx.term()


def _wait(cond, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def served():
    """A started controller over 8 prompts (2 groups per step, staleness 1: 4 credits)."""
    ledger = PromptLedger([Prompt(f"p{i}", pack_i32([1, 2, 3]), "5") for i in range(8)], seed=0)
    wiring = Wiring(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
    train = TrainConfig(groups_per_step=2, max_staleness=1, worker_timeout_s=60.0)
    controller = Controller(train, wiring, ledger, rules=rules(), max_attempts=2, hello_interval_s=0.0)
    controller.start()
    peers: list[Peer] = []

    def peer(identity: str) -> Peer:
        peers.append(Peer(wiring, identity))
        return peers[-1]

    yield controller, ledger, peer
    for p in peers:
        p.close()
    controller.stop()


def _credits_match(controller: Controller, ledger: PromptLedger) -> bool:
    """Every credit in use is a prompt outstanding: nothing leaked, nothing double-counted."""
    with controller.lock:
        return controller.staleness.running == len(ledger.outstanding)


def test_rogue_peers_cannot_answer_or_poison_another_workers_prompts(served):
    controller, ledger, peer = served
    honest = peer("w0")
    honest.handshake(Hello("w0", 0, os.getpid()))
    _wait(lambda: len(honest.assigned) == 4)
    target = honest.assigned[0]
    rogue = peer("rogue")
    # the measured attack on main: a group for a predictable uid with a token id beyond the vocabulary
    forged = make_group(target.uid, worker="w0", tokens=4, version=0)
    poisoned = forged.responses[0].__class__(
        pack_i32([100_000] * 4), pack_f32([-0.5] * 4), pack_i32([0] * 4), "stop", 1.0, True, "ok"
    )
    rogue.push_group(msgspec.structs.replace(forged, responses=[poisoned] * 4))
    rogue.push_group(forged)  # a well-formed group without the ticket
    rogue.push_group(make_group(prompt=target, worker="rogue"))  # the real prompt, another worker's id
    _wait(lambda: sum(v for k, v in controller.metrics().counters.items() if "rejected" in k) == 3)
    c = controller.metrics().counters
    assert c["group_rejected_prompt_mismatch"] == 2 and c["group_rejected_wrong_worker"] == 1
    assert target.uid in ledger.outstanding  # still the honest worker's to answer
    honest.push_group(make_group(prompt=target, worker="w0"))
    batch = controller.take_batch(1, timeout_s=20)
    assert batch is not None and batch[0].prompt == target
    assert controller.metrics().counters["group_admitted"] == 1
    # the assignee's own broken output (a token beyond the vocabulary) is refused and its prompt retried
    bad = honest.assigned[1]
    honest.push_group(msgspec.structs.replace(make_group(prompt=bad), responses=[poisoned] * 4))
    _wait(lambda: controller.metrics().counters.get("group_rejected_token_range") == 1)
    assert ledger.counts["requeued_bad_group_token_range"] == 1
    _wait(lambda: _credits_match(controller, ledger))


def test_spoofed_control_messages_are_refused_and_a_reconnect_returns_credits(served):
    controller, ledger, peer = served
    honest = peer("w0")
    honest.handshake(Hello("w0", 0, os.getpid()))
    _wait(lambda: len(honest.assigned) == 4)
    spoof = peer("mallory")
    spoof.send(Hello("w0", 0, 1))  # another worker's id
    spoof.send(Hello("mallory", 0, 1, tensor_parallel_size=64))  # a group that would never form
    spoof.send(WeightAck("w0", 99, 0.0))  # not registered: unknown
    _wait(lambda: controller.metrics().counters.get("hello_rejected_tp_mismatch") == 1)
    _wait(lambda: controller.metrics().counters.get("message_from_unknown_worker") == 1)
    assert controller.metrics().counters["hello_rejected_identity_mismatch"] == 1
    assert set(controller.metrics().worker_versions) == {"w0"}
    # a worker speaks only for itself: w0's socket cannot fail a prompt in someone else's name
    honest.send(RolloutFailed("w1", honest.assigned[0].uid, honest.assigned[0].ticket))
    _wait(lambda: controller.metrics().counters.get("control_identity_mismatch") == 1)
    # a forged failure (wrong ticket) changes nothing
    honest.send(RolloutFailed("w0", honest.assigned[0].uid, "not-the-ticket"))
    _wait(lambda: controller.metrics().counters.get("rollout_failed_unknown") == 1)
    assert honest.assigned[0].uid in ledger.outstanding
    # a real failure is retried once (max_attempts=2), then counted failed and spent
    first = honest.assigned[0]
    honest.send(RolloutFailed("w0", first.uid, first.ticket, error="EngineDeadError()"))
    _wait(lambda: ledger.counts["requeued_rollout_failed"] == 1)
    _wait(lambda: _credits_match(controller, ledger))
    # a re-Hello for a live worker is a reconnect: its prompts are requeued and their credits returned
    honest.send(Hello("w0", 0, os.getpid()))
    _wait(lambda: ledger.counts["requeued_worker_restarted"] >= 1)
    _wait(lambda: _credits_match(controller, ledger))

    # handed out again (to w0, the only worker), then failed for the second time
    def resent() -> bool:
        issued = ledger.outstanding.get(first.uid)
        return issued is not None and any(p.ticket == issued.prompt.ticket for p in honest.assigned)

    _wait(resent)
    retried = ledger.outstanding[first.uid].prompt
    honest.send(RolloutFailed("w0", first.uid, retried.ticket, error="again"))
    _wait(lambda: ledger.counts["failed"] == 1)
    assert first.uid in ledger.failed_uids and first.uid not in ledger.outstanding
    _wait(lambda: _credits_match(controller, ledger))


def test_object_heavy_frames_cost_milliseconds_and_honest_groups_fit_the_road():
    """A frame of millions of empty responses used to decode for seconds (12 M objects in a 256 MiB
    frame: about 90 s of the controller's loop) before any check: the array's length is refused first."""
    from async_vapo.protocol import ProtocolError
    from async_vapo.protocol.messages import MAX_RESPONSES

    empty = Response(b"", b"", b"", "stop", 0.0, False, "")
    heavy = Codec().encode(msgspec.structs.replace(make_group(prompt=SENT), responses=[empty] * 2_000_000))
    t0 = time.perf_counter()
    with pytest.raises(ProtocolError, match="length <= 1024"):
        Codec().decode(heavy)
    assert time.perf_counter() - t0 < 0.5
    # the data road's frame limit comes from the config: the largest honest group fits under it
    r = rules(n_samples=16, eval_samples=32, max_tokens=2048, max_model_len=4096)
    full = [_response([7] * 2048, [3] * 2048) for _ in range(32)]
    biggest = msgspec.structs.replace(
        make_group(prompt=_with(SENT, token_ids=pack_i32([1] * 2048))), responses=full
    )
    assert len(Codec().encode(biggest)) <= r.max_frame_bytes < 32 * 2**20
    assert MAX_RESPONSES >= 1024


def test_prompts_past_their_deadline_are_retried_and_a_stalled_worker_is_dropped():
    """A worker whose heartbeat runs but whose engine makes no progress (the hang measured on main: a
    dead engine core under a live worker left the run waiting for over four minutes): its prompts come
    back after ``train.prompt_timeout_s`` and, having sent nothing since, it is dropped (and restarted)."""
    ledger = PromptLedger([Prompt(f"p{i}", pack_i32([1, 2, 3]), "5") for i in range(8)], seed=0)
    wiring = Wiring(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
    train = TrainConfig(groups_per_step=2, max_staleness=1, worker_timeout_s=60.0, prompt_timeout_s=1.0)
    controller = Controller(train, wiring, ledger, rules=rules())
    controller.start()
    wedged = Peer(wiring, "w0")
    try:
        wedged.handshake(Hello("w0", 0, os.getpid()))
        _wait(lambda: len(wedged.assigned) == 4)
        t0 = time.monotonic()
        _wait(lambda: controller.metrics().counters.get("worker_dropped_stalled") == 1)
        assert time.monotonic() - t0 < 5
        c = controller.metrics().counters
        assert c["prompt_deadline_expired"] == 4 and ledger.counts["requeued_deadline"] == 4
        assert not ledger.outstanding and len(ledger.requeued) == 4  # nothing lost, all to be retried
        _wait(lambda: _credits_match(controller, ledger))
    finally:
        wedged.close()
        controller.stop()


def _next_control(p: Peer, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            msg = p.codec.decode(p.ctl.recv())
        except zmq.Again:
            continue
        if isinstance(msg, Control):
            return msg
    raise AssertionError("no Control message")


def test_a_new_controller_asks_live_workers_to_rejoin_and_restarts_what_it_cannot_sync(served):
    """After a learner restart the new controller hears workers it never welcomed: it asks them to rejoin
    (they keep their engines and say Hello again). An engine holding other weights than the model's
    (version 3) cannot be synced by a learner at version 0 with no snapshot: that one is restarted."""
    controller, _, peer = served
    kept = peer("w1")
    kept.send(WorkerStats("w1", 0.0, 1.0, 0, 0, 0))  # a heartbeat to a controller that never met it
    assert _next_control(kept) == Control("rejoin", "learner", mock.ANY)
    ahead = peer("w2")
    ahead.send(Hello("w2", 3, os.getpid()))
    assert _next_control(ahead).reason == "dropped"
    assert controller.metrics().counters["hello_restarted_weights_unavailable"] == 1
    kept.handshake(Hello("w1", 0, os.getpid()))  # the model's weights: welcomed and fed
    _wait(lambda: len(kept.assigned) == 4)
    assert set(controller.metrics().worker_versions) == {"w1"}
