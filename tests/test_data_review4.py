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
