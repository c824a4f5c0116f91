"""Reading record files of every type, column mapping, and every bad-input case."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deltatune.data.pipeline import prepare_dataset, prepare_records
from deltatune.data.segments import Role
from deltatune.errors import ConfigError, DataError

GOOD = [
    {"instruction": "What is 2 + 3?", "input": "", "output": "5"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The answer is 5."},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _texts(data):
    return [ex.input_ids for ex in data.examples]


def test_every_file_type_gives_the_same_examples(tmp_path, tiny_tok):
    ref = prepare_records(GOOD, tiny_tok, template="alpaca")
    _jsonl(tmp_path / "d.jsonl", GOOD)
    (tmp_path / "d.json").write_text(json.dumps(GOOD, indent=2), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(GOOD), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text(
        'instruction,input,output\nWhat is 2 + 3?,,5\nAdd the numbers.,2 and 3,"The answer is 5."\n', encoding="utf-8"
    )
    for name in ("d.jsonl", "d.json", "d.parquet", "d.csv"):
        got = prepare_dataset(tmp_path / name, tiny_tok, template="alpaca")
        assert _texts(got) == _texts(ref), name
        assert got.report.read == 2 and got.report.kept == 2
    assert prepare_dataset(tmp_path / "d.jsonl", tiny_tok).examples[1].source.endswith("d.jsonl:2")
    assert (
        prepare_dataset(tmp_path / "d.json", tiny_tok).examples[1].source.endswith("d.json:7")
    )  # line where record 2 opens


def test_chat_file_in_parquet_and_csv_numbers_stay_text(tmp_path, tiny_tok):
    chat = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    pq.write_table(pa.Table.from_pylist(chat), tmp_path / "c.parquet")
    got = prepare_dataset(tmp_path / "c.parquet", tiny_tok, template="chatml")
    assert got.examples[0].input_ids == prepare_records(chat, tiny_tok).examples[0].input_ids
    (tmp_path / "n.csv").write_text("prompt,completion\n2+3=,007\n", encoding="utf-8")
    ex = prepare_dataset(tmp_path / "n.csv", tiny_tok, template="raw", keep_offsets=True).examples[0]
    assert ex.text == "2+3=007<|im_end|>"  # not the integer 7


def test_prompt_completion_and_column_mapping(tiny_tok):
    a = prepare_records([{"prompt": "Q?", "completion": "A."}], tiny_tok, keep_offsets=True).examples[0]
    b = prepare_records([{"q": "Q?", "a": "A."}], tiny_tok, column_map="q=instruction, a=output").examples[0]
    assert a.input_ids == b.input_ids
    assert (
        prepare_records([{"q": "Q?", "a": "A."}], tiny_tok, column_map={"q": "prompt", "a": "completion"})
        .examples[0]
        .input_ids
        == a.input_ids
    )
    with pytest.raises(DataError, match="source=target"):
        prepare_records(GOOD, tiny_tok, column_map="question")


def test_system_prompt_option(tiny_tok):
    ex = prepare_records(GOOD[:1], tiny_tok, system_prompt="Be brief.", keep_offsets=True).examples[0]
    assert ex.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert Role.SYSTEM in ex.roles


BAD_JSONL_CASES = [
    ("{not json}", 2, None, "not valid JSON"),
    ('{"input": "x", "output": "5"}', 2, "instruction", "missing"),
    ('{"instruction": "x"}', 2, "output", "missing"),
    ('{"instruction": "x", "output": "   "}', 2, "output", "empty"),
    ('{"instruction": 3, "output": "5"}', 2, "instruction", "expected a string, got int"),
    ('["a", "b"]', 2, None, "expected an object"),
    (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}',
        2,
        "messages[1].role",
        "unknown role 'bot'",
    ),
    (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}',
        2,
        "messages[1].content",
        "empty",
    ),
    ('{"messages": "hi"}', 2, "messages", "expected a list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', 2, "messages", "no assistant message"),
    (
        '{"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "yo"}]}',
        2,
        "messages[0].content",
        "expected a string, got list",
    ),
]


@pytest.mark.parametrize("line,lineno,field,message", BAD_JSONL_CASES)
def test_bad_records_name_file_line_and_field(tmp_path, tiny_tok, line, lineno, field, message):
    path = tmp_path / "bad.jsonl"
    first = (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
        if "messages" in line
        else json.dumps(GOOD[0])
    )
    path.write_text(first + "\n" + line + "\n" + first + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        prepare_dataset(path, tiny_tok)
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), lineno, field)
    assert message in str(err)
    assert "\n" not in str(err)
    assert str(err).startswith(f"{path}:{lineno}: ")
    skipped = prepare_dataset(path, tiny_tok, skip_bad=True)
    assert (skipped.report.read, skipped.report.skipped_bad, skipped.report.kept) == (3, 1, 2)
    assert str(err) in skipped.report.bad[0]


def test_non_utf8_in_each_file_type(tmp_path, tiny_tok):
    ok = json.dumps(GOOD[0]).encode()
    (tmp_path / "b.jsonl").write_bytes(ok + b"\n" + b'{"instruction": "caf\xe9", "output": "5"}\n' + ok + b"\n")
    with pytest.raises(DataError, match=r"b.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 21\)"):
        prepare_dataset(tmp_path / "b.jsonl", tiny_tok)
    rep = prepare_dataset(tmp_path / "b.jsonl", tiny_tok, skip_bad=True).report
    assert (rep.read, rep.skipped_bad, rep.kept) == (3, 1, 2)

    (tmp_path / "b.json").write_bytes(b"[\n" + ok + b',\n{"instruction": "caf\xe9", "output": "5"}\n]')
    with pytest.raises(DataError, match=r"b.json:3: not valid UTF-8"):
        prepare_dataset(tmp_path / "b.json", tiny_tok)

    (tmp_path / "b.csv").write_bytes(b"instruction,output\nhi,5\ncaf\xe9,5\nyo,6\n")
    with pytest.raises(DataError, match=r"b.csv:3: field 'instruction': not valid UTF-8"):
        prepare_dataset(tmp_path / "b.csv", tiny_tok)
    rep = prepare_dataset(tmp_path / "b.csv", tiny_tok, skip_bad=True).report
    assert (rep.read, rep.skipped_bad, rep.kept) == (3, 1, 2)

    rows = {"instruction": [b"hi", b"caf\xe9"], "output": [b"5", b"6"]}
    pq.write_table(
        pa.table(rows, schema=pa.schema([("instruction", pa.binary()), ("output", pa.binary())])),
        tmp_path / "b.parquet",
    )
    with pytest.raises(DataError, match=r"b.parquet: field '\[1\].instruction': not valid UTF-8 \(byte 0xe9\)"):
        prepare_dataset(tmp_path / "b.parquet", tiny_tok)
    rep = prepare_dataset(tmp_path / "b.parquet", tiny_tok, skip_bad=True).report
    assert (rep.read, rep.skipped_bad, rep.kept) == (2, 1, 1)


def test_file_level_errors(tmp_path, tiny_tok):
    with pytest.raises(DataError, match="no such file"):
        prepare_dataset(tmp_path / "missing.jsonl", tiny_tok)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown file type"):
        prepare_dataset(tmp_path / "x.txt", tiny_tok)
    (tmp_path / "broken.json").write_text('[\n{"instruction": "a", "output": "b"},\n{oops}\n]')
    with pytest.raises(DataError, match=r"broken.json:3: not valid JSON"):
        prepare_dataset(tmp_path / "broken.json", tiny_tok)
    _jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"q.jsonl:1: cannot tell the format .*--map"):
        prepare_dataset(tmp_path / "q.jsonl", tiny_tok)
    with pytest.raises(ConfigError, match="unknown template"):
        prepare_dataset(tmp_path / "q.jsonl", tiny_tok, template="vicuna")
    with pytest.raises(ConfigError, match="overflow"):
        prepare_dataset(tmp_path / "q.jsonl", tiny_tok, overflow="wrap")


def test_over_long_examples_truncate_or_drop_and_are_counted(tiny_tok):
    long_answer = {"instruction": "Q?", "output": "The answer is 5. " * 40}
    long_question = {"instruction": "What is 2 + 3? " * 40, "output": "5"}
    recs = [GOOD[0], long_answer, long_question]
    n0 = len(prepare_records(GOOD[:1], tiny_tok).examples[0])
    trunc = prepare_records(recs, tiny_tok, max_len=64)
    r = trunc.report
    # the long question is cut to no response: counted as dropped only, not as truncated too
    assert (r.read, r.truncated, r.dropped_too_long, r.dropped_no_loss, r.kept) == (3, 1, 0, 1, 2)
    assert len(trunc.examples[0]) == n0 < 64
    assert len(trunc.examples[1]) == 64 and trunc.examples[1].truncated
    assert trunc.examples[1].roles[-1] == Role.RESPONSE  # cut inside the response: no end-of-turn left
    drop = prepare_records(recs, tiny_tok, max_len=64, overflow="drop").report
    assert (drop.truncated, drop.dropped_too_long, drop.dropped_no_loss, drop.kept) == (0, 2, 0, 1)
    assert "dropped too long 2" in drop.summary()


def test_gsm8k_first_50_lines(shared_data, tmp_path, tiny_tok):
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:50]
    (tmp_path / "g.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = prepare_dataset(
        tmp_path / "g.jsonl",
        tiny_tok,
        template="alpaca",
        column_map="question=instruction,answer=output",
        max_len=4096,
        keep_offsets=True,
    )
    assert data.data_format == "alpaca" and data.report.kept == 50 and data.report.skipped_bad == 0
    first = json.loads(lines[0])
    ex = data.examples[0]
    resp = "".join(ex.text[a:b] for (a, b), r in zip(ex.offsets, ex.roles) if r == Role.RESPONSE)
    inst = "".join(ex.text[a:b] for (a, b), r in zip(ex.offsets, ex.roles) if r == Role.INSTRUCTION)
    assert resp == first["answer"] + "<|im_end|>"
    assert inst == first["question"]
    assert ex.source.endswith("g.jsonl:1")
