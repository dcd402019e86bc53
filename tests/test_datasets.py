"""Prompt datasets: JSONL and Parquet, templates, dotted fields, rows without answers rejected by name."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from async_vapo.protocol import unpack_i32
from async_vapo.tasks.datasets import DatasetError, load_prompts

AIME = Path(__file__).resolve().parents[1] / "data" / "aime24.jsonl"  # shipped with the repository


class CharTokenizer:
    """A real callable with the Hugging Face tokenizer signature used by load_prompts."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) % 251 for c in text]}


def test_aime_layout_loads_with_template():
    prompts = load_prompts(AIME, CharTokenizer(), "Q: {problem}\nAnswer:", "problem", "answer")
    assert len(prompts) == 30
    assert prompts[0].answer == "204" and prompts[0].task == "math"
    ids = unpack_i32(prompts[0].token_ids).tolist()
    assert ids[0] == 1 and len(ids) > 50


def test_dapo_layout_from_parquet_with_dotted_fields(tmp_path):
    rows = [
        {"prompt": "What is 1+1?", "reward_model": {"ground_truth": "2"}},
        {"prompt": "What is 2+2?", "reward_model": {"ground_truth": "4"}},
    ]
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    prompts = load_prompts(path, CharTokenizer(), "{problem}", "prompt", "reward_model.ground_truth")
    assert [p.answer for p in prompts] == ["2", "4"]


def test_row_without_answer_is_rejected_by_name(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(r)
            for r in [{"id": "a", "problem": "x", "answer": "1"}, {"id": "b", "problem": "y", "answer": ""}]
        )
    )
    with pytest.raises(DatasetError, match=r"row 1 \(id=b\) has no answer"):
        load_prompts(path, CharTokenizer(), "{problem}", "problem", "answer")


def test_malformed_json_row_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"problem": "x", "answer": "1"}\n{not json\n')
    with pytest.raises(DatasetError, match="row 1 is not valid JSON"):
        load_prompts(path, CharTokenizer(), "{problem}", "problem", "answer")


def test_shipped_aime_file_is_found_from_any_working_directory(tmp_path, monkeypatch):
    from async_vapo.tasks.datasets import read_rows

    monkeypatch.chdir(tmp_path)
    rows = read_rows("data/aime24.jsonl")
    assert len(rows) == 30 and all(str(r["answer"]).strip() for r in rows)
