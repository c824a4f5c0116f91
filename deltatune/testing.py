"""Tiny, hermetic stand-ins for a real tokenizer and model, for tests and quick experiments.

The tokenizer is a byte-level BPE trained in milliseconds on a fixed corpus, with ChatML special
tokens and a chat template like SmolLM2's, so the data path runs exactly as with a real model.
"""

from __future__ import annotations

from functools import lru_cache

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "user assistant system You are a helpful assistant.",
    "What is 2 + 3? The answer is 5. Natalia sold clips to 48 of her friends in April, and then she sold half "
    "as many clips to her friends in May. How many clips did Natalia sell altogether in April and May? #### 72",
    "The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


@lru_cache(maxsize=4)
def _tiny_tokenizer_cached(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


@lru_cache(maxsize=1)
def _tiny_sentencepiece_cached():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_sentencepiece_tokenizer():
    """A Metaspace ("\u2581") tokenizer like Llama 2's and Mistral's, whose decoder drops the leading space of
    the first token it decodes: the case that byte-level tokenizers (the tiny one, SmolLM2's) never show."""
    import copy

    return copy.deepcopy(_tiny_sentencepiece_cached())


def tiny_tokenizer(vocab_size: int = 512):
    """A fresh copy each call, so a test that changes it cannot affect another."""
    import copy

    return copy.deepcopy(_tiny_tokenizer_cached(vocab_size))


# the tiny test models' shape and special ids, whatever their architecture
TINY_SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def tiny_llama_config(vocab_size: int = 512, **overrides):
    from transformers import LlamaConfig

    cfg = dict(
        TINY_SHAPE,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_sliding_window_model(window: int = 12, seed: int = 0):
    """A tiny Mistral whose every layer slides over `window` tokens, its embeddings scaled up 20x so that a token
    leaving the window changes the greedy text (what batched generation with virtual tokens must not do)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(**TINY_SHAPE, max_position_embeddings=256, sliding_window=window)
    model = MistralForCausalLM(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(20)
    return model


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides):
    """A 2-layer Llama with random weights; deterministic for a given seed."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    from deltatune.models import cast_weights

    model = cast_weights(LlamaForCausalLM(tiny_llama_config(**config_overrides)), dtype)  # as from_pretrained
    model.eval()
    return model


def tiny_train_config(model_dir, data_file, out, **overrides):
    """A TrainConfig for a tiny-model test run: LoRA r=4 (alpha 8) at lr 5e-3, 64-token rows, fp32, seed 3,
    batch 4, 8 steps, 10% held out, no warm-up; `overrides` on top (any TrainConfig key)."""
    from deltatune.config import load_config

    settings = dict(
        model=str(model_dir),
        data=str(data_file),
        output=str(out),
        method="lora",
        rank=4,
        alpha=8,
        lr=5e-3,
        batch_size=4,
        seq_len=64,
        precision="fp32",
        steps=8,
        seed=3,
        eval_fraction=0.1,
        warmup_steps=0,
    )
    return load_config(overrides={**settings, **overrides})
