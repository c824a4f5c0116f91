"""Review 7 of serving: a row whose scores go NaN fails alone; adapters holding NaN are refused when read."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltatune.errors import UserError
from deltatune.methods.base import MethodSpec
from deltatune.methods.peft_format import read_adapter
from deltatune.serve import Engine, GenRequest, MultiAdapterModel, SamplingParams
from deltatune.serve.batcher import Batcher
from deltatune.serve.engine import NonFiniteScores
from deltatune.serve.testing import random_adapter
from deltatune.testing import tiny_model, tiny_tokenizer


def _with_nan(good, bad):
    shutil.copytree(good, bad)
    weights = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in weights if "lora_B" in k)
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, str(bad / "adapter_model.safetensors"))
    return key


def test_an_adapter_holding_nan_is_refused_where_it_is_read(tmp_path):
    good = random_adapter(tmp_path / "good", MethodSpec(name="lora", rank=4, alpha=8), tiny_model(0), seed=1)
    key = _with_nan(good, tmp_path / "bad")
    with pytest.raises(UserError, match=f"tensor '{key}' holds NaN or infinite values"):
        read_adapter(tmp_path / "bad")


def test_a_row_whose_scores_go_nan_fails_alone_and_the_batch_goes_on(tmp_path):
    # a NaN row that samples made torch.multinomial raise, which failed every request of the batch (a greedy one
    # returned token 0 silently); now it alone gets an error and the others answer as they do alone
    good = random_adapter(tmp_path / "good", MethodSpec(name="lora", rank=4, alpha=8), tiny_model(0), seed=1)
    multi = MultiAdapterModel(tiny_model(0, initializer_range=0.2))
    multi.load("good", good)
    specs, tensors, peft_keys, source = read_adapter(good)
    tensors = {k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in tensors.items()}
    multi.add("bad", specs, tensors, peft_keys=bool(peft_keys), source=source)  # as a bf16 overflow would give
    engine = Engine(multi, tiny_tokenizer())
    ids = engine.encode("The quick brown fox")
    alone = {a: engine.generate([GenRequest(ids, a, SamplingParams(max_tokens=4))])[0].text for a in ("good", None)}

    outcome: dict[str, tuple] = {}

    def request(name, adapter, params):
        return GenRequest(
            ids,
            adapter,
            params,
            on_finish=lambda r: outcome.__setitem__(name, ("ok", r.text)),
            on_error=lambda e: outcome.__setitem__(name, ("error", e)),
        )

    batcher = Batcher(engine, threading.Lock(), wait_s=0.2)
    batcher.start()
    try:
        batcher.submit(
            [
                request("good", "good", SamplingParams(max_tokens=4)),
                request("base", None, SamplingParams(max_tokens=4)),
                request("bad sampled", "bad", SamplingParams(max_tokens=4, temperature=0.8, seed=1)),
                request("bad greedy", "bad", SamplingParams(max_tokens=4)),
            ]
        )
        deadline = time.time() + 60
        while len(outcome) < 4 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        batcher.stop()
    assert outcome["good"] == ("ok", alone["good"])
    assert outcome["base"] == ("ok", alone[None])
    for name in ("bad sampled", "bad greedy"):
        kind, exc = outcome[name]
        assert kind == "error" and isinstance(exc, NonFiniteScores)


def test_a_masked_token_at_minus_infinity_fails_no_row(monkeypatch):
    # -inf (a masked entry) has probability 0: only NaN, +inf or a row of -inf fail it
    from deltatune.serve.engine import usable_scores

    rows = torch.tensor([[0.0, float("-inf")], [float("nan"), 0.0], [float("inf"), 0.0], [float("-inf")] * 2])
    assert usable_scores(rows).tolist() == [True, False, False, False]
    engine = Engine(MultiAdapterModel(tiny_model(0, initializer_range=0.2)), tiny_tokenizer())
    forward = engine._forward

    def masked(*args, **kwargs):
        logits = forward(*args, **kwargs)
        logits[:, 0] = float("-inf")
        return logits

    monkeypatch.setattr(engine, "_forward", masked)
    ids = engine.encode("The quick brown fox")
    for params in (SamplingParams(max_tokens=3), SamplingParams(max_tokens=3, temperature=0.8, seed=1)):
        result = engine.generate([GenRequest(ids, None, params)])[0]
        assert result.finish_reason in ("length", "stop") and 0 not in result.token_ids
