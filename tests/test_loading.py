"""learner/loading.py: a checkpoint read one tensor at a time into a model built empty, as under ZeRO-3
(the two-rank partitioned load is in tests/test_zero3_export.py)."""

from __future__ import annotations

import shutil

import pytest
import torch

from async_vapo.learner.loading import checkpoint_files, checkpoint_name, load_partitioned_weights


def test_names_match_with_or_without_the_base_model_prefix():
    available = dict.fromkeys(["model.norm.weight", "lm_head.weight", "score.weight"], None)
    assert checkpoint_name("norm.weight", available, "model") == "model.norm.weight"  # a backbone
    assert checkpoint_name("lm_head.weight", available, "model") == "lm_head.weight"
    assert checkpoint_name("model.layers.0.x", available, "model") is None


def test_a_model_built_from_its_config_loads_the_checkpoints_exact_tensors(tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for auto, source in ((AutoModelForCausalLM, ref), (AutoModel, ref.model)):  # a backbone too
        torch.manual_seed(1)
        model = auto.from_config(config)
        unused = load_partitioned_weights(model, tiny_model_dir)
        for (name, p), q in zip(model.named_parameters(), source.parameters(), strict=True):
            assert torch.equal(p, q), name
        assert set(unused) <= {"lm_head.weight"}, unused  # only a tied head's copy may go unused
    # a checkpoint without one of the model's tensors: a clear error, nothing half-loaded silently
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    from safetensors.torch import load_file, save_file

    (file,) = set(checkpoint_files(broken).values())
    tensors = load_file(str(file))
    del tensors["model.norm.weight"]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model\.norm\.weight"):
        load_partitioned_weights(AutoModelForCausalLM.from_config(config), broken)


def test_the_attention_kernel_is_flash_attention_only_on_gpus_that_have_it():
    import importlib.util

    from async_vapo.learner.models import attention_kernel

    assert attention_kernel("auto", on_gpu=False) == "sdpa"
    has_flash = importlib.util.find_spec("flash_attn") is not None
    assert attention_kernel("auto", on_gpu=True) == ("flash_attention_2" if has_flash else "sdpa")
    assert attention_kernel("eager", on_gpu=True) == "eager"


def test_a_reward_models_score_head_starts_the_critic(tiny_model_dir, tmp_path):
    """``model.value_path`` naming a Hugging Face reward model (one label): its backbone and its score head
    make the critic, whose value at a sequence's last token is the reward model's score of it."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from async_vapo.learner.models import load_value

    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1, pad_token_id=0)
    torch.manual_seed(3)
    rm = AutoModelForSequenceClassification.from_config(config).eval()
    torch.nn.init.normal_(rm.score.weight, std=0.5)  # not zero: the critic's own head starts at zero
    rm.save_pretrained(tmp_path / "rm")
    critic = load_value(str(tiny_model_dir), str(tmp_path / "rm"), torch.float32).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(critic(ids)[:, -1], rm(input_ids=ids).logits[:, 0])
    two = AutoModelForSequenceClassification.from_config(
        AutoConfig.from_pretrained(tiny_model_dir, num_labels=2)
    )
    two.save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match="a reward model with one label"):
        load_value(str(tiny_model_dir), str(tmp_path / "two"), torch.float32)
