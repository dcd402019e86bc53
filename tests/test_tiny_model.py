"""The embedded default's model: the shipped copy is exactly the default recipe's warm start (its held-out
accuracy re-measured equals the recorded one), and any other recipe is built on the spot."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch


def test_the_shipped_model_is_the_default_recipes_warm_start(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from async_vapo.tasks.arithmetic import AdditionTask
    from async_vapo.tasks.tiny_model import SHIPPED_DIR, TinyModelRecipe, ensure_tiny_model, greedy_accuracy

    recipe = TinyModelRecipe()
    path = ensure_tiny_model(tmp_path, progress=False)  # copied from data/models, not built
    assert path.parent == tmp_path and (SHIPPED_DIR / path.name / "model.safetensors").exists()
    info = json.loads((path / "warm_start.json").read_text())
    assert info["recipe"] == asdict(recipe)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    task = AdditionTask(recipe.min_digits, recipe.max_digits)
    held_out = task.problems(recipe.eval_problems, seed=10_000 + recipe.seed, prefix="warm-eval-")
    torch.set_num_threads(recipe.threads)
    assert greedy_accuracy(model, tok, task, held_out) == pytest.approx(info["held_out_greedy_accuracy"])


def test_another_recipe_is_built_and_cached(tmp_path):
    from transformers import AutoModelForCausalLM

    from async_vapo.tasks.tiny_model import TinyModelRecipe, ensure_tiny_model

    recipe = TinyModelRecipe(hidden_size=32, num_layers=1, intermediate_size=64, max_steps=4, eval_every=2,
                             eval_problems=4, target_accuracy=1.0)  # fmt: skip
    path = ensure_tiny_model(tmp_path, recipe, progress=False)
    info = json.loads((path / "warm_start.json").read_text())
    assert info["steps"] == 4 and [s for s, _ in info["history"]] == [2, 4]
    assert AutoModelForCausalLM.from_pretrained(path).config.hidden_size == 32
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path, recipe, progress=False) == path  # cached: not built again
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
