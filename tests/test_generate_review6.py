"""Review 6 of generation with virtual tokens: an over-long prompt leaves room for prompt/prefix tuning's
positions, a sliding-window model gives each row the text it gets alone, and prompt tuning's init on Gemma (whose
embedding scales its rows by sqrt(d)) is the tokens it was initialised from."""

import pytest
import torch

from deltatune.errors import UserError
from deltatune.evaluate.generate import GenerationConfig, generate
from deltatune.methods.apply import apply_methods
from deltatune.methods.base import MethodSpec
from deltatune.testing import tiny_sliding_window_model, tiny_tokenizer

VIRTUAL = {"num_virtual_tokens": 4}


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_an_over_long_prompt_leaves_room_for_the_virtual_positions(method, capsys):
    """The prompt was cut to context - max_new_tokens, and the virtual tokens pushed the last positions past a
    learned position table: an IndexError (a RoPE model ran past its context silently)."""
    tok = tiny_tokenizer()
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    assert len(tok(prompt)["input_ids"]) > 32
    model = _gpt2()
    apply_methods(model, MethodSpec(name=method, options=VIRTUAL))
    (text,) = generate(model, tok, [prompt], GenerationConfig(max_new_tokens=8), progress=False, warn_truncated=True)
    assert isinstance(text, str)
    assert "the last 20 kept" in capsys.readouterr().err  # 32 positions - 8 new - 4 virtual
    with pytest.raises(UserError, match="max_new_tokens 28 and 4 virtual tokens leave no room"):
        generate(model, tok, [prompt], GenerationConfig(max_new_tokens=28), progress=False)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_a_sliding_window_model_gives_each_row_the_text_it_gets_alone(method):
    """Mistral's window counts cache slots: in a left-padded row the virtual tokens left the window as many tokens
    early as the row had padding, so a batch generated other text than each prompt alone."""
    tok = tiny_tokenizer()
    model = tiny_sliding_window_model()
    apply_methods(model, MethodSpec(name=method, options=VIRTUAL))
    prompts = ["The quick brown fox jumps over the lazy dog. What is", "Hi", "Natalia sold clips to 48 of her", "abc"]
    gen = GenerationConfig(max_new_tokens=16)
    alone = [generate(model, tok, [p], gen, progress=False)[0] for p in prompts]
    assert generate(model, tok, prompts, gen, batch_size=4, progress=False) == alone


def test_prompt_tuning_text_init_on_gemma_is_the_tokens_it_names():
    """The init read the embedding table's rows, which Gemma's embedding multiplies by sqrt(d) in forward: the
    virtual tokens started 8x smaller than the tokens (and than PEFT's init, which calls the module)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config.update(num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0)

    def make():
        torch.manual_seed(0)
        return Gemma2ForCausalLM(Gemma2Config(**config)).eval()

    init, ids = [5, 17, 33, 9], torch.tensor([[40, 41, 42, 43, 44]])
    base, tuned = make(), make()
    apply_methods(tuned, MethodSpec(name="prompt", options={"num_virtual_tokens": 4, "init_token_ids": init}))
    with torch.no_grad():
        expected = base(torch.cat([torch.tensor([init]), ids], 1)).logits[:, 4:]
        assert (tuned(ids).logits - expected).abs().max() < 1e-5
        rows = base.get_input_embeddings()(torch.tensor(init))
    assert torch.allclose(tuned.deltatune_prompt.embedding, rows, atol=1e-6)
