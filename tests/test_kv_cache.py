"""The cache's name follows the module's own forward signature: transformers 5.23 calls it
`past_key_values`, 5.24 renamed the decoder body's and 5.25 the causal LM's to `cache`. Code that passes a
cache under the wrong name is not told (the model takes **kwargs) and silently runs without it."""

import torch
from torch import nn

from deltatune.kv_cache import (
    cache_key,
    cache_kwargs,
    drop_output_cache,
    output_cache,
    put_cache,
    take_cache,
    takes_cache,
)


class OldNames(nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
        return input_ids


class NewNames(nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
        return input_ids


class NoCache(nn.Module):
    def forward(self, input_ids=None, **kwargs):
        return input_ids


class Output:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def test_the_name_is_read_from_the_forward_signature():
    assert cache_key(OldNames()) == "past_key_values"
    assert cache_key(NewNames()) == "cache"
    assert cache_kwargs(NewNames(), "C") == {"cache": "C"}
    assert cache_kwargs(OldNames(), "C") == {"past_key_values": "C"}
    assert takes_cache(OldNames()) and takes_cache(NewNames())
    assert not takes_cache(NoCache())


def test_take_finds_the_cache_under_either_name_and_removes_both():
    for module in (OldNames(), NewNames()):
        kw = {"past_key_values": None, "cache": "C", "use_cache": True}
        assert take_cache(module, kw) == "C"
        assert kw == {"use_cache": True}
        kw = {"past_key_values": "P"}
        assert take_cache(module, kw) == "P" and kw == {}
        put_cache(module, kw, "Q")
        assert kw == {cache_key(module): "Q"}


def test_output_cache_reads_and_drops_the_versions_field():
    out = Output(cache="C", logits=None)
    assert output_cache(NewNames(), out) == "C"
    drop_output_cache(NewNames(), out)
    assert out.cache is None
    assert output_cache(OldNames(), Output(past_key_values="P")) == "P"


def test_this_transformers_causal_lm_hands_its_cache_back_under_the_name_it_takes():
    """On the installed version: a forward with the cache passed by `cache_kwargs` continues the sequence
    exactly as the whole sequence in one forward does."""
    from deltatune.testing import tiny_model

    model = tiny_model().double().eval()
    ids = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(ids).logits[:, -1]
        first = model(ids[:, :-1], use_cache=True)
        cache = output_cache(model, first)
        assert cache is not None and cache.get_seq_length() == 8
        step = model(ids[:, -1:], use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]
    torch.testing.assert_close(step, whole, rtol=0, atol=1e-10)
