"""Defects found in a third review of the data path: each test failed before its fix."""

import json

import pytest

from deltatune.cli import main
from deltatune.data.formats import read_records
from deltatune.data.instructions.filter import FilterOptions, filter_records
from deltatune.data.instructions.from_labels import load_task
from deltatune.data.pipeline import prepare_dataset, prepare_records
from deltatune.errors import ConfigError, DataError


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# ---------------------------------------------------------------- lone surrogates


def test_a_lone_surrogate_in_a_record_is_a_data_error_naming_line_and_field(tmp_path, tiny_tok, capsys):
    """JSON may escape half of a UTF-16 pair ("\\ud83d", an emoji cut in two); Python reads it as a str that is
    no valid Unicode. It crashed the batched Rust tokenizer (TypeError, no file or line, --skip-bad no help),
    and `data filter` / `data mix` at the very end (UnicodeEncodeError while writing --out)."""
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"instruction": "fine", "output": "ok"}\n{"instruction": "cut emoji \\ud83d", "output": "b"}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as exc:
        prepare_dataset(data, tiny_tok, template="chatml")
    assert str(exc.value).startswith(f"{data}:2: field 'instruction': ")
    kept = prepare_dataset(data, tiny_tok, template="chatml", skip_bad=True)
    assert kept.report.kept == 1 and kept.report.skipped_bad == 1
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x\udc00"}]}]
    with pytest.raises(DataError, match=r"field 'messages\[1\]\.content'"):
        prepare_records(chat, tiny_tok)
    out = tmp_path / "out.jsonl"
    assert main(["data", "filter", "--data", str(data), "--out", str(out)]) == 2
    _one_line_error(capsys, f"{data}:2")
    assert not out.exists()


def test_from_labels_refuses_a_cell_with_a_lone_surrogate_before_writing(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "good", "label": 1}\n{"text": "bad \\udc00", "label": 0}\n', encoding="utf-8")
    task = tmp_path / "task.yaml"
    task.write_text("templates: ['Classify: {text}']\nlabels: [negative, positive]\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["data", "from-labels", "--data", str(data), "--task", str(task), "--out", str(out)]) == 2
    _one_line_error(capsys, f"{data}:2", "'text'")
    assert not out.exists()


# ---------------------------------------------------------------- the tokenizer's own template

ALTERNATING_ONLY = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
)


def test_a_record_the_chat_template_refuses_is_a_data_error_naming_it_and_can_be_skipped(tmp_path, tiny_tok):
    """Templates like Llama-2's and Mistral's raise for roles that do not alternate: one such record in a file
    stopped the load with a ConfigError naming only --template (not the record), which --skip-bad could not skip."""
    tiny_tok.chat_template = ALTERNATING_ONLY
    ok = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    two_users = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "c"}] + ok["messages"][1:]}
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(ok) + "\n" + json.dumps(two_users) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        prepare_dataset(data, tiny_tok, template="tokenizer")
    assert str(exc.value).startswith(f"{data}:2: ") and "roles must alternate" in str(exc.value)
    got = prepare_dataset(data, tiny_tok, template="tokenizer", skip_bad=True)
    assert got.report.kept == 1 and got.report.skipped_bad == 1
    assert got.examples[0].source == f"{data}:1"


# ---------------------------------------------------------------- outputs of `deltatune data`


def test_data_outputs_that_cannot_be_written_are_one_line_before_any_work(tmp_path, capsys):
    """An --out (or filter's --report) under a file was found only when writing, after all the work: a
    FileExistsError traceback, and filter had already written --out when its --report failed."""
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": f"task {i} of many", "output": "x", "text": "t", "label": 1}) + "\n"
            for i in range(3)
        ),
        encoding="utf-8",
    )
    task = tmp_path / "task.yaml"
    task.write_text("templates: ['Classify: {text}']\nlabels: [negative, positive]\n", encoding="utf-8")
    under_a_file = str(data / "out.jsonl")
    for argv in (
        ["data", "from-labels", "--data", str(data), "--task", str(task), "--out", under_a_file],
        ["data", "mix", f"{data}:1", "--n", "2", "--out", under_a_file],
        ["data", "filter", "--data", str(data), "--out", under_a_file],
        [
            "data",
            "self-instruct",
            "--seeds",
            str(data),
            "--n",
            "1",
            "--out",
            str(tmp_path / "si.jsonl"),
            "--work",
            under_a_file,
        ],
    ):
        assert main(argv) == 2, argv
        _one_line_error(capsys, under_a_file)
    out = tmp_path / "clean.jsonl"
    argv = ["data", "filter", "--data", str(data), "--out", str(out), "--report", under_a_file]
    assert main(argv) == 2
    _one_line_error(capsys, under_a_file)
    assert not out.exists()  # nothing written when the command fails


# ---------------------------------------------------------------- CSV


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_a_csv_header_that_names_a_column_twice_is_refused_not_read_as_its_last_cell(tmp_path, tiny_tok, suffix, sep):
    """pyarrow reads both columns, but a row becomes a dict: the first 'output' cell was silently dropped and
    the example trained on the second."""
    f = tmp_path / f"d{suffix}"
    f.write_text(sep.join(["instruction", "output", "output"]) + "\n" + sep.join(["Hi", "right", "wrong"]) + "\n")
    with pytest.raises(DataError) as exc:
        list(read_records(f))
    assert str(exc.value).startswith(f"{f}:1: field 'output': ") and "twice" in str(exc.value)
    with pytest.raises(DataError, match="twice"):
        prepare_dataset(f, tiny_tok, template="alpaca", skip_bad=True)  # the whole file is unreadable


# ---------------------------------------------------------------- data filter


def test_prompts_without_words_are_not_near_duplicates_of_each_other(tmp_path):
    """Texts with no word character ("?", "!", an emoji) have no word 3-gram; two empty sets had Jaccard 1.0,
    so every such record was dropped as a near duplicate (similarity 1.00) of the first."""
    data = tmp_path / "d.jsonl"
    prompts = ["?", "!", "\U0001f600", "What is 2 + 3?"]
    data.write_text("".join(json.dumps({"instruction": p, "output": "x"}) + "\n" for p in prompts), encoding="utf-8")
    kept, report = filter_records(data, FilterOptions(near="minhash"))
    assert [r["instruction"] for r in kept] == prompts
    assert report.dropped == {}
    # an exact repeat is still an exact duplicate
    data.write_text("".join(json.dumps({"instruction": p, "output": "x"}) + "\n" for p in ["?", " ?"]))
    kept, report = filter_records(data, FilterOptions(near="minhash"))
    assert len(kept) == 1 and report.dropped == {"exact_duplicate": 1}


# ---------------------------------------------------------------- data from-labels


def test_two_task_labels_that_are_one_label_as_text_are_refused(tmp_path):
    """Labels compare as text, so YAML keys 1 and '1' (or 0 and ' 0') are one label: the second word silently
    replaced the first, in the outputs and in {options}."""
    task = tmp_path / "task.yaml"
    task.write_text("templates: ['Classify: {text}']\nlabels: {0: negative, 1: positive, '1': good}\n")
    with pytest.raises(ConfigError) as exc:
        load_task(task)
    assert str(exc.value).startswith(f"{task}: field 'labels.1': ") and "twice" in str(exc.value)
    task.write_text("templates: ['Classify: {text}']\nlabels: {0: negative, ' 0': zero}\n")
    with pytest.raises(ConfigError, match="twice"):
        load_task(task)


def test_a_json_file_holding_one_chat_record_is_that_record(tmp_path, tiny_tok):
    """`{"messages": [...]}` in a .json file is one chat record, not an object whose one array is the records
    (each message was read as a record: "cannot tell the format from fields ['content', 'role']")."""
    from deltatune.data.pipeline import prepare_dataset

    path = tmp_path / "one.json"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})
    )
    data = prepare_dataset(str(path), tiny_tok, template="chatml")
    assert data.report.read == 1 and data.report.kept == 1 and data.examples[0].source == f"{path}:1"
    records = tmp_path / "many.json"  # an object holding one array of records still reads as before
    records.write_text(json.dumps({"data": [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]}))
    assert prepare_dataset(str(records), tiny_tok, template="chatml").report.kept == 2


def test_records_in_an_object_holding_one_array_are_named_by_their_line(tmp_path, tiny_tok):
    """docs/data.md: errors name the line where the record opens; for `{"data": [...]}` they named only the index."""
    from deltatune.data.pipeline import prepare_dataset
    from deltatune.errors import DataError

    path = tmp_path / "obj.json"
    path.write_text(
        '{\n  "name": "a [set]",\n  "data": [\n    {"instruction": "a", "output": "b"},\n'
        + '    {"instruction": "c",\n     "output": ""}\n  ]\n}\n'
    )
    with pytest.raises(DataError, match=r"obj\.json:5: field 'output': empty"):
        prepare_dataset(str(path), tiny_tok, template="chatml")
    data = prepare_dataset(str(path), tiny_tok, template="chatml", skip_bad=True)
    assert data.examples[0].source == f"{path}:4"


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_nested_too_deeply_is_one_line_and_a_bom_alone_on_the_first_line_is_no_record(tmp_path, tiny_tok, suffix):
    from deltatune.data.pipeline import prepare_dataset
    from deltatune.errors import DataError

    deep = tmp_path / f"deep{suffix}"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match="nested too deeply"):
        prepare_dataset(str(deep), tiny_tok, template="chatml")
    if suffix == ".jsonl":
        bom = tmp_path / "bom.jsonl"
        bom.write_bytes(b"\xef\xbb\xbf\n" + json.dumps({"instruction": "a", "output": "b"}).encode() + b"\n")
        assert prepare_dataset(str(bom), tiny_tok, template="chatml").report.kept == 1


SMOLLM_LIKE_TEMPLATE = (  # SmolLM2's shape: a default system prompt when the messages bring none
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}"
    "{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_the_default_template_trains_on_the_prompt_inference_renders():
    """`generate`, eval's chat style and `serve` render prompts with the tokenizer's chat template; the training
    default was `chatml`, which left out the default system prompt those add (SmolLM2's). The default is now
    `auto`: the model's own template where it has one, so training and inference see the same text."""
    from deltatune.config import TrainConfig
    from deltatune.data.pipeline import prepare_records
    from deltatune.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = SMOLLM_LIKE_TEMPLATE
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    data = prepare_records([{"messages": messages}], tok, keep_offsets=True)
    assert data.template == "tokenizer"
    assert data.examples[0].text == tok.apply_chat_template(messages, tokenize=False)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert data.examples[0].text.startswith(prompt)  # what generate/serve feed the model, then the answer
    assert TrainConfig.model_fields["template"].default == "auto"
    tok.chat_template = None  # no chat template: ChatML where the tokenizer has its tokens, as before
    assert prepare_records([{"messages": messages}], tok).template == "chatml"
