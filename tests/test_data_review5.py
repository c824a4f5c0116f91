"""Review 5 of the data commands: an answer of weight 0 stays context through `data mix` and behind a chat
template's generated preamble, `from-labels` phrasings with a format spec, self-instruct resumes with other
generation settings, `preview --skip-bad --limit`, and the mixed-format error of `filter` and `mix`."""

import json

import pytest

from deltatune.cli import main
from deltatune.data.instructions.mix import MixSource, mix
from deltatune.data.instructions.rows import read_instruction_records
from deltatune.data.masking import LossPolicy, policy_weights
from deltatune.data.pipeline import prepare_records
from deltatune.data.segments import Role
from deltatune.errors import UserError

CONTEXT_ANSWER = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "A bad answer, do not learn it", "weight": 0},
        {"role": "user", "content": "Try again"},
        {"role": "assistant", "content": "A good answer"},
    ]
}


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_mixing_formats_keeps_an_answer_of_weight_0_as_context(tmp_path):
    """Converting to chat dropped `"weight": 0`: the answer the user marked as context became a target."""
    chat = _jsonl(tmp_path / "chat.jsonl", [CONTEXT_ANSWER])
    alpaca = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Say hello", "output": "hello"}])
    picked, _ = mix([MixSource(str(chat), 0.5), MixSource(str(alpaca), 0.5)], n=2, seed=0)
    mixed = next(r for r in picked if len(r["messages"]) == 4)
    assert [m.get("weight") for m in mixed["messages"]] == [None, 0, None, None]
    written = _jsonl(tmp_path / "mixed.jsonl", [mixed])
    (_, conv), *_ = read_instruction_records(written)[0]
    assert [m.parts[0][0] for m in conv.messages] == [Role.INSTRUCTION, Role.CONTEXT, Role.INSTRUCTION, Role.RESPONSE]


def _preamble_tokenizer():
    """A Qwen3-like template: an empty think block written before the last answer (the model writes it at
    inference, after the generation prompt)."""
    from deltatune.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def test_a_generated_preamble_before_an_answer_of_weight_0_carries_no_loss():
    """The preamble was always a response: a record whose only answer has weight 0 kept 17 loss-bearing tokens
    (the think block) instead of being dropped as having none."""
    tok = _preamble_tokenizer()
    only_context = {"messages": [{"role": "user", "content": "Hi"}, CONTEXT_ANSWER["messages"][1]]}
    data = prepare_records([only_context], tok, template="tokenizer", skip_bad=True)
    assert data.examples == [] and data.report.dropped_no_loss == 1
    learned = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Fine"}]}
    (example,) = prepare_records([learned], tok, template="tokenizer", keep_offsets=True).examples
    weights = policy_weights(example, LossPolicy("response"))
    text = tok.decode([t for t, w in zip(example.input_ids, weights) if w > 0])
    assert text.startswith("<think>") and text.endswith("Fine<|im_end|>")  # still learned before a target


@pytest.mark.parametrize("phrasing, written", [("Review: {text:d}", "{text:d}"), ("Review: {text!r}", "{text!r}")])
def test_a_phrasing_with_a_format_spec_or_conversion_is_one_line(tmp_path, capsys, phrasing, written):
    """'{text:d}' stopped with a ValueError traceback on the first row; '{text!r}' put Python quotes in."""
    data = tmp_path / "reviews.csv"
    data.write_text('text,label\n"Great phone",1\nBroke fast,0\n')
    task = tmp_path / "task.yaml"
    task.write_text(
        json.dumps({"name": "sentiment", "templates": [phrasing], "labels": {"0": "negative", "1": "positive"}})
    )
    out = tmp_path / "out.jsonl"
    assert main(["data", "from-labels", "--data", str(data), "--task", str(task), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{task}: field 'templates[0]': placeholder {written} takes no conversion or format" in err, err
    assert "Traceback" not in err and not out.exists()


def test_self_instruct_resume_refuses_other_generation_settings(tmp_path):
    from deltatune.data.instructions.self_instruct import SETTINGS, SelfInstructConfig, _Progress, _settings

    config = SelfInstructConfig(n=2)
    first = {"max_new_tokens": 8, "temperature": 0.7, "dtype": "fp32"}
    work = _Progress(tmp_path / "work")
    work.start(_settings(config, [], "m", first), resume=False)
    (tmp_path / "work" / SETTINGS).write_text(json.dumps(_settings(config, [], "m", first)))
    with pytest.raises(UserError, match=r"other settings \(generation\)"):
        work.start(_settings(config, [], "m", {**first, "temperature": 0.0}), resume=True)
    assert work.start(_settings(config, [], "m", first), resume=True) == []
    legacy = _settings(config, [], "m", first)
    del legacy["generation"]  # written before the generation settings were recorded: resumes as before
    (tmp_path / "work" / SETTINGS).write_text(json.dumps(legacy))
    assert work.start(_settings(config, [], "m", first), resume=True) == []


def test_the_cli_records_the_generation_settings(tmp_path, tiny_dir, capsys):
    seeds = _jsonl(
        tmp_path / "seeds.jsonl",
        [
            {
                "id": f"seed_task_{i}",
                "name": f"t{i}",
                "instruction": f"Write a sentence about the number {i}.",
                "is_classification": False,
                "instances": [{"input": "", "output": f"{i} is a number."}],
            }
            for i in range(3)
        ],
    )
    common = ["data", "self-instruct", "--model", str(tiny_dir), "--seeds", str(seeds), "--n", "1"]
    common += ["--max-rounds", "1", "--prompts-per-round", "1", "--out", str(tmp_path / "o.jsonl")]
    main([*common, "--max-new-tokens", "4", "--temperature", "0.7"])
    settings = json.loads((tmp_path / "o.jsonl.work" / "settings.json").read_text())
    assert settings["generation"] == {"max_new_tokens": 4, "temperature": 0.7, "dtype": "fp32"}
    capsys.readouterr()
    assert main([*common, "--max-new-tokens", "64", "--temperature", "0", "--resume"]) == 2
    assert "other settings (generation)" in capsys.readouterr().err


def test_preview_limit_counts_usable_records_not_skipped_ones(tmp_path, capsys):
    bad = {"instruction": "", "output": "x"}
    data = _jsonl(tmp_path / "d.jsonl", [bad, bad, bad, {"instruction": "Say hi", "output": "hi"}])
    code = main(["preview", "--tokenizer", "tiny", "--data", str(data), "--template", "chatml", "--skip-bad"])
    assert code == 0, capsys.readouterr().err
    assert "Say hi" in capsys.readouterr().out
    prepared = prepare_records(
        [bad, {"instruction": "A", "output": "a"}, {"instruction": "B", "output": "b"}],
        _tok(),
        template="chatml",
        skip_bad=True,
        limit=1,
    )
    assert len(prepared.examples) == 1 and prepared.report.skipped_bad == 1


def _tok():
    from deltatune.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.mark.parametrize("command", ["filter", "mix"])
def test_filter_and_mix_name_a_record_of_another_format(tmp_path, capsys, command):
    data = _jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hi", "output": "hi"}, CONTEXT_ANSWER])
    source = str(data) if command == "filter" else f"{data}:1"
    args = ["data", command, "--data", source] if command == "filter" else ["data", "mix", source, "--n", "2"]
    assert main([*args, "--out", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert (
        f"{data}:2: field 'messages': a chat record (messages) in a file whose first record (line 1) is alpaca" in err
    )


def test_a_threshold_with_no_near_duplicate_test_is_one_line(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hi", "output": "hi"}])
    out = tmp_path / "out.jsonl"
    args = ["data", "filter", "--data", str(data), "--near", "none", "--threshold", "0.5", "--out", str(out)]
    assert main(args) == 2
    assert "field '--threshold': has no effect with --near none" in capsys.readouterr().err and not out.exists()
