"""Templates, token tagging and loss policies on hand-worked examples with exact token positions.

The positions were worked out by hand from the tiny tokenizer's split of each text (shown in the
`RUNS_*` tables: role, first token, last token, the text those tokens cover) and are asserted
token by token, so any change in tagging or in a policy's table fails here.
"""

import pytest

from deltatune.data.masking import LossPolicy, PolicySchedule, parse_policy, policy_weights
from deltatune.data.pipeline import prepare_records
from deltatune.data.segments import Role
from deltatune.errors import ConfigError, DataError

ALPACA = {"instruction": "What is 2 + 3?", "input": "ABC", "output": "The answer is 5."}
CHAT2 = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "What?"},
        {"role": "assistant", "content": "The answer."},
    ]
}

# (role, first token, last token inclusive, text covered)
RUNS_ALPACA_ALPACA = [
    (
        "template",
        0,
        33,
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n",
    ),
    ("role", 34, 37, "### Instruction:\n"),
    ("instruction", 38, 43, "What is 2 + 3?"),
    ("template", 44, 45, "\n\n"),
    ("role", 46, 49, "### Input:\n"),
    ("input", 50, 51, "ABC"),
    ("template", 52, 53, "\n\n"),
    ("role", 54, 57, "### Response:\n"),
    ("response", 58, 64, "The answer is 5.<|im_end|>"),
]
RUNS_ALPACA_CHATML = [
    ("role", 0, 2, "<|im_start|>user\n"),
    ("instruction", 3, 8, "What is 2 + 3?"),
    ("template", 9, 10, "\n\n"),
    ("input", 11, 12, "ABC"),
    ("role", 13, 19, "<|im_end|>\n<|im_start|>assistant\n"),
    ("response", 20, 26, "The answer is 5.<|im_end|>"),
    ("role", 27, 27, "\n"),
]
RUNS_CHAT2_CHATML = [
    ("role", 0, 4, "<|im_start|>system\n"),
    ("system", 5, 11, "You are a helpful assistant."),
    ("role", 12, 16, "<|im_end|>\n<|im_start|>user\n"),
    ("instruction", 17, 22, "What is 2 + 3?"),
    ("role", 23, 29, "<|im_end|>\n<|im_start|>assistant\n"),
    ("response", 30, 31, "5<|im_end|>"),
    ("role", 32, 35, "\n<|im_start|>user\n"),
    ("instruction", 36, 37, "What?"),
    ("role", 38, 44, "<|im_end|>\n<|im_start|>assistant\n"),
    ("response", 45, 49, "The answer.<|im_end|>"),
    ("role", 50, 50, "\n"),
]
RUNS_CHAT2_ALPACA = [
    ("system", 0, 6, "You are a helpful assistant."),
    ("template", 7, 8, "\n\n"),
    ("role", 9, 12, "### Instruction:\n"),
    ("instruction", 13, 18, "What is 2 + 3?"),
    ("template", 19, 20, "\n\n"),
    ("role", 21, 24, "### Response:\n"),
    ("response", 25, 26, "5<|im_end|>"),
    ("template", 27, 28, "\n\n"),
    ("role", 29, 32, "### Instruction:\n"),
    ("instruction", 33, 34, "What?"),
    ("template", 35, 36, "\n\n"),
    ("role", 37, 40, "### Response:\n"),
    ("response", 41, 45, "The answer.<|im_end|>"),
]


def _one(tok, record, template, **kw):
    return prepare_records([record], tok, template=template, keep_offsets=True, **kw).examples[0]


def _expand(runs):
    roles = []
    for role, a, b, _ in runs:
        roles += [Role(role)] * (b - a + 1)
    return roles


def _idx(*ranges):
    out = set()
    for a, b in ranges:
        out |= set(range(a, b + 1))
    return out


def _expected(n, weights_by_index):
    return [weights_by_index.get(i, 0.0) for i in range(n)]


@pytest.mark.parametrize(
    "record,template,runs",
    [
        (ALPACA, "alpaca", RUNS_ALPACA_ALPACA),
        (ALPACA, "chatml", RUNS_ALPACA_CHATML),
        (CHAT2, "chatml", RUNS_CHAT2_CHATML),
        (CHAT2, "alpaca", RUNS_CHAT2_ALPACA),
    ],
)
def test_every_token_gets_the_role_of_its_characters(tiny_tok, record, template, runs):
    ex = _one(tiny_tok, record, template)
    assert ex.roles == _expand(runs)
    for role, a, b, text in runs:
        assert ex.text[ex.offsets[a][0] : ex.offsets[b][1]] == text, (role, a, b)
    # the response closes with the model's end-of-turn token, tagged response
    assert ex.input_ids[runs[-1][2] if runs[-1][0] == "response" else runs[-2][2]] == tiny_tok.convert_tokens_to_ids(
        "<|im_end|>"
    )


def test_alpaca_template_policies_exact_positions(tiny_tok):
    ex = _one(tiny_tok, ALPACA, "alpaca")
    n = 65
    ones = lambda *r: {i: 1.0 for i in _idx(*r)}  # noqa: E731
    assert policy_weights(ex, LossPolicy("response")) == _expected(n, ones((58, 64)))
    # instruction modelling: everything except role headers (Alpaca has no special tokens) -> template text trains
    assert policy_weights(ex, LossPolicy("instruction")) == _expected(n, ones((0, 33), (38, 45), (50, 53), (58, 64)))
    assert policy_weights(ex, LossPolicy("no-boilerplate")) == _expected(n, ones((38, 43), (50, 51), (58, 64)))
    assert policy_weights(ex, LossPolicy("all")) == [1.0] * n
    w = {**{i: 0.25 for i in _idx((38, 43), (50, 51))}, **ones((58, 64))}
    assert policy_weights(ex, LossPolicy("weighted", lam=0.25)) == _expected(n, w)


def test_chatml_template_policies_exact_positions(tiny_tok):
    ex = _one(tiny_tok, ALPACA, "chatml")
    n = 28
    ones = lambda *r: {i: 1.0 for i in _idx(*r)}  # noqa: E731
    assert policy_weights(ex, LossPolicy("response")) == _expected(n, ones((20, 26)))
    assert policy_weights(ex, LossPolicy("instruction")) == _expected(n, ones((3, 12), (20, 26)))
    assert policy_weights(ex, LossPolicy("no-boilerplate")) == _expected(n, ones((3, 8), (11, 12), (20, 26)))
    assert policy_weights(ex, LossPolicy("all")) == [1.0] * n
    w = {**{i: 0.5 for i in _idx((3, 8), (11, 12))}, **ones((20, 26))}
    assert policy_weights(ex, LossPolicy("weighted", lam=0.5)) == _expected(n, w)


def test_multi_turn_all_or_last_and_system_choice(tiny_tok):
    ex = _one(tiny_tok, CHAT2, "chatml")
    n = 51
    assert ex.turns == [0] * 33 + [1] * 18
    ones = lambda *r: {i: 1.0 for i in _idx(*r)}  # noqa: E731
    assert policy_weights(ex, LossPolicy("response")) == _expected(n, ones((30, 31), (45, 49)))
    assert policy_weights(ex, LossPolicy("response", turns="last")) == _expected(n, ones((45, 49)))
    im = _expected(n, ones((5, 11), (17, 22), (30, 31), (36, 37), (45, 49)))
    assert policy_weights(ex, LossPolicy("instruction")) == im
    assert policy_weights(ex, LossPolicy("instruction", turns="last")) == im  # earlier answers are context, still 1
    assert policy_weights(ex, LossPolicy("instruction", train_system=False)) == _expected(
        n, ones((17, 22), (30, 31), (36, 37), (45, 49))
    )
    assert policy_weights(ex, LossPolicy("no-boilerplate")) == _expected(
        n, ones((17, 22), (30, 31), (36, 37), (45, 49))
    )
    assert policy_weights(ex, LossPolicy("no-boilerplate", train_system=True)) == im
    # weighted, last turn: the first answer becomes context and weighs lambda
    w = {**{i: 0.5 for i in _idx((17, 22), (30, 31), (36, 37))}, **ones((45, 49))}
    assert policy_weights(ex, LossPolicy("weighted", lam=0.5, turns="last")) == _expected(n, w)


def test_multi_turn_alpaca_template_last_turn(tiny_tok):
    ex = _one(tiny_tok, CHAT2, "alpaca")
    assert policy_weights(ex, LossPolicy("response", turns="last")) == _expected(46, {i: 1.0 for i in range(41, 46)})
    assert policy_weights(ex, LossPolicy("no-boilerplate", turns="last")) == _expected(
        46, {i: 1.0 for i in _idx((13, 18), (25, 26), (33, 34), (41, 45))}
    )


def test_tokenizer_template_tags_like_chatml_for_a_chatml_tokenizer(tiny_tok):
    ours = _one(tiny_tok, CHAT2, "tokenizer")
    ref = _one(tiny_tok, CHAT2, "chatml")
    assert ours.text == tiny_tok.apply_chat_template(CHAT2["messages"], tokenize=False)
    assert ours.input_ids == ref.input_ids
    assert ours.roles == ref.roles


def test_tokenizer_template_special_bos_and_missing_end_of_turn(tiny_tok):
    # A Llama-2-like template: BOS string once at the start, no end-of-turn after the answer.
    tiny_tok.chat_template = (
        "{{ '<|endoftext|>' }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] }}{% endif %}"
        "{% endfor %}"
    )
    tiny_tok.bos_token = "<|endoftext|>"
    ex = _one(tiny_tok, {"instruction": "What?", "output": "5"}, "tokenizer")
    assert ex.text == "<|endoftext|>[INST] What? [/INST] 5<|im_end|>"
    assert ex.roles[0] == Role.SPECIAL
    assert ex.roles[-2:] == [Role.RESPONSE, Role.RESPONSE]  # "5" and the EOS we added so the model learns to stop
    assert ex.input_ids[-1] == tiny_tok.eos_token_id
    assert set(ex.roles[1:-2]) == {Role.ROLE, Role.INSTRUCTION}


def test_tokenizer_template_that_rewrites_or_drops_content_is_refused(tiny_tok):
    tiny_tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | trim }}\n{% endfor %}"
    with pytest.raises(DataError, match=r"rewrites the content of message 1 \(user\): it strips the whitespace"):
        _one(tiny_tok, {"instruction": "What? ", "output": "5"}, "tokenizer")
    tiny_tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    # the record's shape decides (this one has a system message): a DataError naming the record and message,
    # which --skip-bad skips; it was a ConfigError that stopped the whole data set, naming part "0"
    with pytest.raises(DataError, match=r"<records>:1: .*cannot be segmented: message 1 \(system\)"):
        _one(tiny_tok, {"instruction": "What?", "output": "5"}, "tokenizer", system_prompt="Be brief.")
    records = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What?"},
                             {"role": "assistant", "content": "5"}]},
               {"messages": [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "5"}]}]  # fmt: skip
    kept = prepare_records(records, tiny_tok, template="tokenizer", skip_bad=True)
    assert kept.report.kept == 1 and kept.report.skipped_bad == 1


def test_bos_is_prepended_as_special_only_when_the_tokenizer_adds_one(tiny_tok):
    from tokenizers import processors

    plain = _one(tiny_tok, ALPACA, "alpaca")
    tiny_tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    tiny_tok.bos_token = "<|endoftext|>"
    with_bos = _one(tiny_tok, ALPACA, "alpaca")
    assert with_bos.input_ids == [0] + plain.input_ids
    assert with_bos.roles == [Role.SPECIAL] + plain.roles
    assert policy_weights(with_bos, LossPolicy("instruction"))[0] == 0.0


def test_plain_text_is_response_and_ends_with_eos(tiny_tok):
    ex = _one(tiny_tok, {"text": "The quick brown fox."}, "chatml")
    assert set(ex.roles) == {Role.RESPONSE}
    assert ex.input_ids[-1] == tiny_tok.eos_token_id
    assert ex.text == "The quick brown fox.<|im_end|>"


def test_alpaca_preamble_without_input(tiny_tok):
    ex = _one(tiny_tok, {"instruction": "What?", "output": "5"}, "alpaca")
    assert ex.text.startswith("Below is an instruction that describes a task. Write a response")
    assert Role.INPUT not in ex.roles


def test_two_phase_schedule():
    sched = parse_policy("instruction->response@100")
    assert sched == PolicySchedule(LossPolicy("instruction"), LossPolicy("response"), switch_step=100)
    assert sched.policy_at(0).name == "instruction" and sched.policy_at(99).name == "instruction"
    assert sched.policy_at(100).name == "response"
    ep = parse_policy("weighted:0.2,turns=last->response@2ep")
    assert ep.first == LossPolicy("weighted", lam=0.2, turns="last") and ep.switch_epoch == 2
    assert ep.policy_at(10_000, epoch=1).name == "weighted" and ep.policy_at(0, epoch=2).name == "response"
    assert str(ep) == "weighted:0.2,turns=last->response@2ep"
    with pytest.raises(TypeError):
        policy_weights(None, sched)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("response", LossPolicy("response")),
        ("weighted:0.1", LossPolicy("weighted", lam=0.1)),
        ("no-boilerplate,system=yes", LossPolicy("no-boilerplate", train_system=True)),
        ("response,turns=last", LossPolicy("response", turns="last")),
        ("IM", LossPolicy("instruction")),
    ],
)
def test_parse_policy(spec, expected):
    got = parse_policy(spec.lower())
    assert got == expected
    assert parse_policy(str(got)) == got  # the printed form parses back


@pytest.mark.parametrize(
    "spec",
    [
        "nope",
        "weighted:2",
        "weighted:x",
        "response:0.1",
        "response,turns=first",
        "instruction->response",
        "instruction->response@soon",
        "response,colour=red",
    ],
)
def test_parse_policy_rejects_bad_strings(spec):
    with pytest.raises(ConfigError):
        parse_policy(spec)


def test_segment_bounds_fall_back_to_token_ends_when_a_character_is_uncovered():
    from deltatune.data.tokenize import _segment_bounds

    class Enc:  # tokens "ab" (0,2), "c" (3,4): character 2 (a stripped space) belongs to no token
        offsets = [(0, 2), (3, 4)]

        def char_to_token(self, c):
            return next((i for i, (a, b) in enumerate(self.offsets) if a <= c < b), None)

    assert _segment_bounds(Enc(), [1, 2, 3]) == [0, 1, 1]


def test_weighted_template_weight_is_the_specs_lambda_template(tiny_tok):
    """methods.md section 7: w = λ_prompt on instruction tokens, λ_template on template tokens, 1 on the output.
    Token by token on an Alpaca example: the whole constant scaffold, preamble (`template`) and `### ...:` headers
    (`role`), weighs λ_t, and so would a BOS (`special`)."""
    ex = _one(tiny_tok, ALPACA, "alpaca")
    policy = parse_policy("weighted:0.1,template=0.05")
    assert policy == LossPolicy("weighted", lam=0.1, lam_template=0.05)
    expected = {Role.INSTRUCTION: 0.1, Role.INPUT: 0.1, Role.RESPONSE: 1.0, Role.SYSTEM: 0.0, Role.CONTEXT: 0.1}
    weights = policy_weights(ex, policy)
    assert Role.TEMPLATE in ex.roles and Role.ROLE in ex.roles and Role.RESPONSE in ex.roles
    expected = {r: expected.get(r, 0.05) for r in Role}
    assert weights == [expected[r] for r in ex.roles]
    assert parse_policy(str(policy)) == policy  # config.yaml and checkpoints store the string
    assert str(parse_policy("weighted:0.1")) == "weighted:0.1"  # the default λ_t = 0 is not written
    assert parse_policy("IM") == LossPolicy("instruction") and parse_policy("Weighted:0.2").lam == 0.2


@pytest.mark.parametrize(
    "spec, message",
    [
        ("response,template=0.1", "only 'weighted' takes a template weight"),
        ("weighted:0.1,template=2", r"template weight must lie in \[0, 1\]"),
        ("weighted:0.1,template=x", "template weight 'x' .* is not a number"),
    ],
)
def test_bad_template_weights_are_one_line(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_policy(spec)


# --- OpenAI's per-message weight: an assistant message with "weight": 0 is context, not a target -----------

CHAT2_FIRST_EXCLUDED = {
    "messages": [
        {**m, "weight": 0} if i == 2 else ({**m, "weight": 1} if i == 4 else m) for i, m in enumerate(CHAT2["messages"])
    ]
}


@pytest.mark.parametrize(
    "template, runs",
    [("chatml", RUNS_CHAT2_CHATML), ("tokenizer", RUNS_CHAT2_CHATML), ("alpaca", RUNS_CHAT2_ALPACA)],
)
def test_an_assistant_message_of_weight_0_is_context_under_every_policy(tiny_tok, template, runs):
    """The first answer ("5" and its end-of-turn token) becomes role `context`: no target under `response`,
    weighed as an instruction under the others (as `turns=last` treats earlier answers)."""
    excluded = next(r for r in runs if r[0] == "response")  # the first answer's run
    runs = [("context", *r[1:]) if r is excluded else r for r in runs]
    ex = _one(tiny_tok, CHAT2_FIRST_EXCLUDED, template)
    assert ex.roles == _expand(runs)
    n = len(ex.roles)
    answer, context = _idx(runs[-1][1:3] if runs[-1][0] == "response" else runs[-2][1:3]), _idx(excluded[1:3])
    instructions = _idx(*[r[1:3] for r in runs if r[0] == "instruction"])
    assert policy_weights(ex, LossPolicy("response")) == _expected(n, dict.fromkeys(answer, 1.0))
    half = {**dict.fromkeys(instructions | context, 0.5), **dict.fromkeys(answer, 1.0)}
    assert policy_weights(ex, LossPolicy("weighted", lam=0.5)) == _expected(n, half)
    im = policy_weights(ex, LossPolicy("instruction"))
    assert all(im[i] == 1.0 for i in context | instructions | answer)


@pytest.mark.parametrize(
    "message, weight, error",
    [(1, 0, "field 'messages[1].weight': only an assistant message takes a weight"), (2, 0.5, "expected 0 or 1, got 0.5"),
     (2, True, "expected 0 or 1, got True"), (2, "0", "expected 0 or 1, got '0'")],
)  # fmt: skip
def test_a_bad_message_weight_is_one_line_naming_the_field(tiny_tok, message, weight, error):
    record = {"messages": [dict(m) for m in CHAT2["messages"]]}
    record["messages"][message]["weight"] = weight
    with pytest.raises(DataError, match=error.replace("[", r"\[").replace("]", r"\]")):
        _one(tiny_tok, record, "chatml")


def test_a_record_whose_every_answer_has_weight_0_is_dropped_as_having_no_target(tiny_tok):
    record = {"messages": [{**m, "weight": 0} if m["role"] == "assistant" else m for m in CHAT2["messages"]]}
    data = prepare_records([record, CHAT2], tiny_tok, template="chatml")
    assert len(data.examples) == 1 and data.report.dropped_no_loss == 1


def test_turns_last_never_trains_an_earlier_answer_after_truncation(tiny_tok):
    """A two-turn chat cut inside its second question: `turns=last` trained the first answer, which the policy
    makes context. Its weights are now those of context, and preparing data for such a policy drops the example,
    as one without any answer is dropped."""
    import deltatune

    rec = {
        "messages": [
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "The answer is 5."},
            {"role": "user", "content": "And 48 + 24?"},
            {"role": "assistant", "content": "The answer is 72. " * 20},
        ]
    }
    full = prepare_records([rec], tiny_tok, template="chatml", max_len=4096).examples[0]
    second_question = [i for i, (r, t) in enumerate(zip(full.roles, full.turns)) if r is Role.INSTRUCTION and t == 1]
    cut_at = second_question[-1] + 1  # the last answer is cut away, the first survives
    last = LossPolicy("response", turns="last")
    kept = prepare_records([rec], tiny_tok, template="chatml", max_len=cut_at)  # turns="all": the first answer trains
    ex = kept.examples[0]
    assert ex.last_response_turn == 1 and Role.RESPONSE in ex.roles
    assert sum(policy_weights(ex, last)) == 0  # the first answer was trained before
    assert policy_weights(ex, LossPolicy("instruction", turns="last")) == policy_weights(
        ex, LossPolicy("instruction", turns="all")
    )  # context keeps the instruction weight, as the first answer does untruncated
    dropped = prepare_records([rec], tiny_tok, template="chatml", max_len=cut_at, turns="last")
    assert dropped.examples == [] and dropped.report.dropped_no_loss == 1
    # the last answer cut only in part still trains, and only it
    partly = prepare_records([rec], tiny_tok, template="chatml", max_len=cut_at + 8, turns="last").examples[0]
    trained = {t for t, w in zip(partly.turns, policy_weights(partly, last)) if w > 0}
    assert trained == {1}
    assert len(deltatune.prepare([rec], tiny_tok, template="chatml", max_len=cut_at, policy="response,turns=last")) == 0


def _merging_tokenizer():
    """The tiny tokenizer with byte-level merges of a newline and the whitespace after it ("\\n" + indentation,
    a blank line), as SmolLM2's, Llama 3's and Qwen's tokenizers have."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from deltatune.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    for pair in (["Ċ", "Ġ"], ["ĊĠ", "Ġ"], ["ĊĠĠ", "Ġ"], ["Ċ", "Ċ"]):
        vocab["".join(pair)] = len(vocab)
    spec["model"]["merges"] = [["Ċ", "Ġ"], ["ĊĠ", "Ġ"], ["ĊĠĠ", "Ġ"], ["Ċ", "Ċ"], *merges]
    merged = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        pad_token=tok.pad_token,
        unk_token=tok.unk_token,
    )
    merged.chat_template = tok.chat_template
    return merged


@pytest.mark.parametrize("template", ["tokenizer", "chatml"])
@pytest.mark.parametrize("answer", ["    return a + b", "\n\nThe answer is 5."])
def test_an_answer_opening_with_whitespace_is_trained_after_the_prompt_inference_shows(template, answer):
    """A byte-level tokenizer merged the generation prompt's final newline with an answer's leading whitespace into
    one token, tagged as the answer: the trained context lacked the newline every inference prompt ends with, and
    the first target was a token the model never produces after that prompt. The answer is now tokenized apart."""
    tok = _merging_tokenizer()
    messages = [{"role": "user", "content": "Complete: def add(a, b):"}, {"role": "assistant", "content": answer}]
    assert len(tok("assistant\n    return", add_special_tokens=False)["input_ids"]) < len(
        tok("assistant\n", add_special_tokens=False)["input_ids"]
        + tok("    return", add_special_tokens=False)["input_ids"]
    )  # the merge happens
    ex = prepare_records([{"messages": messages}], tok, template=template).examples[0]
    weights = policy_weights(ex, LossPolicy("response"))
    first = weights.index(1.0)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert ex.input_ids[:first] == tok(prompt, add_special_tokens=False)["input_ids"]
    trained = [t for t, w in zip(ex.input_ids, weights) if w > 0]
    assert trained == tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
