"""The controller's parts without sockets: dispatch (pure), evaluation rounds, the worker registry; and the
launcher's node plan (pure: any node of any cluster, no store, no process)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from async_vapo.cluster import Endpoints, NodeInfo, layout
from async_vapo.config import load_config
from async_vapo.controller.dispatch import eligible, share_out
from async_vapo.controller.evaluation import EvalRounds
from async_vapo.controller.registry import WorkerRegistry, WorkerState
from async_vapo.launch.plan import RunFiles, Site, plan_node
from async_vapo.protocol import Hello, Prompt, Sampling, pack_i32
from tests.helpers import make_group


def _share_out_reference(capacity, ids, outstanding, cap):
    """One prompt at a time to the worker with the fewest prompts (outstanding + given), ties by order
    of the least loaded first; a worker at ``cap`` gets no more."""
    given = dict.fromkeys(ids, 0)
    order = sorted(ids, key=lambda w: outstanding.get(w, 0))
    base, extra = divmod(capacity, len(ids)) if ids else (0, 0)
    for i, w in enumerate(order):  # the intended even split, then the per-worker cap
        for _ in range(base + (1 if i < extra else 0)):
            if outstanding.get(w, 0) + given[w] < cap:
                given[w] += 1
    return [(w, given[w]) for w in order if given[w]]


@pytest.mark.parametrize(
    "capacity,outstanding,cap",
    [
        (0, {}, 8),
        (7, {}, 8),
        (7, {"a": 3, "b": 0, "c": 1}, 8),
        (30, {"a": 6}, 8),
        (5, {"a": 8, "b": 8, "c": 8}, 8),
    ],
)
def test_share_out_matches_the_reference_loop(capacity, outstanding, cap):
    ids = ["a", "b", "c"]
    plan = share_out(capacity, ids, outstanding, cap)
    assert plan == _share_out_reference(capacity, ids, outstanding, cap)
    assert sum(n for _, n in plan) <= capacity
    assert all(outstanding.get(w, 0) + n <= cap for w, n in plan)


def test_share_out_gives_the_remainder_to_the_least_loaded():
    assert share_out(5, ["a", "b"], {"a": 2, "b": 0}, 100) == [("b", 3), ("a", 2)]
    assert share_out(3, [], {}, 100) == []


def test_eligible_workers_follow_both_staleness_floors():
    ws = [WorkerState(f"w{v}", 1, version=v) for v in (-1, 3, 4, 5)] + [
        WorkerState("busy", 1, version=5, updating=True)
    ]
    names = lambda got: sorted(w.worker_id for w in got)  # noqa: E731
    assert names(eligible(ws, 5, None, 1)) == ["w4", "w5"]  # learner at 5, staleness 1
    assert names(eligible(ws, 5, None, 2)) == ["w3", "w4", "w5"]
    assert names(eligible(ws, 4, 5, 0)) == ["w5"]  # the newest weights sent out also bound it
    assert names(eligible(ws, 0, None, 0)) == ["w3", "w4", "w5"]  # unknown weights (-1) never


def test_evaluation_rounds_collect_their_own_groups_only():
    sampling = Sampling(4, 1.0, 1.0, 8)
    prompts = {u: Prompt(u, pack_i32([1, 2]), "3") for u in ("e0", "e1")}

    async def run():
        rounds = EvalRounds()
        loop = asyncio.get_running_loop()
        first, second = loop.create_future(), loop.create_future()
        a = rounds.open(sampling, first)
        b = rounds.open(sampling, second)
        assert a != b and a > 0 and b > 0
        sent_a = {p.uid: p for p in rounds.assign(a, list(prompts.values()), "w0")}
        (sent_b,) = rounds.assign(b, [prompts["e0"]], "w1")
        assert sent_b.ticket and sent_b.ticket != sent_a["e0"].ticket  # a fresh ticket per sending
        assert rounds.issued(b, "e0") == ("w1", sent_b, sampling) and rounds.issued(b, "e1") is None
        rounds.collect(make_group(prompt=sent_b, eval_round=b))
        assert second.done() and [g.prompt.uid for g in rounds.groups(b)] == ["e0"]
        rounds.collect(make_group(prompt=sent_a["e1"], eval_round=a))
        rounds.collect(make_group(prompt=sent_a["e1"], eval_round=a))  # a duplicate: not counted twice
        rounds.collect(make_group("x", eval_round=a))  # not a prompt of the round
        assert not first.done() and rounds.late == 2
        assert [p.uid for p in rounds.orphans(a, live={"w1"})] == ["e0"]  # its worker is gone
        assert rounds.orphans(a, live={"w0"}) == []
        rounds.give_up(a, "e0")  # failed: the round is over without it
        assert first.done() and rounds.missing(a) == 1
        assert sorted(g.prompt.uid for g in rounds.groups(a)) == ["e1"]
        rounds.close(a)
        rounds.collect(make_group(prompt=sent_a["e0"], eval_round=a))  # after the round ended
        rounds.collect(make_group("e0", eval_round=99))  # never opened
        assert rounds.late == 4

    asyncio.run(run())


def test_registry_spreads_owners_and_reports_silence():
    reg = WorkerRegistry(fanout_ranks=2)
    owners = [reg.add(Hello(f"w{i}", 0, 100 + i))[0].owner for i in range(5)]
    assert owners == [0, 1, 0, 1, 0]
    w, old = reg.add(Hello("w1", 0, 999))  # a reconnect replaces the state
    assert old is not None and old.pid == 101 and reg.get("w1") is w and not reg.is_current(old)
    for s in reg:
        s.last_seen = 0.0
    w.last_seen, w.updating = 100.0, False
    reg.get("w2").updating = True  # waited for during a weight sync
    assert sorted(s.worker_id for s in reg.silent(now=100.0, timeout_s=30.0)) == ["w0", "w3", "w4"]


def _plan(nnodes: int, node_rank: int, ranks: int = 2, workers: int = 2, *extra: str):
    base = ["rollout.n_samples=4", "rollout.max_tokens=40", "rollout.verifier_timeout_s=3"]
    cfg = load_config(None, [*base, "rollout.max_num_seqs=384", *extra])
    lay = layout(0, 0, nnodes, 8, cfg.rollout.tensor_parallel_size, ranks, workers)  # as the CLI does
    node = NodeInfo(nnodes, node_rank, "10.0.0.1", 29500, "flags")
    ep = Endpoints("tcp://10.0.0.1:5001", "tcp://10.0.0.1:5002", 5003, "10.0.0.1")
    files = RunFiles.under(__import__("pathlib").Path("/run/x"), "n1") if nnodes == 1 else None
    site = Site(
        ep, "10.0.0.1:29500", "/keys", files, bind_host="10.0.0.1", extra_env={"GLOO_SOCKET_IFNAME": "lo"}
    )
    return cfg, lay, plan_node(cfg, lay, node, "/models/m", site, resume=True)


def test_node_plan_of_a_two_node_cpu_run():
    cfg, lay, plan0 = _plan(2, 0)
    _, _, plan1 = _plan(2, 1)
    ranks = [int(c.env["RANK"]) for p in (plan0, plan1) for c, _ in p.learners]
    assert sorted(ranks) == list(range(lay.learner_world)) and lay.learner_world == 4
    first = dict((int(c.env["RANK"]), a) for c, a in plan0.learners)[0]
    assert first.store_address and first.store_key_dir == "/keys" and first.resume
    others = [a for c, a in plan0.learners + plan1.learners if c.env["RANK"] != "0"]
    assert all(not a.store_address and not a.store_key_dir for a in others)  # rank 0 alone reports drops
    assert all(a.world_store == "" for a in others)  # several nodes: no file stores
    wids = [w.worker_id for p in (plan0, plan1) for _, w in p.workers]
    assert len(set(wids)) == len(wids) == 4
    for p in (plan0, plan1):
        for child, w in p.workers:
            assert w.rollout == cfg.rollout  # the recipe's section, not a copy of its fields
            assert child.env["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, child.cores))
            assert w.engine.tensor_parallel_size == 1 and w.data_endpoint == "tcp://10.0.0.1:5001"
            assert w.engine.max_num_seqs == 384  # the recipe's engine batch reaches vLLM


def test_node_plan_of_tensor_parallel_cpu_engines():
    """``rollout.tensor_parallel_size`` on CPU: each engine runs that many vLLM workers, dealt over the
    engine's cores (here one core each: two workers share it)."""
    _, lay, plan = _plan(1, 0, 1, 2, "rollout.tensor_parallel_size=2", "rollout.frontend_cores=own")
    assert lay.tensor_parallel_size == 2 and "x TP 2" in lay.describe()
    for child, w in plan.workers:
        assert w.engine.tensor_parallel_size == 2
        (core,) = child.cores
        assert child.env["VLLM_CPU_OMP_THREADS_BIND"] == f"{core}|{core}"


def test_node_plan_of_one_machine_uses_file_stores():
    _, _, plan = _plan(1, 0, ranks=1, workers=1)
    ((child, args),) = plan.learners
    assert args.world_store == "/run/x/world-n1" and args.group_store_dir == "/run/x/groups-n1"
    assert child.env["GLOO_SOCKET_IFNAME"] == "lo" and plan.workers[0][0].env["GLOO_SOCKET_IFNAME"] == "lo"


def test_learner_cores_own_or_all():
    """CPU placement: the learner is pinned to its own cores, or with ``train.learner_cores=all`` to every
    core of the node (the engines' too)."""
    _, lay, own = _plan(1, 0, 1, 1)
    _, _, shared = _plan(1, 0, 1, 1, "train.learner_cores=all")
    share = lay.nodes[0]
    every = sorted({c for d in (*share.learner_devices, *share.engine_devices) for c in d})
    assert own.learners[0][1].cpu_affinity == tuple(share.learner_devices[0])
    assert shared.learners[0][1].cpu_affinity == tuple(every)
    # train.learner_threads 0 (the default): one thread per core the rank may use
    assert own.learners[0][1].threads == len(share.learner_devices[0])
    assert shared.learners[0][1].threads == len(every)
    _, _, two = _plan(1, 0, 2, 1, "train.learner_cores=all")  # two ranks share the cores
    assert [a.threads for _, a in two.learners] == [max(1, len(every) // 2)] * 2
    _, _, fixed = _plan(1, 0, 1, 1, "train.learner_threads=3")
    assert fixed.learners[0][1].threads == 3
    assert own.workers[0][0].cores == shared.workers[0][0].cores == tuple(share.engine_devices[0])
    if len(every) > 1:
        assert set(every) > set(share.learner_devices[0])


def test_engine_frontends_own_or_all_cores():
    """CPU placement: ``rollout.frontend_cores=all`` frees an engine's other processes (the rollout worker
    it spawns from, vLLM's scheduler, the verifiers) to every core of the node; its compute threads stay
    bound to its own cores."""
    _, lay, own = _plan(1, 0, 1, 2)
    _, _, free = _plan(1, 0, 1, 2, "rollout.frontend_cores=all")
    share = lay.nodes[0]
    every = tuple(sorted({c for d in (*share.learner_devices, *share.engine_devices) for c in d}))
    for i, devs in enumerate(share.engine_devices):
        (c_own, _), (c_free, _) = own.workers[i], free.workers[i]
        assert c_own.cores == tuple(devs) and c_free.cores == every
        assert c_own.env["VLLM_CPU_OMP_THREADS_BIND"] == c_free.env["VLLM_CPU_OMP_THREADS_BIND"]
        assert c_free.env["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, devs))
    assert len(every) > len(share.engine_devices[0])  # the test's node has more cores than one engine's


def test_run_files_are_absolute_with_a_relative_output_dir(tmp_path, monkeypatch):
    """``output_dir: runs/...`` (the embedded default's) once hung the learner: ``file://runs/...`` names a
    host ``runs``, so the learner world waited at a store nobody else used."""
    from urllib.parse import urlparse

    from async_vapo.launch.supervisor import open_site

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["output_dir=runs/rel"])
    site, store = open_site(cfg, NodeInfo(1, 0, "127.0.0.1", 0, "single"))
    assert site.files is not None
    for f in site.files.all():
        assert f.is_absolute() and str(f).startswith(str(tmp_path))
        assert urlparse(f"file://{f}").path == str(f)  # what torch.distributed's file:// rendezvous reads
    assert site.files.groups.is_dir() and store.address == f"file:{site.files.store}"


def test_fanout_owners_are_spread_over_nodes_first():
    """32 learner ranks on 4 nodes feeding 8 engines: one owner per node before a second on any node
    (rank 0 alone on node 0 fed every engine's bytes through one node's links before)."""
    reg = WorkerRegistry(fanout_ranks=32, ranks_per_node=8)
    owners = [reg.add(Hello(f"w{i}", 0, 100 + i))[0].owner for i in range(8)]
    assert owners == [0, 8, 16, 24, 1, 9, 17, 25]
    assert len({o // 8 for o in owners[:4]}) == 4


def test_gpu_children_see_the_gpus_the_launcher_was_given():
    """Slurm or a container runtime gives the launcher CUDA_VISIBLE_DEVICES=4,5,6,7: placement device k
    is the k-th of those, not GPU k of the machine."""
    ep = Endpoints("tcp://10.0.0.1:5001", "tcp://10.0.0.1:5002", 5003, "10.0.0.1")
    site = Site(ep, "10.0.0.1:29500", visible_devices="4,5,6,7")
    assert site.cuda_devices([0, 1]) == "4,5" and site.cuda_devices([3]) == "7"
    assert Site(ep, "x").cuda_devices([2, 3]) == "2,3"  # nothing given: the machine's numbering
    with pytest.raises(ValueError, match="only 4"):
        site.cuda_devices([4])


def test_rollout_workers_do_not_inherit_the_launchers_torch_distributed_world():
    from async_vapo.launch.supervisor import child_environ

    parent = {"RANK": "3", "WORLD_SIZE": "8", "MASTER_PORT": "29500", "LOCAL_RANK": "0", "PATH": "/bin"}
    worker = child_environ(parent, {"CUDA_VISIBLE_DEVICES": "4,5"}, worker=True)
    quiet = {
        "VLLM_LOGGING_LEVEL": "WARNING",
        "PYTHONWARNINGS": "ignore::FutureWarning:vllm.triton_utils.dispatcher",
    }
    assert worker == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "4,5", **quiet}
    assert child_environ(parent | {"VLLM_LOGGING_LEVEL": "DEBUG"}, {}, True)["VLLM_LOGGING_LEVEL"] == "DEBUG"
    learner = child_environ(parent, {"RANK": "1"}, worker=False)
    assert learner["RANK"] == "1" and learner["WORLD_SIZE"] == "8"


def test_gpu_engines_get_cuda_graphs_v1_runner_and_passed_through_kwargs():
    """GPU engines: CUDA graphs (enforce_eager off), the V1 runner with synchronous scheduling that the
    CPU tests exercise, and rollout.engine_kwargs passed to vLLM; CPU engines stay eager."""
    from async_vapo.rollout.engine import EngineConfig

    cfg = load_config(
        None, ["rollout.tensor_parallel_size=4", "rollout.engine_kwargs={enable_chunked_prefill: true}"]
    )
    lay = layout(8, 8, 2, 8, 4)
    ep = Endpoints("tcp://10.0.0.1:5001", "tcp://10.0.0.1:5002", 5003, "10.0.0.1")
    node = NodeInfo(2, 1, "10.0.0.1", 29500, "flags")
    plan = plan_node(cfg, lay, node, "/models/m", Site(ep, "x", visible_devices="0,1,2,3,4,5,6,7"), False)
    (child, w), *_ = plan.workers
    args = w.engine.engine_args()
    assert not args["enforce_eager"] and not args["async_scheduling"] and w.engine.model_runner == "v1"
    assert args["enable_chunked_prefill"] is True and args["logprobs_mode"] == "processed_logprobs"
    assert child.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    _, _, cpu = _plan(1, 0, 1, 1)
    assert cpu.workers[0][1].engine.engine_args()["enforce_eager"]
    with pytest.raises(ValueError, match="may not set"):
        EngineConfig("/m", extra=(("logprobs_mode", "raw_logprobs"),)).engine_args()


def test_an_adapter_publish_makes_engines_that_serve_one_adapter_of_the_policys_shape():
    """model.lora_publish=adapter: the engines get vLLM's LoRA support for one adapter of the policy's
    rank (rounded up to a rank vLLM accepts), alpha and targets; merged: no LoRA in the engine."""
    from async_vapo.rollout.engine import EngineConfig
    from async_vapo.weight_sync.adapter import LoRASpec

    lora = ["model.lora_rank=4", "model.lora_alpha=8", "model.lora_target_modules=[q_proj, v_proj]"]
    _, _, merged = _plan(1, 0, 1, 1, *lora)
    assert merged.workers[0][1].engine.lora is None
    assert "enable_lora" not in merged.workers[0][1].engine.engine_args()
    _, _, adapter = _plan(1, 0, 1, 1, *lora, "model.lora_publish=adapter")
    engine = adapter.workers[0][1].engine
    assert engine.lora == LoRASpec(4, 8.0, ("q_proj", "v_proj"))
    args = engine.engine_args()
    assert args["enable_lora"] and args["max_lora_rank"] == 8 and args["max_loras"] == 1
    cfg = engine.lora.peft_config("base")
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="may not set"):
        EngineConfig("/m", extra=(("max_lora_rank", 64),), lora=engine.lora).engine_args()


def test_restart_budget_is_per_worker_and_per_window():
    """main counted every restart of every worker over the whole run against one limit of 5: a week-long
    run with occasional crashes ran out of restarts. The budget is per worker and per window."""
    from async_vapo.launch.supervisor import RestartBudget

    b = RestartBudget(limit=3, window_s=100.0)
    assert all(b.allow(0, t) for t in (0.0, 10.0, 20.0))
    assert not b.allow(0, 30.0)  # a crash loop: given up on
    assert b.allow(1, 30.0)  # another worker has its own budget
    assert b.allow(0, 111.0)  # the first restart left the window
    assert all(b.allow(2, 1000.0 * k) for k in range(50))  # rare crashes over a long run: always restarted
    assert b.total == 3 + 1 + 1 + 50


def test_a_workers_exit_code_names_why_it_left():
    """The launcher records each restarted worker's cause (``run/node<k>.json``, ``worker_exits``)."""
    from async_vapo.rollout import exits

    assert exits.cause(exits.DROPPED) == "dropped by the controller"
    assert exits.cause(exits.ENGINE_DEAD) == "its vLLM engine died"
    assert exits.cause(exits.REJOIN_FAILED) == "could not rejoin a restarted learner"
    assert exits.cause(-9) == "killed by SIGKILL"
    assert exits.cause(-9, killed_on_drop=True) == "killed: the controller dropped it"
    assert exits.cause(-200) == "killed by signal 200"
    assert exits.cause(1) == "crashed (exit code 1)"
    assert exits.cause(exits.CONFIG) == "its engine cannot serve the config"
    codes = [exits.FINISHED, exits.DROPPED, exits.ENGINE_DEAD, exits.REJOIN_FAILED, exits.CONFIG]
    assert len(set(codes)) == 5
    # restarted: all but the run's end and a config that cannot work (it would fail the same way again)
    assert [exits.restartable(c) for c in [*codes, 1, -9]] == [False, True, True, True, False, True, True]


def test_hostile_store_values_are_counted_as_forged_never_raised(tmp_path):
    """A deeply nested JSON value raised RecursionError in the launcher, which read it as "node 0 is
    gone" (rollout-only nodes then killed their workers): values are parsed into a typed struct."""
    from async_vapo.cluster import RunStore

    store = RunStore(f"file:{tmp_path / 'store'}", is_master=True, key=b"k" * 32)
    store.store.set("drop/w0", "[" * 100_000 + "]" * 100_000)
    store.store.set("done", '{"v": 1, "mac": []}')
    assert store.dropped_pid("w0") is None and store.done() is False
    assert store.forged == {"drop": 1, "done": 1}
    store.notify_drop("w0", 1234)  # a real, signed value still works
    assert store.dropped_pid("w0") == 1234


def test_timeouts_derive_from_the_recipe():
    """Evaluation rounds and issued prompts wait as long as their work can take, never a fixed 600 s:
    the 32B recipe's first evaluation (30 x 32 samples of up to 20,480 tokens) outlasted it."""
    from async_vapo.controller.admission import prompt_timeout_s
    from async_vapo.controller.evaluation import EVAL_TIMEOUT_FLOOR_S, eval_timeout_s

    recipe = load_config(Path("configs/vapo_qwen2.5_32b.yaml"))
    # 8 engines at 2,000 tokens/s each: 30 x 32 x 20,480 tokens = 20 min of generation, x3
    assert eval_timeout_s(recipe, 30, 16_000.0) == pytest.approx(3 * 30 * 32 * 20_480 / 16_000)
    assert eval_timeout_s(recipe, 30, None) > 3600  # nothing measured yet: a slow engine is assumed
    # a worker's counters are input: a claimed near-zero rate cannot stretch the round past that assumption
    assert eval_timeout_s(recipe, 30, 1e-6) == eval_timeout_s(recipe, 30, None)
    tiny = load_config(None)
    assert eval_timeout_s(tiny, 256, 10_000.0) == EVAL_TIMEOUT_FLOOR_S
    assert eval_timeout_s(load_config(None, ["train.eval_timeout_s=42"]), 256, 1.0) == 42
    assert prompt_timeout_s(0.0, 20_480) == 4096 and prompt_timeout_s(0.0, 96) == 300
    assert prompt_timeout_s(7.0, 20_480) == 7


def test_every_counter_family_member_is_a_named_count():
    """Every reason a family is picked by names a ``Count`` (grep finds it); any other name is an error
    where it is counted, and a count is written to JSON as its plain name."""
    import json
    import typing
    from collections import Counter

    from async_vapo.controller.admission import GroupRejection
    from async_vapo.controller.counters import (
        Count,
        group_outcome,
        group_rejected,
        hello_rejected,
        verdict,
        worker_dropped,
    )
    from async_vapo.protocol.messages import VerdictKind

    for why in GroupRejection:
        assert group_rejected(why).value == f"group_rejected_{why.value}"
    for kind in (*typing.get_args(VerdictKind), "other"):
        assert verdict(kind) in Count
    for outcome in ("admitted", "duplicate", "stale", "filtered"):
        assert group_outcome(outcome) in Count
    for why in ("bad_worker_id", "identity_mismatch", "unplanned_worker", "tp_mismatch", "too_frequent"):
        assert hello_rejected(why) in Count
    for reason in ("heartbeat", "unreachable", "stalled", "weight_sync_failed"):
        assert worker_dropped(reason) in Count
    with pytest.raises(ValueError):
        worker_dropped("heartbeet")
    counters: Counter[str] = Counter()
    counters[Count.GROUP_ADMITTED] += 1
    counters["group_admitted"] += 1
    assert json.loads(json.dumps(dict(counters))) == {"group_admitted": 2}


def test_every_reason_the_controller_requeues_for_is_a_ledger_name():
    """The ledger counts ``requeued_<reason>`` / ``failed_<reason>`` for ``buffer.Requeue`` members only:
    every worker-drop reason and every refused-group reason charged to the assignee must be one."""
    from async_vapo.buffer import PromptLedger, Requeue
    from async_vapo.controller.admission import GroupRejection
    from async_vapo.controller.counters import Count
    from async_vapo.controller.service import _NOT_THE_ASSIGNEE

    drops = [c.value.removeprefix("worker_dropped_") for c in Count if c.value.startswith("worker_dropped_")]
    assert drops and all(Requeue(d) for d in drops)
    assert all(Requeue(f"bad_group_{w.value}") for w in GroupRejection if w not in _NOT_THE_ASSIGNEE)
    ledger = PromptLedger([Prompt(f"p{i}", pack_i32([1]), "1") for i in range(4)], seed=0)
    (p,) = ledger.take(1, "w0")
    assert ledger.retry(p.uid, Requeue.DEADLINE, max_attempts=1)
    assert ledger.counts["failed_deadline"] == 1 and ledger.counts["failed"] == 1
    (q,) = ledger.take(1, "w0")
    with pytest.raises(ValueError, match="made_up"):
        ledger.requeue(q.uid, "made_up")  # type: ignore[arg-type]
    assert q.uid in ledger.outstanding  # nothing moved
