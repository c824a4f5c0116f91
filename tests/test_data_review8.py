"""Review 8 of the data path: an answer tokenized apart from its prompt gets no space the data lacks on a
SentencePiece-style tokenizer, and `preview` drops what training drops under `turns=last`."""

import json

import pytest

from deltatune.cli import main
from deltatune.data.pipeline import prepare_records
from deltatune.data.segments import Role
from deltatune.testing import tiny_sentencepiece_tokenizer

SPACE_CUE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


@pytest.mark.parametrize(
    "template, record",
    [
        ("tokenizer", {"instruction": "the cat", "output": "the dog"}),  # a generation prompt ending in a space
        ("raw", {"instruction": "the cat ", "output": "the dog"}),  # an instruction ending in one
    ],
)
def test_an_answer_tokenized_apart_gets_no_space_the_data_lacks(template, record):
    """A Metaspace tokenizer puts "\u2581" before any text it starts: the answer cut from its prompt began with
    a space the record does not have, trained as the answer's first character."""
    tok = tiny_sentencepiece_tokenizer()
    tok.chat_template = SPACE_CUE_TEMPLATE
    ex = prepare_records([record], tok, template=template).examples[0]
    tokens = tok.convert_ids_to_tokens(ex.input_ids)
    first = ex.roles.index(Role.RESPONSE)
    # the prompt as inference tokenizes it (ending in its own "\u2581"), then the answer's characters, no more
    assert tokens[first - 1] == "\u2581"
    assert "".join(tokens[first:]).replace("\u2581", " ").startswith("the dog</s>")


def test_an_answer_tokenized_apart_on_a_byte_level_tokenizer_is_unchanged():
    """The byte-level case the split was made for: "\\n" + indentation still splits at the answer."""
    from deltatune.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    record = {"instruction": "Indent it", "output": "    return 1"}
    ex = prepare_records([record], tok, template="chatml").examples[0]
    first = ex.roles.index(Role.RESPONSE)
    prompt = tok.decode(ex.input_ids[:first])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tok.decode(ex.input_ids[first:]).startswith("    return 1")
    assert ex.input_ids[:first] == tok(prompt, add_special_tokens=False)["input_ids"]


def test_preview_drops_what_training_drops_under_turns_last(tmp_path, capsys):
    """`preview` prepared every answer's turns: a chat whose last answer --max-len cut away was shown (with no
    loss) and counted as kept, where training drops it."""
    long = " ".join(["answer"] * 40)
    records = [
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "More"},
                {"role": "assistant", "content": long},
            ]
        },
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    ]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    args = ["preview", "--tokenizer", "tiny", "--data", str(data), "--template", "chatml"]
    code = main([*args, "--policy", "response,turns=last", "--max-len", "23", "--color", "never"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "chats.jsonl:1" not in out and "chats.jsonl:2" in out
    assert "kept 1" in err and "dropped with no loss-bearing token 1" in err
