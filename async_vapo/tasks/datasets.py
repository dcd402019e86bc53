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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ChatFormat:
    """Prompts rendered by the tokenizer's chat template (``data.chat_template``), with an optional
    system message first."""

    system_prompt: str = ""


def chat_format(setting: bool | str, tokenizer: Any, system_prompt: str = "") -> ChatFormat | None:
    """``data.chat_template`` resolved against the tokenizer: ``auto`` uses the template when the
    tokenizer has one; ``true`` without one is an error (prompts would silently lack the chat markup)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting is True and not has:
        raise DatasetError(
            f"data.chat_template is true but the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no "
            "chat template"
        )
    return ChatFormat(system_prompt) if has and setting is not False else None


def _messages(problem: Any) -> list[dict[str, str]] | None:
    """A prompt field that holds a conversation: a list of {role, content} with text contents."""
    if not isinstance(problem, list) or not problem:
        return None
    for m in problem:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return None
    return [{"role": m["role"], "content": m["content"]} for m in problem]


def prompt_token_ids(
    tokenizer: Any, problem: Any, template: str, fields: dict[str, Any], chat: ChatFormat | None
) -> list[int]:
    """One row's prompt as token ids: ``template`` over the row's fields with ``{problem}``, tokenized as
    text; with ``chat``, through the chat template (a message-list ``problem`` is the conversation)."""
    conversation = _messages(problem)
    if chat is None:
        if conversation is not None:
            raise DatasetError(
                "the prompt field holds a message list but the tokenizer has no chat template (or "
                "data.chat_template is false): point data.prompt_field at a text (e.g. prompt.0.content)"
            )
        return list(
            tokenizer(template.format(**{**fields, "problem": problem}), add_special_tokens=True)["input_ids"]
        )
    if conversation is None:
        conversation = [{"role": "user", "content": template.format(**{**fields, "problem": problem})}]
    if chat.system_prompt and conversation[0]["role"] != "system":
        conversation = [{"role": "system", "content": chat.system_prompt}, *conversation]
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def load_prompts(  # noqa: PLR0913 (a data source is its path, fields, split and formats: config.DataConfig)
    path: str | Path,
    tokenizer: Any,
    template: str,
    prompt_field: str,
    answer_field: str,
    task: str = "math",
    id_field: str = "id",
    split: str = "train",
    chat: ChatFormat | None = None,
    extra_fields: tuple[str, ...] = (),
) -> list[Prompt]:
    """``template`` is a ``str.format`` string over the row's top-level fields plus ``{problem}`` (the
    value of ``prompt_field``, which may be dotted like ``reward_model.ground_truth``); ``chat``: through
    the tokenizer's chat template (``prompt_token_ids``)."""
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
        try:
            ids = prompt_token_ids(tokenizer, problem, template, fields, chat)
        except DatasetError as exc:
            raise DatasetError(f"{path}: row {i}: {exc}") from None
        extras = row_extras(row, extra_fields)
        if len(extras) > MAX_EXTRAS:
            raise DatasetError(
                f"{path}: row {i}: data.extra_fields come to {len(extras)} bytes of JSON (at most {MAX_EXTRAS})"
            )
        uid = f"{Path(path).stem}-{row.get(id_field, i)}"
        out.append(Prompt(uid, pack_i32(ids), str(answer).strip(), task, extras=extras))
    return out


MAX_EXTRAS = 16 * 1024  # bytes of JSON per prompt: they travel with it, both ways


def row_extras(row: dict[str, Any], fields: tuple[str, ...]) -> str:
    """The row's ``fields`` (dotted names reach in; the last part names it) as JSON ("" for none)."""
    if not fields:
        return ""
    return json.dumps({f.rsplit(".", 1)[-1]: _get(row, f) for f in fields}, ensure_ascii=False, default=str)


def addition_prompts(tokenizer: Any, n: int, seed: int, prefix: str, min_digits: int = 1) -> list[Prompt]:
    task = AdditionTask(min_digits=min_digits)
    return [
        Prompt(p.uid, pack_i32(prompt_ids(tokenizer, task, p)), p.answer, "addition")
        for p in task.problems(n, seed, prefix)
    ]
