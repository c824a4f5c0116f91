"""Review of evaluation (fourth pass): each test failed before its fix."""

from __future__ import annotations

import json

import pytest

from deltatune.errors import UserError
from deltatune.evaluate.tasks import parse_field_map

GSM8K_STYLE = [
    {"question": "What is 2 + 3?", "answer": "5"},
    {"question": "Say fox", "answer": "the fox"},
]


def _loss_of(capsys, main, model_dir, data, *extra) -> float:
    assert main(["eval", "--model", str(model_dir), "--task", f"loss:{data}", *extra, "--no-progress"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| loss:{data}"))
    return float(row.split("|")[4])


def test_map_renames_the_columns_of_a_loss_task_in_trains_direction(tmp_path, tiny_dir, capsys):
    """`--map` was ignored for loss: tasks, so a GSM8K-style file (question, answer) could not be scored as
    held-out loss; and eval took --map as FIELD=COLUMN where train, preview and stats take COLUMN=FIELD."""
    from deltatune.cli import main

    raw, renamed = tmp_path / "raw.jsonl", tmp_path / "renamed.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_STYLE))
    renamed.write_text(
        "".join(json.dumps({"instruction": r["question"], "output": r["answer"]}) + "\n" for r in GSM8K_STYLE)
    )
    want = _loss_of(capsys, main, tiny_dir, renamed)
    assert _loss_of(capsys, main, tiny_dir, raw, "--map", "question=instruction,answer=output") == want
    assert _loss_of(capsys, main, tiny_dir, raw, "--map", "instruction=question,output=answer") == want


def test_map_reads_either_direction_and_refuses_what_it_cannot_tell():
    both = {"instruction": "q", "output": "a"}
    assert parse_field_map("q=instruction,a=output") == parse_field_map("instruction=q,output=a") == both
    with pytest.raises(UserError, match="each side"):
        parse_field_map("output=instruction")
    with pytest.raises(UserError, match="COLUMN=FIELD"):
        parse_field_map("q=a")


def test_a_file_task_refuses_a_map_to_a_field_it_does_not_read(tmp_path):
    from deltatune.evaluate.tasks import resolve_task

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"conv": []}) + "\n")
    with pytest.raises(UserError, match="does not read"):
        resolve_task(f"file:{data}", None, parse_field_map("conv=messages"))
