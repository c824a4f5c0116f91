"""Review of the instruction-data builders: plain-text files in the filter, one-line errors for bad inputs."""

import json

import pytest

from deltatune.cli import main
from deltatune.data.instructions.filter import FilterOptions, filter_records
from deltatune.data.instructions.from_labels import load_task
from deltatune.data.instructions.self_instruct import SelfInstructConfig, model_generator, run_self_instruct
from deltatune.data.instructions.self_instruct_text import Task
from deltatune.errors import ConfigError, UserError

DOCS = [
    "The harbour was quiet in the early morning, with fishing boats tied along the old stone pier.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside green leaves.",
    "  the HARBOUR was quiet in the early morning, with fishing boats tied along the old stone pier.",
    "A binary search halves the interval at every step, so it needs about log2(n) comparisons.",
]


@pytest.mark.parametrize("near", ["minhash", "rouge", "none"])
def test_filter_keeps_distinct_plain_text_documents_under_the_default_on_prompt(tmp_path, near):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS), encoding="utf-8")
    kept, report = filter_records(data, FilterOptions(near=near))  # --on prompt, the default
    assert kept == [{"text": DOCS[0]}, {"text": DOCS[1]}, {"text": DOCS[3]}]  # only the real repeat goes
    assert report.dropped == {"exact_duplicate": 1}
    assert report.examples[0]["source"] == f"{data}:3" and report.examples[0]["duplicate_of"] == f"{data}:1"


def test_filter_cli_on_plain_text_keeps_every_distinct_document(tmp_path, capsys):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS), encoding="utf-8")
    out = tmp_path / "clean.jsonl"
    assert main(["data", "filter", "--data", str(data), "--out", str(out)]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3


def test_task_file_that_is_a_folder_or_not_utf8_is_a_one_line_error(tmp_path, capsys):
    folder = tmp_path / "tasks"
    folder.mkdir()
    with pytest.raises(ConfigError, match="folder"):
        load_task(folder)
    latin = tmp_path / "task.yaml"
    latin.write_bytes("templates: ['Classify: {text}']\nlabels: [n\xe9gatif, positif]\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8") as exc:
        load_task(latin)
    assert exc.value.line == 2
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "good", "label": 1}) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    for task in (folder, latin):
        assert main(["data", "from-labels", "--data", str(data), "--task", str(task), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and str(task) in err
    assert not out.exists()


def test_self_instruct_bad_limits_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError, match="max-rounds"):
        SelfInstructConfig(n=1, max_rounds=0).check()
    with pytest.raises(ConfigError, match="max-new-tokens"):
        model_generator(None, None, max_new_tokens=0)
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        json.dumps({"instruction": "Name a colour.", "instances": [{"input": "", "output": "red"}]}) + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.jsonl"
    args = ["data", "self-instruct", "--model", str(tmp_path / "no-model"), "--seeds", str(seeds), "--n", "1"]
    assert main([*args, "--max-new-tokens", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "max-new-tokens" in err and "Traceback" not in err
    assert not out.exists()


def test_self_instruct_work_that_is_a_file_is_a_user_error(tmp_path):
    work = tmp_path / "work"
    work.write_text("mine", encoding="utf-8")

    def never(prompts, **kw):
        raise AssertionError("no generation expected")

    with pytest.raises(UserError, match="folder"):
        run_self_instruct(
            [Task("Name a colour.", [{"input": "", "output": "red"}])], never, SelfInstructConfig(n=1), work
        )
    assert work.read_text(encoding="utf-8") == "mine"
