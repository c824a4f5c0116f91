"""GSM8K's 0-shot and few-shot protocols for chat models, and MMLU's two scoring modes, recorded in results."""

from __future__ import annotations

import pytest

from deltatune.evaluate.tasks import GSM8K_ZERO_SHOT, resolve_task


def _fake_generate(replies: dict[int, str], seen: list):
    def fake(model, tokenizer, prompts, config, **kw):
        seen.extend(prompts)
        return [replies[i] for i in range(len(prompts))]

    return fake


def test_gsm8k_zero_shot_states_the_format_and_strict_match_reads_it(shared_data, tiny_lm, tiny_tok, monkeypatch):
    from deltatune.evaluate import runner
    from deltatune.evaluate.runner import EvalOptions, evaluate_task
    from deltatune.evaluate.tasks import load_items

    task = resolve_task("gsm8k", shared_data)
    items = load_items(task, limit=2)
    seen: list[str] = []
    # item 0 answers in the stated format; item 1 gives the right number without '####'
    replies = {0: f"Step one. Step two.\n#### {items[0].target}", 1: f"So the answer is {items[1].target}."}
    monkeypatch.setattr(runner, "generate", _fake_generate(replies, seen))
    res = evaluate_task(tiny_lm, tiny_tok, task, EvalOptions(progress=False, style="plain"), items)
    assert all(p.endswith(items[i].prompt + GSM8K_ZERO_SHOT + "\nAnswer:") for i, p in enumerate(seen))
    assert res.metrics["exact_match"] == 0.5 and res.metrics["exact_match_flexible"] == 1.0
    assert res.info["protocol"] == "0-shot, answer format stated in the prompt"


def test_gsm8k_few_shot_chat_turns_show_the_format_instead(shared_data, monkeypatch):
    from deltatune.evaluate import runner
    from deltatune.evaluate.runner import EvalOptions, evaluate_task
    from deltatune.evaluate.tasks import load_items
    from deltatune.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    if not getattr(tok, "chat_template", None):
        tok.chat_template = (
            "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}"
        )
    task = resolve_task("gsm8k", shared_data)
    items = load_items(task, limit=1)
    seen: list[str] = []
    monkeypatch.setattr(runner, "generate", _fake_generate({0: f"#### {items[0].target}"}, seen))
    res = evaluate_task(tiny_model(), tok, task, EvalOptions(progress=False, style="chat", shots=2), items)
    assert GSM8K_ZERO_SHOT not in seen[0] and seen[0].count("####") == 2  # two solved shots, format shown
    assert res.metrics["exact_match"] == 1.0 and res.info["protocol"] == "2-shot"


@pytest.mark.parametrize("mode,expected", [("option", "option likelihood"), ("letter", "letter")])
def test_mmlu_modes_and_shot_source_are_recorded(shared_data, tiny_lm, tiny_tok, mode, expected):
    from deltatune.evaluate.runner import EvalOptions, evaluate_task

    res = evaluate_task(
        tiny_lm,
        tiny_tok,
        resolve_task("mmlu:anatomy", shared_data),
        EvalOptions(progress=False, style="plain", limit=2, shots=1, choice_mode=mode),
    )
    assert res.info == {
        "choice": expected,
        "prompt_style": "plain",
        "shots_from": "the same file (test split) minus the item",
    }
    assert 0.0 <= res.score <= 1.0 and len(res.predictions) == 2
