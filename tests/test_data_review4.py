"""Review of the data side (fourth pass): each test failed before its fix."""

from __future__ import annotations

import pytest

import deltatune
from deltatune.testing import tiny_tokenizer


def _text(row, tok) -> str:
    return tok.decode(row["input_ids"])


@pytest.mark.parametrize("order", ["question first", "instruction first"])
def test_a_renamed_column_wins_over_a_field_of_the_same_name(order):
    """`--map question=instruction` on a record that also holds `instruction`: which one trained depended on the
    order of the record's keys."""
    tok = tiny_tokenizer()
    record = {"question": "what is two", "answer": "two", "instruction": "old text"}
    if order == "instruction first":
        record = {"instruction": "old text", "question": "what is two", "answer": "two"}
    row = deltatune.prepare([record], tok, template="chatml", column_map="question=instruction,answer=output")[0]
    assert "what is two" in _text(row, tok) and "old text" not in _text(row, tok)


def test_a_map_naming_one_field_for_two_columns_is_refused():
    with pytest.raises(deltatune.DataError, match="'instruction' as the target of two columns"):
        deltatune.prepare(
            [{"q": "a", "p": "b", "output": "c"}], tiny_tokenizer(), column_map="q=instruction,p=instruction"
        )


def test_an_input_of_spaces_is_no_input():
    tok = tiny_tokenizer()
    spaces = deltatune.prepare([{"instruction": "say hi", "input": "  ", "output": "hi"}], tok, template="alpaca")
    none = deltatune.prepare([{"instruction": "say hi", "output": "hi"}], tok, template="alpaca")
    assert spaces[0]["input_ids"] == none[0]["input_ids"]


def test_an_example_cut_to_nothing_is_counted_dropped_not_truncated_as_well():
    from deltatune.data.pipeline import prepare_records

    report = prepare_records(
        [{"instruction": "word " * 60, "output": "answer"}], tiny_tokenizer(), template="chatml", max_len=16
    ).report
    assert report.dropped_no_loss == 1 and report.truncated == 0 and report.kept == 0


def test_data_filter_writes_a_parquet_timestamp_column_as_text(tmp_path, capsys):
    """`data filter` / `data mix` on a Parquet file with a timestamp column ended in a TypeError traceback."""
    import datetime
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from deltatune.cli import main

    when = datetime.datetime(2026, 1, 2, 3, 4, 5)
    table = pa.table({"instruction": ["a b c", "d e f"], "output": ["x", "y"], "at": [when, when]})
    pq.write_table(table, tmp_path / "d.parquet")
    assert main(["data", "filter", "--data", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "o.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rows and rows[0]["at"] == str(when)


QWEN3_LIKE = (  # Qwen3's rule, cut down: the last answer opens with an empty think block; the generation prompt not
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_text_the_template_puts_after_the_generation_prompt_is_trained_as_the_answers():
    """Qwen3's template writes `<think>\\n\\n</think>\\n\\n` before the last answer, which inference's generation
    prompt leaves to the model: training tagged it as template (weight 0), so the model never learnt to write it."""
    tok = tiny_tokenizer()
    tok.chat_template = QWEN3_LIKE
    messages = [{"role": "user", "content": "what is two"}, {"role": "assistant", "content": "two"}]
    row = deltatune.prepare([{"messages": messages}], tok, template="tokenizer", policy="response")[0]
    trained = tok.decode([t for t, w in zip(row["input_ids"], row["loss_weights"]) if w > 0])
    assert trained.startswith("<think>") and trained.endswith("two<|im_end|>")
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    first = next(i for i, w in enumerate(row["loss_weights"]) if w > 0)
    assert tok.decode(row["input_ids"][:first]) == prompt  # what inference shows, up to the first trained token


def test_a_template_whose_generation_prompt_is_not_how_it_starts_answers_is_refused():
    tok = tiny_tokenizer()
    tok.chat_template = QWEN3_LIKE.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>bot\n{% endif %}")
    with pytest.raises(deltatune.DataError, match=r"<records>:1: .*start of message 2 .*generation prompt"):
        deltatune.prepare([{"instruction": "what is two", "output": "two"}], tok, template="tokenizer")


def test_the_tokenizer_template_decides_bos_as_at_inference():
    """A tokenizer that adds BOS to plain text, with a chat template that writes none: training prepended BOS,
    while generate and serve encode the template's text without special tokens."""
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    tok.bos_token = "<|endoftext|>"
    assert tok("hi")["input_ids"][0] == 0  # adds BOS to plain text
    messages = [{"role": "user", "content": "what is two"}, {"role": "assistant", "content": "two"}]
    row = deltatune.prepare([{"messages": messages}], tok, template="tokenizer")[0]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert row["input_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]
    chatml = deltatune.prepare([{"messages": messages}], tok, template="chatml")[0]
    assert chatml["input_ids"][0] == 0  # deltatune's own templates keep the tokenizer's BOS


@pytest.mark.parametrize("template", ["tokenizer", "auto", "chatml", "alpaca", "raw"])
def test_plain_text_records_get_the_tokenizers_bos_under_every_template(template):
    """A `{"text": ...}` record is rendered without the template, yet under `tokenizer` (what `auto` picks for a
    model with a chat template) it lost its BOS, so its first real token was never trained, and the text was
    not encoded as `generate --raw` and eval's plain prompts encode it."""
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    tok.bos_token = "<|endoftext|>"
    text = "The quick brown fox."
    row = deltatune.prepare([{"text": text}], tok, template=template, policy="response")[0]
    assert row["input_ids"] == tok(text)["input_ids"] + [tok.eos_token_id]
    assert row["loss_weights"][0] == 0 and all(w == 1 for w in row["loss_weights"][1:])


@pytest.mark.parametrize("near", ["rouge", "minhash"])
def test_filter_does_not_call_records_duplicates_for_a_shared_system_prompt(tmp_path, near):
    """Six chat records with one 36-word system prompt and six different questions: `--near rouge` dropped five as
    near duplicates (the comparison joined the system prompt to the question)."""
    import json

    from deltatune.data.instructions.filter import FilterOptions, filter_records

    system = " ".join(f"rule{i}" for i in range(36))
    questions = ["how do tides work", "name a prime above ten", "what is photosynthesis", "define entropy briefly",
                 "who wrote hamlet", "convert ten miles to kilometres"]  # fmt: skip
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": system},
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": "an answer"},
                    ]
                }
            )
            + "\n"
            for q in questions
        )  # fmt: skip
    )
    kept, report = filter_records(data, FilterOptions(near=near))
    assert len(kept) == 6, report.dropped


def test_a_csv_label_written_as_a_float_matches_the_tasks_integer_label():
    """A CSV label `1.0` (how a float column is written) was "unknown label '1.0' (the task knows 0, 1)", though the
    docs say a float column's 1.0 agrees with 1."""
    from deltatune.data.instructions.from_labels import _label_key

    assert _label_key("1.0") == _label_key(1) == _label_key(1.0) == "1"
    assert _label_key("007") == "007" and _label_key("1.5") == "1.5" and _label_key(True) == "True"


def test_yaml_boolean_label_keys_are_named_when_the_data_says_yes(tmp_path):
    """A task file with `yes:` and `no:` label keys (YAML reads them as booleans) and data saying "yes": the error
    said the task knows True, False, without saying why."""
    import json

    from deltatune.data.instructions.from_labels import build_from_labels, load_task

    (tmp_path / "task.yaml").write_text("templates: ['Is it spam? {text}']\nlabels: {yes: spam, no: ham}\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "win money", "label": "yes"}) + "\n")
    with pytest.raises(deltatune.DataError, match="quote the task's labels"):
        build_from_labels(tmp_path / "d.jsonl", load_task(tmp_path / "task.yaml"))


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
ALPACA = {"instruction": "say hi", "output": "hi"}


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (
            [ALPACA, CHAT],
            r"d.jsonl:2: field 'messages': a chat record \(messages\) in a file whose first record "
            r"\(line 1\) is alpaca \(instruction/output\): one format per file",
        ),
        ([CHAT, ALPACA], r"d.jsonl:2: field 'instruction': an alpaca record .* first record \(line 1\) is chat"),
    ],
)
def test_a_file_mixing_formats_says_so(tmp_path, records, message):
    """A file whose second record is in another format than its first: the error named a missing field of the first
    record's format ("field 'instruction': missing"), not why the record was read in that format."""
    import json

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(deltatune.DataError, match=message):
        deltatune.prepare(str(path), tiny_tokenizer(), template="chatml")
    # a format given by name keeps the plain error: the record is simply not in it
    with pytest.raises(deltatune.DataError, match="missing"):
        deltatune.prepare(
            str(path), tiny_tokenizer(), template="chatml", data_format="alpaca" if records[0] is ALPACA else "chat"
        )
    # and one bad record of the same format keeps its own error
    path.write_text(json.dumps(ALPACA) + "\n" + json.dumps({"instruction": "no output"}) + "\n")
    with pytest.raises(deltatune.DataError, match="d.jsonl:2: field 'output': missing"):
        deltatune.prepare(str(path), tiny_tokenizer(), template="chatml")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"instruction": "What? ", "output": "5"}, r"message 1 \(user\): it strips the whitespace around it"),
        ({"instruction": "What?", "output": " 5\n"}, r"message 2 \(assistant\): it strips the whitespace around it"),
    ],
)
def test_a_template_that_trims_content_names_the_message_and_the_whitespace(record, message):
    """Llama-3-style templates `| trim` each message: the refusal said only that the template "rewrites message
    content", not which message or that its surrounding whitespace was the cause."""
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | trim }}\n{% endfor %}"
    with pytest.raises(deltatune.DataError, match=message + ", so the tokens cannot be tagged; strip it in the data"):
        deltatune.prepare([record], tok, template="tokenizer")
    assert deltatune.prepare([{k: v.strip() for k, v in record.items()}], tok, template="tokenizer")  # so it trains
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper }}\n{% endfor %}"
    with pytest.raises(deltatune.DataError, match=r"rewrites the content of message 1 \(user\), so its tokens"):
        deltatune.prepare([{"instruction": "what?", "output": "5"}], tok, template="tokenizer")


def test_answers_a_template_rewrites_in_the_history_are_trained_only_as_the_last_turn():
    """Qwen3 writes an empty think block before the last answer and drops it from earlier ones: multi-turn records
    trained the earlier answers without it, after the very prompt at which the model writes it, so they taught
    answers without a think block. Such records now need the last answer alone (turns=last), where the earlier
    ones are context as the template shows them."""
    tok = tiny_tokenizer()
    tok.chat_template = QWEN3_LIKE
    chat = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"},
            {"role": "user", "content": "two"}, {"role": "assistant", "content": "2"}]  # fmt: skip
    with pytest.raises(deltatune.DataError, match=r"<records>:1: .*writes answer 2 otherwise in the history"):
        deltatune.prepare([{"messages": chat}], tok, template="tokenizer", policy="response")
    row = deltatune.prepare([{"messages": chat}], tok, template="tokenizer", policy="response,turns=last")[0]
    trained = tok.decode([t for t, w in zip(row["input_ids"], row["loss_weights"]) if w > 0])
    assert trained == "<think>\n\n</think>\n\n2<|im_end|>"
    single = deltatune.prepare([{"messages": chat[:2]}], tok, template="tokenizer", policy="response")  # one answer
    assert len(single) == 1
