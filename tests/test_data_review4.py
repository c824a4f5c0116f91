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
