"""CLI review fixes: the template weight of `weighted` (methods.md section 7), stats advice and numbers, preview/stats
defaults, generate's truncation warning and output, merge's warning order, and `all-linear` beside other targets."""

import argparse
import json

import pytest

from deltatune.cli import main
from deltatune.data.masking import LossPolicy, parse_policy, policy_weights
from deltatune.data.pipeline import prepare_records
from deltatune.data.segments import Role, TokenizedExample
from deltatune.data.stats import advise, dataset_stats
from deltatune.errors import ConfigError

RECORDS = [
    {"instruction": "Add the numbers", "input": "2 and 3", "output": "The answer is 5."},
    {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]},
]
TEMPLATE_TOKENS = (Role.ROLE, Role.TEMPLATE, Role.SPECIAL)


def _prepared(tok, template: str, records=RECORDS):
    """Each record alone (one format per file)."""
    return [ex for r in records for ex in prepare_records([r], tok, template=template).examples]


@pytest.mark.parametrize("template", ["alpaca", "chatml", "tokenizer"])
def test_weighted_template_weight_covers_role_markers_and_scaffold_under_every_template(tiny_tok, template):
    """λ_t reaches every template token (the `### Response:` headers, ChatML's markers), not only Alpaca's
    preamble; the end-of-turn token that closes an answer keeps weight 1."""
    policy = parse_policy("weighted:0.3,template=0.05")
    for ex in _prepared(tiny_tok, template):
        weights = policy_weights(ex, policy)
        assert any(r is Role.ROLE for r in ex.roles[1:])  # every template here has role markers to weight
        for w, r in zip(weights, ex.roles):
            expected = {Role.INSTRUCTION: 0.3, Role.INPUT: 0.3, Role.RESPONSE: 1.0}.get(r, 0.05)
            assert w == pytest.approx(expected), (template, r)
        assert ex.roles[-1] is Role.RESPONSE or ex.roles[-2] is Role.RESPONSE  # the closing EOS is the answer's


def test_weighted_one_is_no_boilerplate_and_weighted_zero_is_response(tiny_tok):
    """The spec's IM = (1, 0, 1) and IT = (0, 0, 1) as weighted policies."""
    for ex in _prepared(tiny_tok, "alpaca") + _prepared(tiny_tok, "chatml"):
        assert policy_weights(ex, LossPolicy("weighted", lam=1.0)) == policy_weights(ex, LossPolicy("no-boilerplate"))
        assert policy_weights(ex, LossPolicy("weighted", lam=0.0)) == policy_weights(ex, LossPolicy("response"))


def _write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_preview_warns_in_one_line_when_the_template_weight_changes_nothing(tmp_path, capsys):
    data = _write(tmp_path, [RECORDS[1]])
    base = ["preview", "--data", data, "--tokenizer", "tiny", "--format", "json"]
    assert main(base + ["--template", "raw", "--policy", "weighted:0.2,template=0.1"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "template=0.1 changes no weight" in err and "'raw'" in err
    assert main(base + ["--template", "chatml", "--policy", "weighted:0.2,template=0.1"]) == 0
    assert "changes no weight" not in capsys.readouterr().err


def test_the_template_weight_warning_reads_both_phases_and_is_silent_without_the_option(tiny_tok):
    from deltatune.data.masking import unused_template_weight

    raw = _prepared(tiny_tok, "raw", [RECORDS[1]])  # (an Alpaca input's "\n\n" separator is template text)
    assert unused_template_weight(raw, parse_policy("weighted:0.2"), "raw") is None
    assert unused_template_weight(raw, parse_policy("response->weighted:0.2,template=0.1@3"), "raw")
    assert unused_template_weight(_prepared(tiny_tok, "alpaca"), parse_policy("weighted:0.2,template=0.1"), "x") is None


BASE_STATS = {
    "tokens": {"instruction": {"mean": 0.0}, "response": {"mean": 0.0}},
    "would_truncate": 0,
    "max_len": 1,
    "policies": {"instruction": {"boilerplate_share": 0.0}},
    "padding": {},
    "batch_size": 8,
}


def test_stats_advice_qualifies_size_by_the_ratio_and_quotes_the_spec_lambda_range():
    """A small, LIMA-like set (ratio < 0.2) is told `response` and not, a line later, that its size favours
    instruction loss; long instructions get a small λ in the spec's 0.01–0.5, reconciled with the project's run."""
    lima = advise({**BASE_STATS, "ratio_instruction_to_response": 0.09, "examples": 1000}, "chatml")
    assert "Recommended: --policy response" in lima[1]
    assert "favours" not in lima[2] and "ratio near 10" in lima[2] and "LIMA" in lima[2]
    mid = advise({**BASE_STATS, "ratio_instruction_to_response": 0.5, "examples": 5000}, "chatml")
    assert "favours loss on instructions" not in " ".join(mid)
    high = advise({**BASE_STATS, "ratio_instruction_to_response": 11.0, "examples": 2000}, "chatml")
    assert "Recommended: --policy weighted:λ with λ in 0.01–0.5" in high[1] and "0.1..0.5" not in high[1]
    assert "Recommended: --policy instruction" not in high[1]
    if "did worse" in high[-1]:  # the recorded measurement the last line quotes is named and reconciled
        assert "found full instruction loss worse" in high[1]
    assert "near 10" in high[2] and "small dataset" in high[2]


def test_stats_loss_weight_per_example_leaves_out_each_first_token():
    """Training weighs an example's first token 0 (nothing precedes it): stats must not count it."""
    ex = TokenizedExample([3] * 6, [Role.RESPONSE] * 6, [0] * 6)
    tagged = TokenizedExample([3] * 6, [Role.TEMPLATE, Role.TEMPLATE, Role.INSTRUCTION] + [Role.RESPONSE] * 3, [0] * 6)
    s = dataset_stats([ex, tagged], max_len=64, seq_len=64, batch_size=2)
    assert s["policies"]["all"]["loss_weight_per_example"] == pytest.approx(5.0)
    assert s["policies"]["response"]["loss_weight_per_example"] == pytest.approx(4.0)  # (5 + 3) / 2
    assert s["policies"]["instruction"]["boilerplate_share"] == pytest.approx(1 / 10)  # 1 of (5 + 5) tokens


def test_stats_loss_weights_count_what_training_keeps_after_max_len():
    long = TokenizedExample([3] * 20, [Role.INSTRUCTION] * 4 + [Role.RESPONSE] * 16, [0] * 20)
    s = dataset_stats([long], max_len=10, seq_len=10, batch_size=1)
    assert s["policies"]["all"]["loss_weight_per_example"] == pytest.approx(9.0)  # cut to 10, first token 0


def test_preview_and_stats_default_max_len_is_trains_default_seq_len(tmp_path, capsys):
    from deltatune.config import TrainConfig

    seq_len = TrainConfig().seq_len
    data = _write(tmp_path, [{"instruction": "Say it", "output": " ".join(["word"] * 700)}])
    assert main(["stats", "--data", data, "--tokenizer", "tiny", "--template", "chatml", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_len"] == seq_len and out["would_truncate"] == 1
    assert main(["preview", "--data", data, "--tokenizer", "tiny", "--template", "chatml", "--format", "json"]) == 0
    (rows,) = json.loads(capsys.readouterr().out)
    assert len(rows) == seq_len  # cut as default training cuts it


def test_generate_warns_once_with_the_number_of_dropped_prompt_tokens(tiny_lm, tiny_tok, capsys):
    from deltatune.evaluate.generate import GenerationConfig, generate

    prompt = "The quick brown fox jumps over the lazy dog. " * 80
    n = len(tiny_tok(prompt, add_special_tokens=False)["input_ids"])
    context = tiny_lm.config.max_position_embeddings
    assert n > context
    generate(tiny_lm, tiny_tok, [prompt], GenerationConfig(max_new_tokens=3), progress=False, warn_truncated=True)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"its first {n - (context - 3)} tokens were dropped" in err
    generate(tiny_lm, tiny_tok, ["short"], GenerationConfig(max_new_tokens=3), progress=False, warn_truncated=True)
    assert capsys.readouterr().err == ""


def _run_generate(monkeypatch, tok, answers, **overrides):
    """`deltatune generate` with the tiny model and a stub generator; returns the prompts it was given."""
    from deltatune import models
    from deltatune.cli import generate as cli_generate
    from deltatune.evaluate import generate as gen_module
    from deltatune.testing import tiny_model

    seen = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (tiny_model(), tok))
    monkeypatch.setattr(gen_module, "generate", lambda m, t, prompts, *a, **k: seen.extend(prompts) or answers)
    args = dict(model=None, adapter=None, prompt=["a", "b"], system=None, raw=False, max_new_tokens=4)
    args.update(temperature=0.0, seed=0, dtype="fp32", **overrides)
    assert cli_generate.run(argparse.Namespace(**args)) == 0
    return seen


def test_generate_separates_several_answers_and_keeps_their_indentation(monkeypatch, tiny_tok, capsys):
    _run_generate(monkeypatch, tiny_tok, ["    return x\n  ", "line one\nline two"])
    out = capsys.readouterr().out
    assert out == "==> prompt 1 of 2 <==\n    return x\n\n==> prompt 2 of 2 <==\nline one\nline two\n"


SMOLLM_LIKE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nDEFAULT SYSTEM<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_generate_empty_system_is_an_empty_system_message_not_the_default(monkeypatch, tiny_tok, capsys):
    tiny_tok.chat_template = SMOLLM_LIKE
    (empty,) = _run_generate(monkeypatch, tiny_tok, ["x"], prompt=["q"], system="")
    assert empty.startswith("<|im_start|>system\n<|im_end|>\n") and "DEFAULT SYSTEM" not in empty
    (none,) = _run_generate(monkeypatch, tiny_tok, ["x"], prompt=["q"], system=None)
    assert "DEFAULT SYSTEM" in none
    capsys.readouterr()


def test_merge_with_a_mistyped_model_is_only_the_real_error(tmp_path, tiny_dir, capsys):
    import deltatune
    from deltatune.testing import tiny_model

    adapted = deltatune.apply(tiny_model(), "lora", targets="q_proj")
    adapted.save_adapter(tmp_path / "adapter", base_model_name_or_path=str(tiny_dir))
    code = main(["merge", "--adapter", str(tmp_path / "adapter"), "--model", "./nosuch", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nosuch" in err and "warning" not in err


def test_all_linear_combines_with_explicit_extra_targets(tiny_lm):
    from deltatune.methods.inject import match_targets

    linear = match_targets(tiny_lm, "all-linear")
    assert "lm_head" not in linear
    both = match_targets(tiny_lm, "all-linear,lm_head")
    assert set(both) == set(linear) | {"lm_head"}
    assert match_targets(tiny_lm, ["all-linear", "lm_head"]) == both
    with pytest.raises(ConfigError, match="'nosuch' in targets"):
        match_targets(tiny_lm, "all-linear,lm_head,nosuch")


def test_train_warns_when_the_template_weight_changes_nothing(tmp_path, capsys):
    """`weighted:0.1,template=0.05` on plain-text data: preview said the option changes nothing, training did not."""
    import json

    from deltatune.cli import main
    from deltatune.testing import tiny_model, tiny_tokenizer

    model = tmp_path / "tiny"
    tiny_model().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"the cat sat on mat {i}"}) + "\n" for i in range(8)))
    args = ["train", "--model", str(model), "--data", str(data), "--steps", "1", "--threads", "1", "--quiet"]
    assert main([*args, "--output", str(tmp_path / "r1"), "--policy", "weighted:0.1,template=0.05"]) == 0
    assert "template=0.05 changes no weight" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "r2"), "--policy", "weighted:0.1"]) == 0
    assert "changes no weight" not in capsys.readouterr().err


def test_stats_quotes_and_weighs_the_same_nearest_recorded_run(monkeypatch):
    """`masking_advice` (the quoted line) and the ratio advice's 'found worse' sentence pick one run: the nearest
    in length ratio, then in size; a dataset without sizes, or no record, quotes nothing to weigh."""
    from deltatune.data import stats
    from deltatune.experiments import recorded

    record = {
        "model": "M",
        "by_dataset": {
            "long": {"ratio": 3.0, "sizes": {"100": _result(0.20, 0.05), "1000": _result(0.01, 0.05)}},
            "short": {"ratio": 0.1, "sizes": {"100": _result(0.30, 0.05)}},
            "bare": {"ratio": 30.0, "sizes": {}},
        },
    }
    monkeypatch.setattr(recorded, "load_recorded", lambda name: record)
    near = recorded.nearest_masking_run(2.5, 120)
    assert (near.dataset, near.size) == ("long", "100")
    assert "long (ratio 3.00), 100 training examples" in recorded.masking_advice(2.5, 120)
    assert stats._measured_worse(2.5, 120) == "long, ratio 3.00"
    assert stats._measured_worse(2.5, 900) is None  # within the spread at the nearer size
    assert recorded.nearest_masking_run(40.0, 100).result is None
    assert stats._measured_worse(40.0, 100) is None
    assert "no size for bare" in recorded.masking_advice(40.0, 100)
    monkeypatch.setattr(recorded, "load_recorded", lambda name: None)
    assert recorded.nearest_masking_run(2.5, 120) is None and stats._measured_worse(2.5, 120) is None


def _result(loss_diff: float, spread: float) -> dict:
    return {"loss_diff": loss_diff, "loss_diff_spread": spread, "seeds": 3, "em_diff": 0.0}
