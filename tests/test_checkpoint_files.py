"""Checkpoint files without DeepSpeed: RNG states that load with ``weights_only=True``, a rename that
never loses the previous checkpoint, and ``latest`` that never silently sends a resume to step 0."""

from __future__ import annotations

import os
import random

import msgspec
import numpy as np
import pytest
import torch

from async_vapo.learner import checkpoint


def _draws() -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)])


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    np.random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and one in Python's
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    _draws()
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected
    assert np.random.randn() is not None and random.gauss(0, 1) is not None


def _step(root, n: int) -> None:
    d = root / f"step_{n}"
    d.mkdir(parents=True)
    (d / "learner_state.msgpack").write_bytes(b"\x80")


def test_publish_replaces_a_checkpoint_without_losing_it_on_failure(tmp_path, monkeypatch):
    _step(tmp_path, 4)
    (tmp_path / "latest").write_text("step_4")
    tmp = tmp_path / "step_4.tmp"
    tmp.mkdir()
    (tmp / "learner_state.msgpack").write_bytes(b"new")
    real = os.replace

    def failing(src, dst):
        if str(src).endswith(".tmp") and str(dst).endswith("step_4"):
            raise OSError("injected: disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="injected"):
        checkpoint._publish(tmp_path, tmp, tmp_path / "step_4")
    assert (tmp_path / "step_4" / "learner_state.msgpack").read_bytes() == b"\x80"  # the old one, intact
    monkeypatch.setattr(os, "replace", real)
    checkpoint._publish(tmp_path, tmp, tmp_path / "step_4")
    assert (tmp_path / "step_4" / "learner_state.msgpack").read_bytes() == b"new"
    assert not (tmp_path / "step_4.old").exists() and not tmp.exists()
    assert checkpoint.latest(tmp_path) == tmp_path / "step_4"


def test_latest_falls_back_to_the_newest_complete_step_or_refuses(tmp_path):
    assert checkpoint.latest(tmp_path) is None  # a fresh run
    _step(tmp_path, 3)
    _step(tmp_path, 12)
    (tmp_path / "step_20.tmp").mkdir()  # a save that never finished
    assert checkpoint.latest(tmp_path) == tmp_path / "step_12"  # no marker (lost)
    (tmp_path / "latest").write_text("step_20")  # dangling
    assert checkpoint.latest(tmp_path) == tmp_path / "step_12"
    (tmp_path / "latest").write_text("step_3")
    assert checkpoint.latest(tmp_path) == tmp_path / "step_3"  # what the marker names, when complete
    empty = tmp_path / "other"
    empty.mkdir()
    (empty / "latest").write_text("step_7")
    with pytest.raises(checkpoint.CheckpointError, match="nothing to resume from"):
        checkpoint.latest(empty)


def _scored(root, step: int, accuracy: float | None):
    path = root / f"step_{step}"
    path.mkdir()
    state = {"step": step} | ({"eval_accuracy": accuracy} if accuracy is not None else {})
    (path / "learner_state.msgpack").write_bytes(msgspec.msgpack.encode(state))


def test_retention_keeps_the_newest_and_optionally_the_best(tmp_path):
    for step, acc in [(10, 0.2), (20, 0.6), (30, None), (40, 0.4), (50, 0.3)]:
        _scored(tmp_path, step, acc)
    (tmp_path / "step_60.tmp").mkdir()  # a save in progress is not a checkpoint: never touched
    names = lambda paths: [p.name for p in paths]  # noqa: E731
    steps = checkpoint.complete_steps(tmp_path)
    assert names(checkpoint.Retention(0).to_delete(steps)) == []  # keep every one
    assert names(checkpoint.Retention(2).to_delete(steps)) == ["step_10", "step_20", "step_30"]
    assert names(checkpoint.Retention(2, keep_best=True).to_delete(steps)) == ["step_10", "step_30"]
    assert names(checkpoint.Retention(9).to_delete(steps)) == []
    gone = checkpoint.prune(tmp_path, checkpoint.Retention(1, keep_best=True))
    assert names(gone) == ["step_10", "step_30", "step_40"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_20", "step_50", "step_60.tmp"]
