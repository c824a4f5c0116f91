"""Defects found in review of the data path: each test failed before its fix."""

import pytest

from deltatune.cli import main
from deltatune.data.masking import LossPolicy
from deltatune.data.pipeline import prepare_dataset, prepare_records
from deltatune.data.preview import token_rows
from deltatune.data.segments import Role
from deltatune.errors import DataError


def _one(tok, record, template, **kw):
    return prepare_records([record], tok, template=template, keep_offsets=True, **kw).examples[0]


def test_tokenizer_template_end_of_turn_after_a_space_is_the_response_end_not_a_second_eos(tiny_tok):
    # Llama-2's template closes an answer with ' ' + eos_token: that space and EOS end the response;
    # no extra EOS may be inserted (the text must stay what the template renders).
    tiny_tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|endoftext|>[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
    )
    tiny_tok.bos_token = "<|endoftext|>"
    msgs = [
        {"role": "user", "content": "What?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "7"},
    ]
    ex = _one(tiny_tok, {"messages": msgs}, "tokenizer")
    assert ex.text == tiny_tok.apply_chat_template(msgs, tokenize=False)
    eos = tiny_tok.eos_token_id
    assert ex.input_ids.count(eos) == 2
    for i, t in enumerate(ex.input_ids):
        if t == eos:
            assert ex.roles[i] == Role.RESPONSE
            assert ex.roles[i - 1] == Role.RESPONSE  # the space before it is generated too
    assert ex.turns[ex.input_ids.index(eos)] == 0 and ex.turns[-1] == 1


def test_plain_text_ends_with_the_tokenizers_eos_under_chatml(tiny_tok):
    # A base model whose EOS is not ChatML's end-of-turn (Qwen2.5 base: <|endoftext|>): a plain
    # document ends with the document EOS, as the template docstring promises, not with <|im_end|>.
    tiny_tok.eos_token = "<|endoftext|>"
    ex = _one(tiny_tok, {"text": "The quick brown fox."}, "chatml")
    assert ex.text == "The quick brown fox.<|endoftext|>"
    assert ex.input_ids[-1] == tiny_tok.eos_token_id
    chat = _one(tiny_tok, {"instruction": "What?", "output": "5"}, "chatml")
    assert chat.text.endswith("5<|im_end|>\n")  # chat turns still close with the end-of-turn marker


def test_preview_shows_each_character_once_when_a_character_spans_several_tokens(tiny_tok):
    ex = _one(tiny_tok, {"instruction": "Say 🙂 and 日本", "output": "🙂 日本語"}, "chatml")
    rows = token_rows(ex, tiny_tok, LossPolicy("response"))
    assert "".join(r["token"] for r in rows) == ex.text  # was "Say 🙂🙂🙂🙂 and 日日日本本本" ...
    assert sum(r["token"] == "" for r in rows) > 0  # the later byte pieces of a character


@pytest.mark.parametrize("cmd", ["stats", "preview"])
def test_cli_with_no_usable_example_is_a_one_line_error(capsys, tmp_path, cmd):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": 5}\n', encoding="utf-8")
    for path, extra in ((empty, []), (bad, ["--skip-bad"])):
        code = main([cmd, "--data", str(path), "--tokenizer", "tiny", "--format", "json", *extra])
        out, err = capsys.readouterr()
        assert code == 2, (path, out)
        assert str(path) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert "Infinity" not in out


def test_csv_errors_name_the_line_where_the_row_starts_after_multi_line_cells(tmp_path, tiny_tok):
    f = tmp_path / "d.csv"
    f.write_bytes(
        b'instruction,input,output\n"Line one\nline two\nline three",,"ok"\n\n'
        b'Say 5" screen,,fine\n"Q3 ""quoted""\n",,\n'
    )
    with pytest.raises(DataError) as e:
        prepare_dataset(f, tiny_tok, template="alpaca")
    assert str(e.value) == f"{f}:7: field 'output': empty"
    data = prepare_dataset(f, tiny_tok, template="alpaca", skip_bad=True, keep_offsets=True)
    assert [ex.source for ex in data.examples] == [f"{f}:2", f"{f}:6"]
    # a cell longer than the csv module's default field limit (128 KiB) changes nothing
    f.write_bytes(b'instruction,output\n"' + b"a" * 200_000 + b'\nb",ok\nQ2,\n')
    with pytest.raises(DataError, match=r"d\.csv:4: field 'output': empty"):
        prepare_dataset(f, tiny_tok, template="alpaca", max_len=10)


@pytest.mark.parametrize("template", ["chatml", "alpaca"])
def test_truncation_or_padding_saved_in_the_tokenizer_file_does_not_cut_or_pad_examples(tiny_tok, template):
    # A tokenizer.json can carry truncation/padding settings; the Rust tokenizer applies them unless
    # turned off (the transformers wrapper does so per call). A tokenizer without BOS never goes through
    # the wrapper before the data is tokenized.
    rec = {"instruction": "What is 2 + 3?", "output": "The answer is 5."}
    tiny_tok.bos_token = None
    ref = _one(tiny_tok, rec, template)
    tiny_tok.backend_tokenizer.enable_truncation(max_length=8)
    tiny_tok.backend_tokenizer.enable_padding(length=200, pad_id=2, pad_token="<|im_end|>")
    got = prepare_records([rec], tiny_tok, template=template, keep_offsets=True).examples
    assert len(got) == 1 and got[0].input_ids == ref.input_ids and got[0].roles == ref.roles
    assert tiny_tok.backend_tokenizer.truncation is not None  # the caller's tokenizer is left as it was


def test_a_csv_row_with_too_many_cells_names_its_line(tmp_path):
    """pyarrow's parse error names no line; the message now carries the line where the bad row starts (after a
    quoted cell that spans lines, so not simply the row number)."""
    from deltatune.data.formats import read_records
    from deltatune.errors import DataError

    path = tmp_path / "d.csv"
    path.write_text('instruction,output\n"two\nlines",a\nok,b\nbad,c,extra\n', encoding="utf-8")
    with pytest.raises(DataError) as exc:
        list(read_records(path))
    assert exc.value.line == 5 and "d.csv" in str(exc.value) and "Expected 2 columns" in str(exc.value)
