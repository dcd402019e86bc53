"""A user's own task through the launcher: their JSONL (a chat message list per row and a field the reward
reads), a graded Python reward summed with a binary one, and an instruct-style tokenizer with a chat
template of its own; it trains on CPU, every reward is within the declared range and none is refused."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.test_e2e import launch, rows

pytestmark = pytest.mark.slow

# renders [{"role": "user", "content": "0000012+0000030="}] as "<s>0000012+0000030=": the tiny model's own
# prompt, so the model can answer it; "<s>" is its BOS token
TEMPLATE = "<s>{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_own_jsonl_graded_reward_and_chat_template_train_through_the_launcher(tiny_model_dir, tmp_path):
    from async_vapo.tasks.arithmetic import AdditionTask

    model = tmp_path / "instruct"
    shutil.copytree(tiny_model_dir, model)
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "chat_template": TEMPLATE}))
    task = AdditionTask()
    data = tmp_path / "mine.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": p.uid, "messages": [{"role": "user", "content": task.prompt(p)}],
                        "answer": p.answer, "bonus": i % 2 == 0}) + "\n"
            for i, p in enumerate(task.problems(96, seed=5, prefix="mine-"))
        )
    )  # fmt: skip
    out = tmp_path / "run"
    run = launch(
        out,
        f"model.path={model}",
        "data.task=math",
        f"data.train_file={data}",
        f"data.eval_file={data}",
        "data.prompt_field=messages",
        "data.extra_fields=[bonus]",
        "data.verifiers=[tests.verifier_fixtures:graded, addition]",
        "data.verifier_weights=[1.0, 0.5]",
        "train.total_steps=2",
        "train.save_optimizer=false",  # checkpoints of the trained weights, no DeepSpeed state
    )
    assert run.returncode == 0, run.stderr[-4000:]
    train = [r for r in rows(out) if r["phase"] == "train"]
    assert [r["step"] for r in train] == [0, 1]
    counters = train[-1]["controller_counters"]
    assert counters["group_admitted"] >= 16 and not any(k.startswith("group_rejected") for k in counters)
    # graded: weighted rewards in [1.0 x -1 + 0.5 x 0, 1.0 x 2 + 0.5 x 1] = [-1, 2.5], not just 0 / 1
    assert all(-1.0 <= r["reward_mean"] <= 2.5 for r in train)
    assert any(r["reward_mean"] < 0 for r in train), [r["reward_mean"] for r in train]
    # the exported policy keeps the tokenizer whole: its chat template included
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(out / "checkpoints" / "step_2" / "hf")
    assert exported.chat_template == TEMPLATE
    saved = {p.name for p in (out / "checkpoints" / "step_2").iterdir()}
    assert "weights" in saved and not saved & {"policy", "value"}, saved


def test_pre_flight_reads_the_first_rows_and_scores_them_with_every_verifier(tmp_path):
    """Before anything starts: a field the rows lack, a template that cannot be filled, or a verifier
    whose call fails on the rows (here: it needs a row field that data.extra_fields does not send) is a
    launch error naming it, instead of minutes of reward 0."""
    from async_vapo.config import load_config
    from async_vapo.launch.cli import preflight_data

    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(json.dumps({"q": f"{i}+1=", "a": str(i + 1), "unit": "m"}) + "\n" for i in range(6))
    )
    base = ["data.task=math", f"data.train_file={data}", "data.prompt_field=q", "data.answer_field=a"]

    def check(*over):
        return preflight_data(load_config(None, [*base, *over]))

    assert check("data.verifier=addition") is None
    assert "row 0 has no field 'answer'" in check("data.answer_field=answer")
    assert "the prompt template cannot be filled (KeyError" in check("data.prompt_template={problem} {topic}")
    why = check("data.verifier=tests.verifier_fixtures:needs_unit")
    assert why is not None and "fails on row 0" in why and "error: TypeError" in why
    assert check("data.verifier=tests.verifier_fixtures:needs_unit", "data.extra_fields=[unit]") is None
