"""Prompt datasets: JSONL or Parquet files with a prompt template and an answer field (the DAPO-Math-17k
and AIME layouts are examples), or the built-in addition task. Every row becomes a wire ``Prompt``.

A row without an answer is rejected with an error naming the file and the row.
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


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    p = resolve_data_path(path)
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
) -> list[Prompt]:
    """``template`` is a ``str.format`` string over the row's top-level fields plus ``{problem}`` (the
    value of ``prompt_field``, which may be dotted like ``reward_model.ground_truth``)."""
    out = []
    for i, row in enumerate(read_rows(path)):
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


def addition_prompts(tokenizer: Any, n: int, seed: int, prefix: str) -> list[Prompt]:
    task = AdditionTask()
    return [
        Prompt(p.uid, pack_i32(prompt_ids(tokenizer, task, p)), p.answer, "addition")
        for p in task.problems(n, seed, prefix)
    ]
