"""Generation stops a row at its stop string (as lm-eval's `until`) without changing any text."""

import torch

from deltatune.evaluate.generate import GenerationConfig, cut_at_stop, generate, stop_token_ids
from deltatune.testing import tiny_model, tiny_tokenizer

PROMPTS = ["hello there", "the cat sat on", "a b c d e f g", "why"]


def _full_texts(model, tok, n: int) -> list[str]:
    """HF's own greedy decoding to n tokens, one prompt at a time: the oracle."""
    eos = stop_token_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
        new = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=pad)
        out.append(tok.decode(new[0, ids.shape[1] :], skip_special_tokens=True))
    return out


def test_stopping_early_gives_the_same_texts_as_generating_to_the_limit_then_cutting():
    torch.manual_seed(0)
    model, tok = tiny_model().eval(), tiny_tokenizer()
    full = _full_texts(model, tok, 24)
    # a stop string from inside one row's continuation, so that row stops early and the others run on
    stop = (full[0][3:6],)
    assert stop[0] and all(full)
    got = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=24, stop=stop), batch_size=4, progress=False)
    assert got == [cut_at_stop(t, stop) for t in full]
    assert got[0] != full[0]


def test_a_batch_whose_rows_all_hit_a_stop_string_stops_generating():
    torch.manual_seed(0)
    model, tok = tiny_model().eval(), tiny_tokenizer()
    full = _full_texts(model, tok, 16)
    firsts = tuple(t[0] for t in full)  # each row's first generated character
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = generate(
            model, tok, PROMPTS, GenerationConfig(max_new_tokens=16, stop=firsts), batch_size=4, progress=False
        )
    finally:
        hook.remove()
    assert got == [cut_at_stop(t, firsts) for t in full]
    assert len(calls) <= 2, f"{len(calls)} forward passes: generation ran on past every row's stop string"


def test_the_plain_style_stops_at_a_question_begun_mid_line_as_lm_eval():
    """lm-eval's gsm8k `until` is "Question:" anywhere; the plain style stopped only at "\\nQuestion:", so a reply
    that ran on into a new question on the same line was scored by that question's answer (30, not 72)."""
    from deltatune.evaluate.extract import extract_gsm8k
    from deltatune.evaluate.prompts import style_info

    text = " 48+24 = 72 in all. Question: How many did she sell in June? Answer: 30"
    cut = cut_at_stop(text, style_info("plain").stop)
    assert cut == " 48+24 = 72 in all. " and extract_gsm8k(cut, strict=False) == "72"
