"""TensorBoard and W&B (offline) sinks, switched by the recipe: real packages, real files."""

from __future__ import annotations

import json

import pytest

from async_vapo.config import ConfigError, load_config
from async_vapo.metrics import MetricsWriter
from async_vapo.tracking import Fanout, make_sinks, scalars_of

ROWS = [
    {"phase": "value_pretrain", "step": -2, "value_loss": 0.5, "time": 1.0},
    {"phase": "train", "step": 0, "reward_mean": 0.25, "ledger": {"issued": 8}, "truncated": True},
    {"phase": "train", "step": 1, "reward_mean": 0.75, "rollout_idle_frac": None},
    {"phase": "eval", "step": 1, "eval_accuracy": 0.5},
]
SAMPLES = [
    {"step": 1, "uid": "train-3@0", "sample": i, "prompt": "1+2=", "response": f"Answer: {3 + i}",
     "reward": 1.0 - i, "correct": i == 0, "verdict": ["correct", "wrong"][i], "versions": [0, 1]}
    for i in range(2)
]  # fmt: skip


def test_scalars_are_named_by_phase_and_skip_what_is_not_a_number():
    assert scalars_of(ROWS[1]) == {"train/reward_mean": 0.25, "train/ledger/issued": 8.0}
    assert scalars_of(ROWS[2]) == {"train/reward_mean": 0.75}
    assert scalars_of({"phase": "eval", "x": float("nan")}) == {}


def test_off_by_default_and_both_write_when_on(tmp_path):
    assert make_sinks(load_config(), tmp_path) == []
    cfg = load_config(None, ["tracking.tensorboard=true", "tracking.wandb=true", "tracking.run_name=t1"])
    writer = MetricsWriter(tmp_path, 2, make_sinks(cfg, tmp_path))
    for r in ROWS:
        writer.write(r)
    writer.samples(SAMPLES, 1)
    writer.close()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert got["train/reward_mean"] == [(0, 0.25), (1, 0.75)]
    assert got["value_pretrain/value_loss"] == [(-2, 0.5)]
    assert got["eval/eval_accuracy"] == [(1, 0.5)]
    assert {"samples/0/text_summary", "samples/1/text_summary"} <= set(acc.Tags()["tensors"])  # text tab
    text = acc.Tensors("samples/1/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "1+2=" in text and "Answer: 4" in text and "reward=0.0" in text
    assert [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()] == SAMPLES
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # offline: no network needed; the history is in the run file
    blob = runs[0].read_bytes()
    assert b"train/reward_mean" in blob and b"eval/eval_accuracy" in blob and b"0.75" in blob
    (table,) = runs[0].parent.glob("files/media/table/samples_*.table.json")  # the samples as a W&B table
    t = json.loads(table.read_text())
    assert t["columns"] == list(SAMPLES[0]) and [r[t["columns"].index("response")] for r in t["data"]] == [
        "Answer: 3",
        "Answer: 4",
    ]
    # a resumed run (same output directory) continues the same W&B run
    run_id = (tmp_path / "wandb_run_id").read_text()
    assert runs[0].name == f"run-{run_id}.wandb"
    again = make_sinks(cfg, tmp_path)
    assert [s.run.id for s in again if hasattr(s, "run")] == [run_id]
    for s in again:
        s.close()


def test_a_failing_sink_is_dropped_and_the_others_go_on():
    class Broken:
        def log(self, scalars, step):
            raise OSError("disk full")

        def close(self):
            pass

    class Keep:
        def __init__(self):
            self.seen = []

        def log(self, scalars, step):
            self.seen.append(step)

        def close(self):
            pass

    keep = Keep()
    fan = Fanout([Broken(), keep])
    for r in ROWS:
        fan.log(r)
    assert keep.seen == [-2, 0, 1, 1] and fan.sinks == [keep]


def test_a_missing_package_is_a_clear_config_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"tracking.wandb is on but wandb is not installed"):
        make_sinks(load_config(None, ["tracking.wandb=true"]), tmp_path)
