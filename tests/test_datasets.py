"""Prompt datasets: JSONL and Parquet, templates, dotted fields, rows without answers rejected by name."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from async_vapo.protocol import unpack_i32
from async_vapo.tasks.datasets import DatasetError, addition_prompts, load_prompts

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


def _rows():
    return [json.loads(line) for line in AIME.read_text().splitlines() if line.strip()]


def test_hugging_face_sources_load_like_the_jsonl(tmp_path):
    """What users pass to `datasets`: a saved DatasetDict (split chosen), a CSV file, a directory."""
    import datasets

    want = load_prompts(AIME, CharTokenizer(), "{problem}", "problem", "answer")
    rows = _rows()
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:5])}
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    got = load_prompts(tmp_path / "saved", CharTokenizer(), "{problem}", "problem", "answer", split="test")
    assert [(p.token_ids, p.answer) for p in got] == [(p.token_ids, p.answer) for p in want[:5]]
    with pytest.raises(DatasetError, match=r"no split 'validation' \(splits: train, test\)"):
        load_prompts(
            tmp_path / "saved", CharTokenizer(), "{problem}", "problem", "answer", split="validation"
        )
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    datasets.Dataset.from_list(rows).to_csv(str(csv_dir / "aime.csv"))
    for source in (csv_dir / "aime.csv", csv_dir):  # one file, and a directory load_dataset reads
        got = load_prompts(source, CharTokenizer(), "{problem}", "problem", "answer")
        assert [p.answer for p in got] == [p.answer for p in want] and got[3].token_ids == want[3].token_ids


def test_hugging_face_source_without_an_answer_field_or_unreachable(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"problem": "1+1", "solution": "2"}]).save_to_disk(str(tmp_path / "noans"))
    with pytest.raises(DatasetError, match=r"row 0 .* has no answer in field 'answer'"):
        load_prompts(tmp_path / "noans", CharTokenizer(), "{problem}", "problem", "answer")
    with pytest.raises(DatasetError, match=r"no-such-org/no-such-set: could not load \(no such file"):
        load_prompts("no-such-org/no-such-set", CharTokenizer(), "{problem}", "problem", "answer")


def test_addition_min_digits_keeps_the_prompt_format_and_lengthens_every_solution(tmp_path):
    from async_vapo.tasks.arithmetic import AdditionTask, Problem, parse_prompt
    from async_vapo.tasks.tiny_model import build_tokenizer

    tok = build_tokenizer(tmp_path)
    wide = addition_prompts(tok, 200, 3, "p-")
    long = addition_prompts(tok, 200, 3, "p-", min_digits=5)
    # same prompt length (operands padded to 7 digits either way), so the same model reads both
    assert {len(unpack_i32(p.token_ids)) for p in long} == {len(unpack_i32(p.token_ids)) for p in wide}

    def steps(p):  # scratchpad steps of the worked solution: one per digit of the longer operand
        a, b = parse_prompt(tok.decode(unpack_i32(p.token_ids).tolist(), skip_special_tokens=True))
        return AdditionTask().solution(Problem("", a, b)).count(";")

    assert min(steps(p) for p in long) == 5 and max(steps(p) for p in long) == 7
    assert min(steps(p) for p in wide) == 1


def test_paper_recipe_reads_its_training_and_held_out_layouts(tmp_path):
    """configs/vapo_qwen2.5_32b.yaml trains on DAPO-Math-17k's layout (a chat message list, the answer
    under reward_model) and evaluates on AIME 2024's (bare problem / answer): both through the learner's
    own prompt building, the held-out prompts wrapped in the recipe's instruction (it used to read AIME
    with DAPO's field names and fail at start-up)."""
    from async_vapo.config import load_config
    from async_vapo.learner.setup import build_prompts

    recipe = Path(__file__).resolve().parents[1] / "configs" / "vapo_qwen2.5_32b.yaml"
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {i}+{i}? Answer: ..."}],
            "reward_model": {"ground_truth": str(2 * i)},
        }
        for i in range(3)
    ]
    dapo = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), dapo)
    cfg = load_config(recipe, [f"data.train_file={dapo}"])
    train, held_out = build_prompts(cfg, CharTokenizer())
    assert [p.answer for p in train] == ["0", "2", "4"]
    text = "".join(chr(i) for i in unpack_i32(train[1].token_ids).tolist()[1:])
    assert text == "What is 1+1? Answer: ..."
    assert len(held_out) == 30 and held_out[0].answer == "204"
    text = "".join(chr(i) for i in unpack_i32(held_out[0].token_ids).tolist()[1:])
    assert text.startswith("Solve the problem below") and "Every morning Aya" in text


def test_chat_templates_render_text_and_message_list_prompts(tmp_path):
    """``data.chat_template``: a text prompt becomes the user message, a message-list prompt (the DAPO
    layout's ``prompt``) is the conversation; the system prompt goes first, the generation prompt last.
    ``auto`` follows the tokenizer; ``true`` without a template is an error; a message list without a
    template is an error naming the row (it used to be formatted as a Python list)."""
    from transformers import AutoTokenizer

    from async_vapo.tasks.datasets import chat_format
    from tests.helpers import chat_tokenizer

    chat_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")  # the template survives save / load
    rows = [
        {"q": "1+2", "prompt": [{"role": "user", "content": "Add 3 and 4."}], "answer": "3"},
        {"q": "5+5", "prompt": [{"role": "system", "content": "Own."}, {"role": "user", "content": "Hi"}],
         "answer": "10"},
    ]  # fmt: skip
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = chat_format("auto", tok, system_prompt="Be brief.")
    assert chat is not None

    def texts(prompts):
        return [tok.decode(unpack_i32(p.token_ids).tolist()) for p in prompts]

    assert texts(load_prompts(data, tok, "Q: {problem}", "q", "answer", chat=chat)) == [
        "<system>Be brief.\n<user>Q: 1+2\n<assistant>",
        "<system>Be brief.\n<user>Q: 5+5\n<assistant>",
    ]
    assert texts(load_prompts(data, tok, "{problem}", "prompt", "answer", chat=chat)) == [
        "<system>Be brief.\n<user>Add 3 and 4.\n<assistant>",
        "<system>Own.\n<user>Hi\n<assistant>",  # the data's own system message is kept
    ]
    assert chat_format(False, tok) is None
    assert texts(load_prompts(data, tok, "Q: {problem}", "q", "answer", chat=None)) == ["Q: 1+2", "Q: 5+5"]
    with pytest.raises(DatasetError, match="row 0: the prompt field holds a message list"):
        load_prompts(data, tok, "{problem}", "prompt", "answer", chat=None)
    plain = CharTokenizer()
    assert chat_format("auto", plain) is None
    with pytest.raises(DatasetError, match=r"data\.chat_template is true but the tokenizer"):
        chat_format(True, plain)
