"""The embedded default's model: a character-level tokenizer and a tiny Qwen2 model (so vLLM and
transformers both load it), brought to a partial-skill start by a short supervised warm start on CPU.

The artefact is cached on disk under a key derived from its recipe; the default recipe's is shipped in
``data/models`` and copied from there, any other recipe is built when missing. The warm
start is deterministic for a seed (fixed thread count, seeded data and init). It stops at the first
evaluation whose held-out greedy accuracy reaches ``target_accuracy`` so that RL has real headroom.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from async_vapo.tasks.arithmetic import BOS, EOS, PAD, VOCAB, AdditionTask, Problem, extract_answer

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TinyModelRecipe:
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 512
    max_position: int = 256
    seed: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    max_steps: int = 1500
    eval_every: int = 10
    eval_problems: int = 256
    target_accuracy: float = 0.3
    min_digits: int = 1
    max_digits: int = 7
    threads: int = 2

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + "|v2"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# the default recipe's model, built once and shipped with the repository (3 MB): a fresh clone trains
# without the warm start's minutes, and every machine starts from the same weights (a build's floats
# depend on the CPU). ``ensure_tiny_model`` copies it into the cache; other recipes are built.
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "data" / "models"


def default_cache_dir() -> Path:
    env = os.environ.get("ASYNC_VAPO_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cache" / "async_vapo"


def build_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for ch in VOCAB:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters back to text without spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=PAD
    )
    fast.padding_side = "left"
    fast.save_pretrained(out_dir)
    return fast


def _model_config(recipe: TinyModelRecipe, vocab_size: int):
    from transformers import Qwen2Config

    legacy: dict[str, Any] = {"rope_theta": 10000.0, "torch_dtype": "float32"}
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_position,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **legacy,
    )


def encode(tokenizer, text: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(c) for c in text]


def prompt_ids(tokenizer, task: AdditionTask, p: Problem) -> list[int]:
    return [tokenizer.bos_token_id, *encode(tokenizer, task.prompt(p))]


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task: AdditionTask, problems: list[Problem]) -> float:
    """Held-out exact-match accuracy under greedy decoding with HF generate (no vLLM needed)."""
    model.eval()
    prompts = [prompt_ids(tokenizer, task, p) for p in problems]
    plen = len(prompts[0])
    ids = torch.tensor(prompts)
    max_new = 10 * task.max_digits + task.max_digits + 4
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    correct = 0
    for p, row in zip(problems, out[:, plen:].tolist(), strict=True):
        text = tokenizer.decode(row, skip_special_tokens=True)
        correct += extract_answer(text) == p.answer
    model.train()
    return correct / len(problems)


def _training_batch(tokenizer, task: AdditionTask, rng: random.Random, n: int):
    seqs = []
    for i in range(n):
        p = task.sample(rng, f"t{i}")
        seqs.append(
            (prompt_ids(tokenizer, task, p), [*encode(tokenizer, task.solution(p)), tokenizer.eos_token_id])
        )
    width = max(len(a) + len(b) for a, b in seqs)
    ids = torch.full((n, width), tokenizer.pad_token_id)
    labels = torch.full((n, width), -100)
    attn = torch.zeros((n, width), dtype=torch.long)
    for i, (a, b) in enumerate(seqs):
        full = a + b
        ids[i, : len(full)] = torch.tensor(full)
        labels[i, len(a) : len(full)] = torch.tensor(b)
        attn[i, : len(full)] = 1
    return ids, labels, attn


def tiny_model_dir(cache_dir: Path | None = None, recipe: TinyModelRecipe | None = None) -> Path:
    """Where the tiny model lives (or will, once built)."""
    recipe = recipe or TinyModelRecipe()
    return (cache_dir or default_cache_dir()) / f"tiny-qwen2-{recipe.key()}"


def ensure_tiny_model(
    cache_dir: Path | None = None, recipe: TinyModelRecipe | None = None, progress: bool = True
) -> Path:
    """Path to the warm-started tiny model (HF format, tokenizer included); builds it when missing."""
    recipe = recipe or TinyModelRecipe()
    root = tiny_model_dir(cache_dir, recipe)
    if (root / "warm_start.json").exists():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shipped = SHIPPED_DIR / root.name
    if _built_from(shipped, recipe):
        shutil.copytree(shipped, tmp)
    else:
        tmp.mkdir(parents=True)
        _build(tmp, recipe, progress)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)  # atomic publish: concurrent builders never see a half-written model
    return root


def _built_from(model_dir: Path, recipe: TinyModelRecipe) -> bool:
    """``model_dir`` holds a finished warm start of exactly ``recipe``."""
    try:
        info = json.loads((model_dir / "warm_start.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("recipe") == asdict(recipe) and (model_dir / "model.safetensors").exists()


def _build(out: Path, recipe: TinyModelRecipe, progress: bool) -> None:
    from tqdm import tqdm
    from transformers import Qwen2ForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(out)
    task = AdditionTask(recipe.min_digits, recipe.max_digits)
    model = Qwen2ForCausalLM(_model_config(recipe, len(tokenizer)))
    held_out = task.problems(recipe.eval_problems, seed=10_000 + recipe.seed, prefix="warm-eval-")
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    rng = random.Random(recipe.seed)
    history: list[tuple[int, float]] = []
    acc = 0.0
    bar = tqdm(
        range(1, recipe.max_steps + 1),
        desc="warm start (tiny model)",
        disable=not progress,
        dynamic_ncols=True,
    )
    step = 0
    for step in bar:
        ids, labels, attn = _training_batch(tokenizer, task, rng, recipe.batch_size)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % recipe.eval_every == 0:
            acc = greedy_accuracy(model, tokenizer, task, held_out)
            history.append((step, acc))
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
            if acc >= recipe.target_accuracy:
                break
    model.save_pretrained(out, safe_serialization=True)
    info = {
        "recipe": asdict(recipe),
        "steps": step,
        "held_out_greedy_accuracy": acc,
        "history": history,
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "warm_start.json").write_text(json.dumps(info, indent=1))
    torch.set_num_threads(threads)
    log.info("tiny model built", path=str(out), steps=step, accuracy=acc, seconds=info["build_seconds"])
