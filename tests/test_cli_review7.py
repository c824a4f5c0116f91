"""Review 7 of the command line and the Python API: what a careless user types gets one line, naming the file
and the key or flag they gave; the Python API checks what `deltatune eval` checks."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune
from deltatune.cli import main
from deltatune.data.pipeline import prepare_dataset
from deltatune.errors import ConfigError, DataError, UserError
from deltatune.models import save_model
from deltatune.testing import tiny_model, tiny_tokenizer


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_config_key_that_is_not_a_name_is_one_line(tmp_path, capsys):
    # `1: 2` reached TrainConfig(**...) as "TypeError: keywords must be strings"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("1: 2\n")
    assert main(["train", str(cfg)]) == 2
    assert f"{cfg}: the key 1 is not a name" in _one_error_line(capsys)


def test_a_setting_training_checks_is_named_as_the_config_files_key(tiny_dir, data_file, tmp_path, capsys):
    # "field '--policy'" blamed a flag never given; the file that gave it went unnamed
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_dir}\ndata: {data_file}\noutput: {tmp_path / 'run'}\npolicy: weightd:0.1\n")
    assert main(["train", str(cfg)]) == 2
    assert f"{cfg}: field 'policy': only 'weighted' takes" in _one_error_line(capsys)
    assert main(["train", str(cfg), "--policy", "weightd:0.1"]) == 2  # given as a flag: the flag's error
    assert "field '--policy'" in _one_error_line(capsys)


def test_a_two_phase_policy_switching_at_zero_is_refused():
    # its first phase never trains, and `preview` showed that phase
    from deltatune.data.masking import parse_policy

    with pytest.raises(ConfigError, match="switches at 0"):
        parse_policy("response->instruction@0")


def test_limit_counts_the_examples_kept_not_the_records_read(tmp_path):
    # two records too long for max_len, then three that fit: --limit 1 said "none of its 1 records is left"
    long = {"instruction": "word " * 200, "output": "x"}
    rows = [long, long] + [{"instruction": f"What is {i}?", "output": f"It is {i}."} for i in range(3)]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    got = prepare_dataset(data, tiny_tokenizer(), template="chatml", max_len=40, overflow="drop", limit=2)
    assert len(got.examples) == 2 and got.report.dropped_too_long == 2 and got.report.read == 4
    with pytest.raises(ConfigError, match="at least 1"):
        prepare_dataset(data, tiny_tokenizer(), limit=0)
    with pytest.raises(ConfigError, match="expected a tokenizer"):
        prepare_dataset(data, None)


def test_stats_with_nothing_left_to_train_says_so(tmp_path, capsys):
    # its report said "kept 2, truncated 0" and it advised a policy for a dataset of which nothing trains
    data = _jsonl(tmp_path / "d.jsonl", [{"instruction": "word " * 50, "output": "x"}] * 2)
    assert main(["stats", "--data", str(data), "--tokenizer", "tiny", "--template", "chatml", "--max-len", "10"]) == 2
    assert "none of its 2 examples would train at --max-len 10" in _one_error_line(capsys)


def test_upcycle_has_the_overwrite_its_error_names(tmp_path, capsys):
    save_model(tiny_model(), tiny_tokenizer(), tmp_path / "dense")
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "old.txt").write_text("old")
    args = ["upcycle", "--model", str(tmp_path / "dense"), "--experts", "4", "--out", str(tmp_path / "moe")]
    assert main(args) == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert main([*args, "--overwrite"]) == 0
    assert (tmp_path / "moe" / "upcycle.json").exists() and not (tmp_path / "moe" / "old.txt").exists()


def test_a_bad_save_dtype_names_save_dtype(tmp_path, capsys):
    save_model(tiny_model(), tiny_tokenizer(), tmp_path / "base")
    model, _ = deltatune.load_model(str(tmp_path / "base"))
    deltatune.apply(model, "lora", rank=2).save_adapter(tmp_path / "adapter")
    args = ["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m"), "--save-dtype", "int8"]
    assert main(args) == 2
    assert "field 'save-dtype': unknown dtype 'int8'" in _one_error_line(capsys)


def test_a_column_mapped_twice_is_refused(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"a": "q", "output": "x"}])
    assert main(["preview", "--data", str(data), "--tokenizer", "tiny", "--map", "a=instruction,a=input"]) == 2
    assert "maps the column 'a' twice" in _one_error_line(capsys)


def test_more_threads_than_four_per_core_are_refused(tiny_dir, data_file, tmp_path, capsys):
    args = ["train", "--model", str(tiny_dir), "--data", str(data_file), "--output", str(tmp_path / "run")]
    assert main([*args, "--set", "num_threads=100000"]) == 2
    assert "100000 threads on a machine with" in _one_error_line(capsys)


def test_generate_with_a_vanishing_temperature_decodes_greedily(tmp_path, capsys):
    # logits / 1e-45 overflowed to inf: the answer was "!" where greedy says something else
    model = tiny_model(0, initializer_range=0.2)
    save_model(model, tiny_tokenizer(), tmp_path / "m")
    args = ["generate", "--model", str(tmp_path / "m"), "--prompt", "hi there", "--max-new-tokens", "8"]
    assert main([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*args, "--temperature", "1e-45"]) == 0
    assert capsys.readouterr().out == greedy


def test_the_python_evaluate_checks_what_deltatune_eval_checks(tmp_path):
    model, tok = tiny_model(0), tiny_tokenizer()
    data = _jsonl(tmp_path / "q.jsonl", [{"question": f"What is {i}?", "answer": f"It is {i}."} for i in range(4)])
    by_column = deltatune.evaluate(
        model, tok, f"loss:{data}", field_map={"question": "instruction", "answer": "output"}
    )
    by_field = deltatune.evaluate(model, tok, f"loss:{data}", field_map={"instruction": "question", "output": "answer"})
    as_text = deltatune.evaluate(model, tok, f"loss:{data}", field_map="question=instruction,answer=output")
    scores = {r[f"loss:{data}"].score for r in (by_column, by_field, as_text)}
    assert len(scores) == 1 and torch.isfinite(torch.tensor(scores.pop()))
    for bad, field in ((dict(limit=-1), "limit"), (dict(batch_size=0), "batch_size"), (dict(shots=-1), "shots")):
        with pytest.raises(UserError, match=f"field '{field}'"):
            deltatune.evaluate(model, tok, f"loss:{data}", **bad)
    with pytest.raises(UserError, match="field 'choice_mode'"):
        deltatune.evaluate(model, tok, f"loss:{data}", choice_mode="letters")
    with pytest.raises(ConfigError, match="needs a torch model"):
        deltatune.evaluate(str(tmp_path), tok, f"loss:{data}")


def test_json_lines_in_a_json_file_are_read_as_datasets_writes_them(tmp_path):
    # `datasets.Dataset.to_json` writes JSON Lines under .json: "not valid JSON (Extra data ...)"
    from datasets import Dataset

    rows = [{"instruction": f"What is {i}?", "output": f"It is {i}."} for i in range(3)]
    Dataset.from_list(rows).to_json(str(tmp_path / "d.json"))
    got = prepare_dataset(tmp_path / "d.json", tiny_tokenizer(), template="chatml")
    assert got.report.kept == 3
    (tmp_path / "bad.json").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"bad.json:2"):
        prepare_dataset(tmp_path / "bad.json", tiny_tokenizer(), template="chatml")


def test_a_file_given_for_a_folder_is_called_a_file(tmp_path, capsys):
    # "no such run folder" for a path that exists, as a file
    (tmp_path / "train.jsonl").write_text("{}\n")
    assert main(["analyze", "--run", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "a")]) == 2
    assert "is a file, not a run folder" in _one_error_line(capsys)
    assert main(["generate", "--adapter", str(tmp_path / "train.jsonl"), "--prompt", "hi"]) == 2
    assert "is a file, not an adapter folder" in _one_error_line(capsys)


def test_field_map_dicts_read_in_both_directions_and_field_named_columns(tmp_path):
    # a file whose columns are `prompt` and `completion` maps field to field: {"instruction": "prompt", ...} was
    # refused once dicts went through --map's parser
    model, tok = tiny_model(0), tiny_tokenizer()
    data = _jsonl(tmp_path / "q.jsonl", [{"prompt": f"What is {i}?", "completion": f"It is {i}."} for i in range(4)])
    got = deltatune.evaluate(model, tok, f"loss:{data}", field_map={"instruction": "prompt", "output": "completion"})
    assert torch.isfinite(torch.tensor(got[f"loss:{data}"].score))
    with pytest.raises(ConfigError, match="field_map"):
        deltatune.evaluate(model, tok, f"loss:{data}", field_map={"a": "b"})


def test_pretty_printed_objects_back_to_back_are_not_read_as_json_lines(tmp_path):
    # the JSON Lines fallback blamed line 1 of a file whose first object spans lines
    (tmp_path / "x.json").write_text('{\n  "instruction": "a",\n  "output": "b"\n}\n{\n  "instruction": "c"\n}\n')
    with pytest.raises(DataError, match=r"x.json:5: not valid JSON \(Extra data"):
        prepare_dataset(tmp_path / "x.json", tiny_tokenizer(), template="chatml")


def test_a_flags_field_is_named_as_the_config_key_it_sets():
    # `--format` and `--threads` set data_format and num_threads: their errors named keys that do not exist
    from deltatune.cli.train import in_config_file

    err = in_config_file(ConfigError("bad", field="--format"), "c.yaml", {"data_format"})
    assert (err.file, err.field) == ("c.yaml", "data_format")
    err = in_config_file(ConfigError("bad", field="options.rank"), "c.yaml", {"method_options"})
    assert err.field == "method_options.rank"
    assert in_config_file(ConfigError("bad", field="--threads"), "c.yaml", {"lr"}).file is None  # not the file's
