"""Typed config: recipes load, overrides apply, every bad field is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from async_vapo.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.train.total_steps > 0


def test_paper_recipe_values():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "vapo_qwen2.5_32b.yaml")
    assert (cfg.train.groups_per_step, cfg.rollout.n_samples) == (512, 16)
    assert (cfg.train.actor_lr, cfg.train.critic_lr) == (1e-6, 2e-6)
    assert (cfg.algo.eps_low, cfg.algo.eps_high, cfg.algo.alpha, cfg.algo.nll_coef) == (0.2, 0.28, 0.05, 0.1)
    assert cfg.algo.value_pretrain_steps == 50 and cfg.algo.lam_critic == 1.0


def test_overrides_are_typed():
    cfg = load_config(None, ["train.actor_lr=3e-5", "algo.loss_agg=sample", "rollout.n_samples=4"])
    assert cfg.train.actor_lr == 3e-5 and cfg.algo.loss_agg == "sample" and cfg.rollout.n_samples == 4


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("train.actor_lr=fast", "train.actor_lr"),
        ("algo.loss_agg=seq", "algo.loss_agg"),
        ("train.bogus=1", "bogus"),
        ("algo.estimator=ppo", "algo.estimator"),
        ("train.zero_stage=4", "train.zero_stage"),
        ("train.offload_params=true", "train.offload_params needs train.zero_stage=3"),
        ("model.lora_rank=-1", "model.lora_rank"),
        ("algo.eps_low=-0.1", "eps_low"),
        ("data.task=math", "train_file"),
        ("train.broadcast_every=3", "broadcast_every"),
        ("data.min_digits=8", "data.min_digits"),
        ("train.filter_patience=-1", "train.filter_patience"),
        ("rollout.max_num_seqs=0", "rollout.max_num_seqs"),
        ("rollout.tensor_parallel_size=0", "rollout.tensor_parallel_size"),
        ("train.worker_restarts=-1", "train.worker_restarts"),
        ("train.worker_restart_window_s=0", "train.worker_restart_window_s"),
        ("model.attn_implementation=flash", "model.attn_implementation"),
    ],
)
def test_bad_fields_are_named(override, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(None, [override])


def test_lora_needs_zero_2_at_most():
    with pytest.raises(
        ConfigError, match=r"LoRA \(model.lora_rank / critic_lora_rank\) needs train.zero_stage <= 2"
    ):
        load_config(None, ["model.lora_rank=8", "train.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"model.lora_target_modules is empty"):
        load_config(None, ["model.lora_rank=8", "model.lora_target_modules=[]"])
    assert load_config(None, ["model.critic_lora_rank=8", "train.zero_stage=2"]).model.uses_lora
    with pytest.raises(ConfigError, match=r"model.lora_publish=adapter needs a policy LoRA"):
        load_config(None, ["model.critic_lora_rank=8", "model.lora_publish=adapter"])
    with pytest.raises(
        ConfigError, match=r"model.lora_publish=adapter needs a policy LoRA \(model.lora_rank in 1..512\)"
    ):
        load_config(None, ["model.lora_rank=1024", "model.lora_publish=adapter"])
    assert (
        load_config(None, ["model.lora_rank=8", "model.lora_publish=adapter"]).model.lora_publish == "adapter"
    )


def test_offload_needs_zero():
    with pytest.raises(ConfigError, match=r"train\.offload_optimizer needs train\.zero_stage >= 1"):
        load_config(None, ["train.zero_stage=0", "train.offload_optimizer=true"])
    assert load_config(None, ["train.zero_stage=3", "train.offload_params=true"]).train.offload_params


def test_malformed_override():
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        load_config(None, ["train.actor_lr"])


def test_dynamic_sampling_needs_groups():
    with pytest.raises(ConfigError, match=r"filter_uniform_rewards needs rollout\.n_samples > 1"):
        load_config(None, ["train.filter_uniform_rewards=true", "rollout.n_samples=1"])
    embedded = Path(__file__).resolve().parents[1] / "configs" / "embedded_default.yaml"
    assert load_config(embedded).train.filter_uniform_rewards  # the embedded default's one addition


def test_auto_dtype_is_bf16_on_gpus_and_on_cpus_that_multiply_bf16_natively(monkeypatch):
    import torch

    from async_vapo.learner import models

    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = {
            f for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for f in line.split()
        }
    if flags:  # the probe agrees with what the kernel reports about this machine
        assert models.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(models, "cpu_has_native_bf16", lambda native=native: native)
        assert models.torch_dtype("auto", on_gpu=False) == want
        assert models.torch_dtype("auto", on_gpu=True) == torch.bfloat16
        assert models.torch_dtype("float32", on_gpu=True) == torch.float32  # an explicit dtype is kept


def test_command_line_values_of_string_fields_stay_strings():
    cfg = load_config(None, ["data.prompt_template=Question: {problem}", "data.answer_field=yes"])
    assert cfg.data.prompt_template == "Question: {problem}" and cfg.data.answer_field == "yes"
    assert load_config(None, ["train.zero_stage=3"]).train.zero_stage == 3  # others still typed


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.actr_lr=1", "unknown field train.actr_lr; did you mean train.actor_lr"),
        ("trian.actor_lr=1", "unknown field trian; did you mean train"),
    ],
)
def test_unknown_fields_name_the_closest_valid_one(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_or_broken_config_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.yaml") as info:
        load_config(tmp_path / "nope.yaml")
    assert "\n" not in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1,\n  x: 2")
    with pytest.raises(ConfigError, match=r"bad.yaml \(line 2, column \d+\): not valid YAML") as info:
        load_config(bad)
    assert "\n" not in str(info.value)


def test_print_config_is_the_resolved_config_documented_and_loads_back(tmp_path):
    from async_vapo.config import describe

    cfg = load_config(Path("configs/vapo_qwen2.5_32b.yaml"), ["train.actor_lr=3e-6", "data.answer_field=yes"])
    text = describe(cfg)
    assert "# how new weights leave the learner" in text and "  actor_lr: 3.0e-06" in text
    (tmp_path / "printed.yaml").write_text(text)
    assert load_config(tmp_path / "printed.yaml") == cfg  # what --print-config shows is what runs
