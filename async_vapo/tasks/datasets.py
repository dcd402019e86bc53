"""Prompt datasets: JSONL or Parquet files with a prompt template and an answer field (the DAPO-Math-17k
and AIME layouts are examples), anything Hugging Face ``datasets`` loads, or the built-in addition task.
Every row becomes a wire ``Prompt``.

``read_rows`` reads ``.jsonl`` / ``.json`` (one object per line) and ``.parquet`` itself; any other
source goes through ``datasets`` (extra ``datasets``): a directory written by ``save_to_disk``, a
directory or a file ``load_dataset`` understands (CSV, JSON, Arrow, ...), or a hub name such as
``HuggingFaceH4/aime_2024`` where the machine has a network. ``split`` picks the split of a source that
has several. A row without an answer is rejected with an error naming the source and the row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from async_vapo.protocol import Prompt, pack_i32
from async_vapo.tasks.arithmetic import AdditionTask
from async_vapo.tasks.tiny_model import prompt_ids


class DatasetError(ValueError):
    pass


REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_data_path(path: str | Path) -> Path:
    """A relative path is taken from the working directory, else from the repository root, so that
    ``data/aime24.jsonl`` (shipped with the repository) works from anywhere."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not (REPO_ROOT / p).exists():
        return p
    return REPO_ROOT / p


def read_rows(path: str | Path, split: str = "train") -> list[dict[str, Any]]:
    p = resolve_data_path(path)
    if p.suffix not in (".jsonl", ".json", ".parquet") or not p.is_file():
        return _hf_rows(str(path), p, split)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_table(p).to_pylist())
    rows = []
    for i, line in enumerate(p.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{p}: row {i} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{p}: row {i} is not a JSON object")
        rows.append(row)
    return rows


def _hf_rows(name: str, p: Path, split: str) -> list[dict[str, Any]]:
    """Rows through Hugging Face ``datasets``: a saved dataset, a local file or directory, a hub name."""
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"{name}: not a .jsonl/.json/.parquet file; other sources need `datasets` (pip install -e '.[datasets]')"
        ) from None
    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
        elif p.is_file():
            builder = {".csv": "csv", ".tsv": "csv", ".arrow": "arrow", ".txt": "text"}.get(p.suffix, "json")
            ds = datasets.load_dataset(builder, data_files=str(p))
        else:
            ds = datasets.load_dataset(str(p) if p.exists() else name)
    except Exception as exc:
        where = "" if p.exists() else " (no such file or directory, and not reachable as a hub data set)"
        raise DatasetError(f"{name}: could not load{where}: {str(exc)[:300]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DatasetError(f"{name}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    return [dict(r) for r in ds]


def _get(row: dict[str, Any], dotted: str) -> Any:
    """``a.b.0.c``: dict keys and list indices (DAPO-Math-17k keeps its prompt as a chat message list)."""
    node: Any = row
    for k in dotted.split("."):
        if isinstance(node, dict) and k in node:
            node = node[k]
        elif isinstance(node, list) and k.isdigit() and int(k) < len(node):
            node = node[int(k)]
        else:
            return None
    return node


def load_prompts(
    path: str | Path,
    tokenizer: Any,
    template: str,
    prompt_field: str,
    answer_field: str,
    task: str = "math",
    id_field: str = "id",
    split: str = "train",
) -> list[Prompt]:
    """``template`` is a ``str.format`` string over the row's top-level fields plus ``{problem}`` (the
    value of ``prompt_field``, which may be dotted like ``reward_model.ground_truth``)."""
    out = []
    for i, row in enumerate(read_rows(path, split)):
        answer = _get(row, answer_field)
        if answer is None or str(answer).strip() == "":
            raise DatasetError(
                f"{path}: row {i} (id={row.get(id_field, '?')}) has no answer in field {answer_field!r}"
            )
        problem = _get(row, prompt_field)
        if problem is None:
            raise DatasetError(f"{path}: row {i} has no prompt in field {prompt_field!r}")
        fields = {k: v for k, v in row.items() if isinstance(k, str)}
        text = template.format(**{**fields, "problem": problem})
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        out.append(
            Prompt(f"{Path(path).stem}-{row.get(id_field, i)}", pack_i32(ids), str(answer).strip(), task)
        )
    return out


def addition_prompts(tokenizer: Any, n: int, seed: int, prefix: str, min_digits: int = 1) -> list[Prompt]:
    task = AdditionTask(min_digits=min_digits)
    return [
        Prompt(p.uid, pack_i32(prompt_ids(tokenizer, task, p)), p.answer, "addition")
        for p in task.problems(n, seed, prefix)
    ]
