"""The generation engine: rows that finish at different times, per-row seeded sampling, top-k / top-p by hand,
stop strings (also while streaming), and the checks on a request."""

import pytest
import torch

from deltatune.methods.base import MethodSpec
from deltatune.serve import Engine, GenRequest, MultiAdapterModel, SamplingParams
from deltatune.serve.engine import _Row, sample_next
from deltatune.serve.testing import random_adapter
from deltatune.testing import tiny_model, tiny_tokenizer

PROMPTS = ["The quick brown fox", "What is 2 + 3?", "Natalia sold clips", "user assistant system"]


def base_model():
    return tiny_model(0, initializer_range=0.2)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("engine")
    multi = MultiAdapterModel(base_model())
    multi.load("a", random_adapter(root / "a", MethodSpec(name="lora", rank=4), base_model(), seed=1))
    multi.load("b", random_adapter(root / "b", MethodSpec(name="mora", rank=4), base_model(), seed=2))
    eng = Engine(multi, tiny_tokenizer())
    eng.stop_ids = set()  # no end-of-sequence: lengths are set by max_tokens and stop strings only
    yield eng
    torch.set_num_threads(before)


def alone(engine, prompt, adapter, max_tokens, **kw):
    req = GenRequest(
        prompt_ids=engine.encode(prompt), adapter=adapter, params=SamplingParams(max_tokens=max_tokens, **kw)
    )
    return engine.generate([req])[0]


def test_rows_leave_the_batch_at_different_times_and_the_rest_go_on(engine):
    budgets, adapters = [2, 12, 5, 9], ["a", "b", None, "a"]
    long = {i: alone(engine, PROMPTS[i], adapters[i], 12) for i in range(4)}
    reqs = [
        GenRequest(
            prompt_ids=engine.encode(PROMPTS[i]), adapter=adapters[i], params=SamplingParams(max_tokens=budgets[i])
        )
        for i in range(4)
    ]
    steps_before = engine.stats["steps"]
    got = engine.generate(reqs)
    for i, res in enumerate(got):
        assert res.token_ids == long[i].token_ids[: budgets[i]] and res.finish_reason == "length"
    assert engine.stats["steps"] - steps_before == 12  # prefill + 11 decode steps: the longest row's budget


def test_a_stop_string_ends_its_row_only(engine):
    full = alone(engine, PROMPTS[0], "a", 12).text
    stop = full[4:6]
    other = alone(engine, PROMPTS[1], "b", 12)
    reqs = [
        GenRequest(
            prompt_ids=engine.encode(PROMPTS[0]), adapter="a", params=SamplingParams(max_tokens=12, stop=(stop,))
        ),
        GenRequest(prompt_ids=engine.encode(PROMPTS[1]), adapter="b", params=SamplingParams(max_tokens=12)),
    ]
    cut, rest = engine.generate(reqs)
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    assert rest.token_ids == other.token_ids


def test_seeded_sampling_does_not_depend_on_the_rest_of_the_batch(engine):
    kw = dict(temperature=1.3, top_p=0.9, top_k=50, seed=11)
    solo = alone(engine, PROMPTS[2], "b", 10, **kw)
    reqs = [
        GenRequest(
            prompt_ids=engine.encode(p), adapter=a, params=SamplingParams(max_tokens=10, temperature=1.0, seed=i)
        )
        for i, (p, a) in enumerate(zip(PROMPTS, ["a", None, "b", "a"]))
    ]
    reqs.insert(
        2, GenRequest(prompt_ids=engine.encode(PROMPTS[2]), adapter="b", params=SamplingParams(max_tokens=10, **kw))
    )
    assert engine.generate(reqs)[2].token_ids == solo.token_ids
    assert alone(engine, PROMPTS[2], "b", 10, **{**kw, "seed": 12}).token_ids != solo.token_ids


def test_top_k_top_p_and_temperature_by_hand():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])  # softmax: 0.644, 0.237, 0.087, 0.032
    g = torch.Generator().manual_seed(0)

    def draws(**kw):
        return {sample_next(logits, SamplingParams(**kw), g) for _ in range(300)}

    assert sample_next(logits, SamplingParams(temperature=0), None) == 0
    assert draws(temperature=1.0) == {0, 1, 2, 3}
    assert draws(temperature=1.0, top_k=2) == {0, 1}
    assert draws(temperature=1.0, top_p=0.6) == {0}  # the top token alone holds 0.644 >= 0.6
    assert draws(temperature=1.0, top_p=0.85) == {0, 1}  # 0.644 + 0.237 = 0.881 >= 0.85
    assert draws(temperature=1.0, top_p=0.9) == {0, 1, 2}
    assert draws(temperature=1.0, top_k=3, top_p=0.85) == {0, 1}


class PieceTokenizer:
    pieces = ["Hel", "lo", " S", "TOP", "!"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_streaming_never_releases_the_start_of_a_stop_string():
    out = []
    row = _Row(
        GenRequest(prompt_ids=[1], params=SamplingParams(max_tokens=10, stop=("STOP",)), on_text=out.append),
        PieceTokenizer(),
        stop_ids=set(),
    )
    for t in [0, 1, 2]:
        row.push(t)
    assert out == ["Hel", "lo", " "]  # " S" could begin "STOP": only the space is released
    row.push(3)
    assert row.finish == "stop" and row.text == "Hello " and "".join(out) == row.text
    row2 = _Row(
        GenRequest(prompt_ids=[1], params=SamplingParams(max_tokens=3, stop=("STOP",)), on_text=out.append),
        PieceTokenizer(),
        stop_ids=set(),
    )
    out.clear()
    for t in [0, 1, 2]:
        row2.push(t)
    assert row2.finish == "length" and "".join(out) == "Hello S"  # at the end the held-back text is released


def test_request_checks(engine):
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="exceeds the context of 512"):
        engine.generate([GenRequest(prompt_ids=[5] * 500, params=SamplingParams(max_tokens=13))])
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([GenRequest(prompt_ids=[])])
