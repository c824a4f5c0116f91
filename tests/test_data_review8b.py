"""A special token's text inside a record's content (a conversation about chat formats) is tokenized as that
token, as transformers does: reported, where it passed silently."""

import json

from reliability_helpers import cli, train_args

from deltatune.data.pipeline import prepare_records
from deltatune.testing import tiny_tokenizer

QUOTING = {"instruction": "How does ChatML end a turn?", "output": "With the <|im_end|> token."}
PLAIN = {"instruction": "What is 2 + 3?", "output": "5"}


def test_records_whose_content_holds_a_special_tokens_text_are_counted_and_named():
    tok = tiny_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    prepared = prepare_records([PLAIN, QUOTING, QUOTING], tok, template="chatml", name="chats.jsonl")
    report = prepared.report
    assert report.special_in_content == 2
    assert report.first_special == "chats.jsonl:2: '<|im_end|>' in an assistant message"
    assert "2 hold a special token's text in their content" in report.summary()
    quoted, plain = (prepared.examples[i].input_ids.count(im_end) for i in (1, 0))
    assert quoted == plain + 1  # the quoted one is that token, as reported
    clean = prepare_records([PLAIN], tok, template="chatml").report
    assert clean.special_in_content == 0 and "special token" not in clean.summary()


def test_train_warns_of_them_even_when_quiet(capsys, tiny_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [PLAIN] * 6 + [QUOTING] * 2), encoding="utf-8")
    rc, _, err = cli(capsys, *train_args(tiny_dir, data, tmp_path / "run", steps=1))
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "special token" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 2 record(s)") and "train.jsonl:7" in warnings[0]
