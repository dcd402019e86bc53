"""The statistics of the learning studies (``studies/study.py``): area under the curve, paired intervals."""

from __future__ import annotations

import math
import random

import pytest

from studies.study import auc, compare, paired_ci


def test_auc_is_the_mean_accuracy_over_trained_samples():
    # 0.2 for the first 100 samples, rising linearly to 0.6 over the next 300: (0.2*100 + 0.4*300) / 400
    curve = [(0, 0.2), (100, 0.2), (400, 0.6)]
    assert auc(curve) == pytest.approx((0.2 * 100 + 0.4 * 300) / 400)
    assert auc([(50, 0.3)]) == 0.3  # a single evaluation is its own mean


def test_paired_ci_matches_the_t_interval_by_hand():
    xs, ref = [0.5, 0.6, 0.7], [0.4, 0.4, 0.5]  # differences 0.1, 0.2, 0.2
    m, lo, hi = paired_ci(xs, ref)
    d = [0.1, 0.2, 0.2]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = 4.303 * sd / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert (m, lo, hi) == pytest.approx((mean, mean - half, mean + half))
    assert lo > 0  # consistently better in every seed: the interval excludes 0


def test_compare_pairs_variants_with_the_reference_by_seed():
    def run_(final, start=0.1):
        return {"curve": [(0, start), (10, final)], "final_accuracy": final, "auc": (start + final) / 2,
                "explained_variance": 0.5, "explained_variance_last": 0.6}  # fmt: skip

    stats = compare({"ref": [run_(0.4), run_(0.5)], "b": [run_(0.45), run_(0.55)]}, reference="ref")
    assert stats["b"]["final_accuracy_vs_ref"]["diff"] == pytest.approx(0.05)
    assert stats["b"]["final_accuracy_vs_ref"]["ci95"] == pytest.approx([0.05, 0.05])  # no spread
    assert stats["ref"]["final_accuracy"]["mean"] == pytest.approx(0.45)
    assert "final_accuracy_vs_ref" not in stats["ref"]


def test_r2_mc_corrects_for_the_monte_carlo_noise():
    from studies.critic_quality import r2_mc

    rng = random.Random(0)
    k = 4
    true = [rng.random() for _ in range(4000)]
    v_mc = [sum(rng.random() < p for _ in range(k)) / k for p in true]  # k Bernoulli draws per state
    assert r2_mc(true, v_mc, k) == pytest.approx(1.0, abs=0.05)  # the truth explains all, noise or not
    raw = 1 - sum((a - b) ** 2 for a, b in zip(true, v_mc, strict=True)) / sum(
        (b - sum(v_mc) / len(v_mc)) ** 2 for b in v_mc
    )
    assert raw < 0.75  # uncorrected, the same predictor looks far worse
    mean = sum(v_mc) / len(v_mc)
    assert r2_mc([mean] * len(v_mc), v_mc, k) == pytest.approx(0.0, abs=0.01)  # a constant explains nothing
    half = [0.5 * p + 0.25 for p in true]  # shrunk halfway to 0.5: explains 1 - 0.25 of the variance
    assert r2_mc(half, v_mc, k) == pytest.approx(0.75, abs=0.06)


def test_compare_reports_a_missing_statistic_as_nan_without_failing():
    def run_(final, ev):
        return {"curve": [(0, 0.1), (10, final)], "final_accuracy": final, "auc": final / 2,
                "explained_variance": ev, "explained_variance_last": ev}  # fmt: skip

    nan = float("nan")
    stats = compare(
        {"ref": [run_(0.4, 0.3), run_(0.5, 0.4)], "free": [run_(0.45, nan), run_(0.5, nan)]}, "ref"
    )
    assert math.isnan(stats["free"]["explained_variance"]["mean"])  # a value-free variant has no critic
    assert stats["free"]["final_accuracy"]["mean"] == pytest.approx(0.475)


def test_a_difference_over_one_seed_is_printed_without_an_interval(capsys):
    from studies.study import markdown_table, print_table

    runs = {
        "vapo": [
            {
                "seed": 0,
                "final_accuracy": 0.5,
                "auc": 0.4,
                "explained_variance": 0.3,
                "explained_variance_last": 0.3,
            }
        ],
        "x": [
            {
                "seed": 0,
                "final_accuracy": 0.45,
                "auc": 0.41,
                "explained_variance": 0.2,
                "explained_variance_last": 0.2,
            }
        ],
    }
    print_table(compare(runs, "vapo"), "vapo")
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("x ")]
    assert "-0.050 (1 seed)" in row and "+0.010 (1 seed)" in row and "nan" not in row
    # the Markdown table of bench/README.md: the same cells, each seed's final accuracy and minutes
    runs["x"][0]["rl_minutes"] = 5.26
    table = markdown_table(compare(runs, "vapo"), "vapo").splitlines()
    assert table[2].startswith("| **vapo** | 0.500 | 0.400 | 0.300 / 0.300 |  |  | .500 | ? |")
    assert (
        table[3] == "| x | 0.450 | 0.410 | 0.200 / 0.200 | -0.050 (1 seed) | +0.010 (1 seed) | .450 | 5.3 |"
    )


def test_a_study_reuses_a_committed_record_and_records_a_finished_run(tmp_path, monkeypatch):
    """A record of the config a run would get stands for the run (nothing launches); one of another
    config does not; a finished run directory of that config without a record gets one (the table then
    reprints from the records alone), and one of another config is run again."""
    import json

    import yaml

    from studies import study

    launched = []
    monkeypatch.setattr(study, "launch", lambda out, overrides: launched.append(out))
    monkeypatch.setattr(study, "RESULTS", tmp_path)  # no committed record stands in for these runs
    runs, records = tmp_path / "runs", tmp_path / "records"
    curve = {"curve": [(0, 0.2), (100, 0.5)], "final_accuracy": 0.5, "auc": 0.35}

    def config(name, overrides):
        return study.resolved(study.overrides_of(name, overrides, 0, False))

    study.write_record(records / "vapo_seed0.json", [], config("vapo", []), curve, "abc1234")
    study.write_record(
        records / "x_seed0.json", ["algo.alpha=1"], config("x", ["algo.alpha=1"]), curve, "abc1234"
    )

    got = study.run_grid(runs, records, {"vapo": [], "x": ["algo.alpha=2"]}, [0], False, report_only=True)
    assert got == {"vapo": [{**curve, "seed": 0}]}  # x's record is for another setting: not reused
    # the match is on the resolved config: another spelling of the same setting matches, another default not
    assert study.read_record(records / "x_seed0.json", config("x", ["algo.alpha=1.0"]))
    assert not study.read_record(records / "vapo_seed0.json", config("vapo", ["model.dtype=float32"]))
    # a field added to the config after a record was written: the record stands for runs at its default
    # (a new field's default keeps the old behaviour), not for runs that set it; a removed field is ignored
    older = config("vapo", [])
    del older["rollout"]["frontend_cores"]
    older["train"]["a_removed_field"] = 3
    study.write_record(records / "old_seed0.json", [], older, curve, "abc1234")
    assert study.read_record(records / "old_seed0.json", config("vapo", []))
    assert not study.read_record(records / "old_seed0.json", config("vapo", ["rollout.frontend_cores=own"]))

    # x at alpha 2, run before records existed and before rollout.frontend_cores was added (the launcher
    # wrote its config): the last two of its 120 training steps, then an evaluation; judged like a record
    out = runs / "x_seed0"
    out.mkdir(parents=True)
    before_field = config("x", ["algo.alpha=2"])
    del before_field["rollout"]["frontend_cores"]
    (out / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(out), **before_field}))
    metrics = [
        {"phase": "train", "step": 118, "time": 10.0, "step_seconds": 5.0, "trained_sequences": 8},
        {"phase": "train", "step": 119, "time": 15.0, "step_seconds": 5.0, "trained_sequences": 8},
        {"phase": "eval", "step": 119, "time": 16.0, "eval_accuracy": 0.4},
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    got = study.run_grid(runs, records, {"x": ["algo.alpha=2"]}, [0], False)
    assert not launched
    assert got["x"][0]["final_accuracy"] == 0.4
    assert got["x"][0]["rl_minutes"] == pytest.approx(10 / 60, abs=0.01)
    rec = json.loads((records / "x_seed0.json").read_text())
    assert rec["overrides"][-1] == "algo.alpha=2" and rec["result"]["curve"] == [[16, 0.4]]
    assert rec["commit"].startswith("unknown")  # which code ran it is not known
    assert study.read_record(records / "x_seed0.json", config("x", ["algo.alpha=2"]))

    # the same directory asked for at alpha 3: another config, so it is moved aside and run again
    with pytest.raises(OSError):  # the stand-in launcher leaves no metrics behind
        study.run_grid(runs, records, {"x": ["algo.alpha=3"]}, [0], False)
    (aside,) = runs.iterdir()
    assert launched == [out] and aside.name.startswith("x_seed0.old-") and (aside / "metrics.jsonl").exists()


def test_tuning_gives_every_variant_the_same_grid_and_keeps_each_ones_best_point(tmp_path, monkeypatch):
    """studies/tune.py: every variant runs every grid point at every seed (through study.run_grid, with a
    stand-in launcher whose accuracy peaks at a known learning rate per variant); each keeps its own best
    point; the ablation's record of the default point stands for that run; a re-run reads the records."""
    import json

    import yaml

    from studies import study, tune

    results = tmp_path / "results"
    monkeypatch.setattr(study, "RESULTS", results)
    launched: list[str] = []

    def fake_launch(out, overrides):
        cfg = study.resolved(overrides)
        peak = 5e-5 if cfg["algo"]["estimator"] == "group_norm" else 2e-4
        acc = 0.6 - 0.1 * abs(math.log2(cfg["train"]["actor_lr"] / peak)) + 0.01 * cfg["train"]["seed"]
        out.mkdir(parents=True)
        (out / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(out), **cfg}))
        metrics = [
            {"phase": "eval", "step": -1, "time": 0.0, "eval_accuracy": 0.2},
            {"phase": "train", "step": 119, "time": 60.0, "step_seconds": 0.5, "trained_sequences": 256},
            {"phase": "eval", "step": 119, "time": 61.0, "eval_accuracy": acc},
        ]
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        launched.append(out.name)

    monkeypatch.setattr(study, "launch", fake_launch)
    default_lr = study.resolved([])["train"]["actor_lr"]
    # the ablation's run of vapo at seed 0 (its own settings: the default learning rate), recorded earlier
    ablation_cfg = study.resolved(study.overrides_of("vapo", ["data.n_eval=256"], 0, False))
    recorded = {"curve": [(0, 0.2), (256, 0.55)], "final_accuracy": 0.55, "auc": 0.375,
                "explained_variance": 0.3, "explained_variance_last": 0.3}  # fmt: skip
    study.write_record(results / "ablation" / "full" / "vapo_seed0.json", [], ablation_cfg, recorded, "abc")

    points = tune.grid_points([f"train.actor_lr=5e-5,{default_lr},2e-4"])
    assert len(points) == 3 and tune.point_name("vapo", points[2]) == "vapo@actor_lr=2e-4"
    out = tune.tune(["vapo", "group_norm"], points, [0, 1], tmp_path / "runs", results / "tune" / "full")

    # the same budget: 3 points x 2 seeds each, less the one run the ablation's record stands for
    every = {
        f"{tune.point_name(v, p)}_seed{s}" for v in ("vapo", "group_norm") for p in points for s in (0, 1)
    }
    assert sorted(launched) == sorted(every - {f"vapo@actor_lr={default_lr}_seed0"})
    assert len(launched) == 11 and out["runs_per_variant"] == 6
    assert out["points"][f"vapo@actor_lr={default_lr}"]["final_accuracy"]["per_seed"][0] == 0.55
    assert out["best"] == {"vapo": "vapo@actor_lr=2e-4", "group_norm": "group_norm@actor_lr=5e-5"}
    # both tuned variants peak at 0.6 (+0.01 per seed): level, paired by seed
    assert out["tuned"]["group_norm"]["final_accuracy_vs_vapo"]["diff"] == pytest.approx(0.0, abs=1e-9)

    again = tune.tune(
        ["vapo", "group_norm"], points, [0, 1], tmp_path / "elsewhere", results / "tune" / "full",
        report_only=True,
    )  # fmt: skip
    assert len(launched) == 11 and again["best"] == out["best"]
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        tune.grid_points(["train.actor_lr"])
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        tune.grid_points(["train.actor_lr=1e-4,,2e-4"])
