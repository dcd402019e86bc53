"""Staleness-aware buffer and admission control, driven by a fake version source."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from async_vapo.buffer import GroupBuffer, PromptLedger, SamplingStarved, StalenessManager
from async_vapo.protocol import Prompt, pack_i32
from tests.helpers import make_group


@dataclass
class FakeVersions:
    v: int = 0

    def current_version(self) -> int:
        return self.v


def rows(n):
    return [Prompt(f"r{i}", pack_i32([i]), str(i)) for i in range(n)]


def setup(max_staleness=1, groups_per_step=2, filter_uniform=False, n_rows=20):
    versions = FakeVersions()
    ledger = PromptLedger(rows(n_rows), seed=0)
    sm = StalenessManager(groups_per_step, max_staleness, versions)
    return versions, ledger, sm, GroupBuffer(ledger, sm, filter_uniform)


def issue(ledger, sm, n):
    ps = ledger.take(n, "w0")
    sm.on_started(n)
    return ps


def test_capacity_formula():
    versions, _, sm, _ = setup(max_staleness=1, groups_per_step=4)
    assert sm.capacity() == (1 + 0 + 1) * 4
    sm.on_started(5)
    assert sm.capacity() == 3
    sm.on_accepted(4)
    assert sm.capacity() == 3  # accepted but not yet trained on: still counts
    sm.on_consumed(4)  # the update on them finished
    assert sm.capacity() == 7
    versions.v = 1
    assert sm.capacity() == 7  # the version alone does not open capacity (value pretraining has none)
    sync = StalenessManager(4, 0, FakeVersions())
    assert sync.capacity() == 4  # max_staleness 0: one step's worth, then wait
    capped = StalenessManager(4, 10, FakeVersions(), max_concurrent=2)
    assert capped.capacity() == 2


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_admission_by_staleness(max_staleness):
    versions, ledger, sm, buf = setup(max_staleness=max_staleness)
    ps = issue(ledger, sm, 4)
    versions.v = 2
    verdicts = [buf.put(make_group(p.uid, version=v)) for p, v in zip(ps, [2, 1, 0, 0], strict=True)]
    expected = ["admitted" if 2 - v <= max_staleness else "stale" for v in [2, 1, 0, 0]]
    assert verdicts == expected
    n_stale = expected.count("stale")
    assert buf.metrics.stale == n_stale
    # stale prompts went back to the ledger and come out first, attempt incremented
    again = ledger.take(n_stale, "w1")
    assert {p.uid for p in again} == {p.uid for p, e in zip(ps, expected, strict=True) if e == "stale"}
    assert all(p.attempt == 1 for p in again)


def test_group_goes_stale_while_queued_is_requeued_at_take():
    versions, ledger, sm, buf = setup(max_staleness=1, groups_per_step=2)
    ps = issue(ledger, sm, 3)
    for p in ps:
        assert buf.put(make_group(p.uid, version=0)) == "admitted"
    versions.v = 2
    assert buf.take_batch(2) is None
    assert buf.metrics.stale == 3 and len(ledger.requeued) == 3
    assert sm.accepted == 0 and sm.running == 0


def test_batches_are_whole_groups_in_order():
    _, ledger, sm, buf = setup()
    ps = issue(ledger, sm, 3)
    for p in ps:
        buf.put(make_group(p.uid, n=4))
    assert buf.take_batch(4) is None  # not enough yet, nothing taken
    batch = buf.take_batch(2)
    assert [g.prompt.uid for g in batch] == [ps[0].uid, ps[1].uid]
    assert all(len(g.responses) == 4 for g in batch)
    assert buf.metrics.staleness_hist[0] == 2


def test_uniform_reward_groups_filtered_and_counted():
    _, ledger, sm, buf = setup(filter_uniform=True)
    ps = issue(ledger, sm, 2)
    assert buf.put(make_group(ps[0].uid, rewards=[1.0] * 4)) == "filtered"
    assert buf.put(make_group(ps[1].uid, rewards=[1.0, 0.0, 0.0, 1.0])) == "admitted"
    assert buf.metrics.filtered == 1 and ledger.counts["filtered"] == 1
    assert ledger.filtered_uids == [ps[0].uid] and ledger.state_dict()["filtered_uids"] == [ps[0].uid]
    assert sm.running == 0


def test_an_unbroken_run_of_uniform_groups_stops_with_a_clear_error():
    """Dynamic sampling on a policy that solves every prompt would leave the learner waiting forever."""
    _, ledger, sm, _ = setup(n_rows=20)
    buf = GroupBuffer(ledger, sm, filter_uniform_rewards=True, filter_patience=3)
    ps = issue(ledger, sm, 6)
    assert buf.put(make_group(ps[0].uid, rewards=[1.0] * 4)) == "filtered"
    assert buf.put(make_group(ps[1].uid, rewards=[1.0] * 4)) == "filtered"
    assert buf.put(make_group(ps[2].uid, rewards=[1.0, 0.0, 1.0, 1.0])) == "admitted"  # the run restarts
    assert buf.put(make_group(ps[3].uid, rewards=[0.0] * 4)) == "filtered"
    assert buf.put(make_group(ps[4].uid, rewards=[0.0] * 4)) == "filtered"
    with pytest.raises(SamplingStarved, match=r"last 3 groups .*filter_uniform_rewards"):
        buf.put(make_group(ps[5].uid, rewards=[0.0] * 4))
    assert buf.metrics.filtered == 5 and len(buf) == 1


def test_duplicates_and_unknown_prompts_dropped():
    _, ledger, sm, buf = setup()
    (p,) = issue(ledger, sm, 1)
    assert buf.put(make_group(p.uid)) == "admitted"
    assert buf.put(make_group(p.uid)) == "duplicate"
    assert buf.put(make_group("never-issued")) == "duplicate"


def test_lost_worker_prompts_requeued():
    _, ledger, _, _ = setup()
    a = ledger.take(3, "wA")
    ledger.take(2, "wB")
    assert ledger.requeue_worker("wA") == 3
    assert [p.uid for p in ledger.take(3, "wC")] == [p.uid for p in a]


def test_ledger_checkpoint_resume_skips_nothing_and_repeats_nothing():
    ledger = PromptLedger(rows(10), seed=3)
    first = ledger.take(4, "w")
    for p in first[:2]:
        assert ledger.returned(p.uid)
        ledger.finish(p.uid, "trained")
    assert ledger.returned(first[2].uid)  # back but not trained yet: pending like the outstanding one
    state = ledger.state_dict()
    resumed = PromptLedger(rows(10), seed=3)
    resumed.load_state_dict(state)
    rest = resumed.take(8, "w")  # 2 pending + 6 new = the whole epoch
    uids = [p.uid for p in first[:2]] + [p.uid for p in rest]
    assert sorted(uids) == sorted(f"r{i}@0" for i in range(10))
    # the uninterrupted ledger hands out exactly the same sequence
    straight = PromptLedger(rows(10), seed=3)
    assert [p.uid for p in straight.take(10, "w")] == [p.uid for p in first] + [p.uid for p in rest[2:]]


def test_epochs_reshuffle_deterministically():
    a = PromptLedger(rows(5), seed=1)
    b = PromptLedger(rows(5), seed=1)
    ua = [p.uid for p in a.take(10, "w")]
    assert ua == [p.uid for p in b.take(10, "w")]
    assert sorted(u.split("@")[0] for u in ua[:5]) == sorted(u.split("@")[0] for u in ua[5:])
    assert ua[5].endswith("@1")


def test_synchronous_mode_alternates_and_value_pretraining_never_deadlocks():
    versions, ledger, sm, buf = setup(max_staleness=0, groups_per_step=2)
    for step in range(4):  # batches consumed without a version bump (value pretraining) keep flowing
        assert sm.capacity() == 2
        ps = issue(ledger, sm, 2)
        assert sm.capacity() == 0  # the next step's prompts wait for this update
        for p in ps:
            assert buf.put(make_group(p.uid, version=versions.v)) == "admitted"
        batch = buf.take_batch(2)
        assert sm.capacity() == 0  # being trained on
        if step >= 2:
            versions.v += 1  # policy updates bump the version before the batch is marked trained
        buf.mark_trained(batch)
    assert ledger.counts["trained"] == 8


def test_trained_audit_stays_bounded_over_many_epochs():
    ledger = PromptLedger(rows(10), seed=0)
    for _ in range(25):  # 25 epochs of 10 prompts, each trained once
        for p in ledger.take(10, "w"):
            assert ledger.returned(p.uid)
            ledger.finish(p.uid, "trained")
    assert ledger.counts["trained"] == 250
    assert len(ledger.trained_uids) <= 20  # the current and the previous epoch only
    assert len(set(ledger.trained_uids)) == len(ledger.trained_uids)
    assert ledger.counts["trained_uids_forgotten"] == 250 - len(ledger.trained_uids)
