"""Review of the methods (fourth pass): each test failed before its fix."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.errors import TrainingError
from deltatune.testing import tiny_model, tiny_train_config
from deltatune.train.loop import train

IDS = torch.tensor([[1, 5, 6, 7, 2, 9]])


def test_dora_on_a_weight_with_an_all_zero_row_computes_the_base_and_merges_back():
    """The tied head of the tiny Llama has an all-zero row (a reserved token, as in real checkpoints): DoRA's
    m / n was 0 / 0 there and every logit NaN from the first forward. The row now stays 0, as in the base."""
    model = tiny_model()
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[7].zero_()
    base = model(input_ids=IDS).logits.clone()
    adapted = deltatune.apply(model, "dora", targets="lm_head,q_proj", rank=4, alpha=8)
    torch.testing.assert_close(model(input_ids=IDS).logits, base, atol=1e-6, rtol=0)
    with torch.no_grad():
        for name, p in adapted.trainable_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    adapted_logits = model(input_ids=IDS).logits
    assert torch.isfinite(adapted_logits).all()
    assert (adapted_logits[..., 7] == 0).all()  # magnitude 0 keeps the row's output 0
    adapted.merge()
    torch.testing.assert_close(model(input_ids=IDS).logits, adapted_logits, atol=1e-5, rtol=0)
    adapted.unmerge()
    torch.testing.assert_close(model(input_ids=IDS).logits, adapted_logits, atol=1e-6, rtol=0)


def test_a_nan_loss_names_a_checkpoint_only_when_there_is_one(tiny_dir, data_file, tmp_path, monkeypatch):
    """The message pointed at `checkpoints/` for the last good checkpoint when the run had written none."""
    import deltatune.train.loop as loop

    real = loop.weighted_lm_loss_sum

    def nan_loss(*args, **kwargs):
        total, weight = real(*args, **kwargs)
        return total * float("nan"), weight

    monkeypatch.setattr(loop, "weighted_lm_loss_sum", nan_loss)
    with pytest.raises(TrainingError) as caught:
        train(tiny_train_config(tiny_dir, data_file, tmp_path / "run", steps=2), quiet=True)
    assert "loss became nan at step 1" in str(caught.value) and "checkpoint" not in str(caught.value)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_in_packed_rows_keep_a_sliding_window(method):
    """Mistral (every layer slides, window 12), rows of 64 tokens: the packed mask let every query see every
    virtual position, while the model (generate, eval, PEFT, unpacked training) drops those past the window, so
    packed training optimised another attention than the adapter is used with (loss 6.254 against 6.241)."""
    import contextlib

    import transformers as tf

    from deltatune.config import load_config
    from deltatune.data.masking import parse_policy
    from deltatune.data.packing import collate
    from deltatune.data.pipeline import prepare_records
    from deltatune.testing import tiny_tokenizer
    from deltatune.train import loop
    from deltatune.train.loss import logit_transform, reference_lm_loss_sum

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = tf.MistralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=12, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = tf.MistralForCausalLM(config).eval()
    adapted = deltatune.apply(model, method, num_virtual_tokens=6)
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    records = [{"instruction": f"say {w} twice please", "output": f"{w} {w} and {w}"} for w in ("one", "two", "three")]
    examples = prepare_records(records, tok, template="chatml").examples
    assert all(len(ex) + 6 > 12 for ex in examples)  # virtual positions fall out of the window
    policy = parse_policy("response")
    own, weight = 0.0, 0.0
    with torch.no_grad():
        for ex in examples:  # the model's own loss, one example at a time
            b = collate([ex], policy, seq_len=64, pad_id=tok.pad_token_id, packed=False)
            s, w = reference_lm_loss_sum(model(input_ids=b["input_ids"]).logits, b["input_ids"], b["loss_weights"])
            own, weight = own + s.item(), weight + w.item()
    cfg = load_config(overrides=dict(seq_len=64, batch_size=4, method=method, attention="mask"))
    window = loop.mask_window(cfg, model, flat=False)
    assert window == loop.MaskWindow(12, every_layer=True)
    packed = loop.evaluate_loss(
        model, model.get_output_embeddings(), examples, policy, cfg, tok.pad_token_id, torch.device("cpu"),
        contextlib.nullcontext, False, logit_transform(model), window,
    )  # fmt: skip
    assert packed == pytest.approx(own / weight, rel=1e-6)


def test_prefix_with_gradient_checkpointing_is_one_line_before_the_model_loads(tiny_dir, data_file, tmp_path):
    """transformers drops the cache inside checkpointed layers, and the prefix reaches attention only through it:
    the first step crashed on mismatched mask sizes."""
    from deltatune.errors import ConfigError

    cfg = tiny_train_config(tiny_dir, data_file, tmp_path / "run", method="prefix", gradient_checkpointing=True)
    with pytest.raises(ConfigError, match="gradient_checkpointing cannot run with prefix"):
        train(cfg, quiet=True)
    assert not (tmp_path / "run").exists()


def test_a_prefix_longer_than_the_sliding_window_is_refused():
    """A sliding-window model's cache keeps window - 1 positions: a longer prefix crashed packed training and was
    cut silently elsewhere."""
    import transformers as tf

    from deltatune.errors import ConfigError

    config = tf.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="sliding window of 16"):
        deltatune.apply(tf.MistralForCausalLM(config), "prefix", num_virtual_tokens=20)
    deltatune.apply(tf.MistralForCausalLM(config), "prefix", num_virtual_tokens=8)


def test_adapter_dtype_in_training_is_said_to_apply_elsewhere(tiny_dir, data_file, tmp_path, capsys):
    """`method_options: {adapter_dtype: bf16}` trained and saved fp32 tensors without a word."""
    cfg = tiny_train_config(tiny_dir, data_file, tmp_path / "run", steps=1, method_options={"adapter_dtype": "bf16"})
    train(cfg, quiet=True)
    assert "adapter_dtype bf16 applies where the adapter is applied or loaded" in capsys.readouterr().err


def test_a_target_that_exists_but_cannot_be_adapted_is_named_as_such_when_alone():
    """`targets: embed_tokens` for LoRA said no module matched, though the module exists (the clear message came
    only when another target matched too)."""
    from deltatune.errors import ConfigError

    with pytest.raises(ConfigError, match="'embed_tokens' .* module of type Embedding, which this method cannot"):
        deltatune.apply(tiny_model(), "lora", targets="embed_tokens")


def test_prefix_under_a_trainers_gradient_checkpointing_is_one_line():
    """HF Trainer / TRL turn gradient checkpointing on themselves (TRL by default): the prefix's forward crashed on
    mismatched mask sizes instead of saying why."""
    from deltatune.errors import ConfigError
    from deltatune.train.loop import enable_activation_checkpointing

    model = tiny_model()
    deltatune.apply(model, "prefix", num_virtual_tokens=4)
    model.train()
    enable_activation_checkpointing(model)  # what a Trainer's gradient_checkpointing=True does
    with pytest.raises(ConfigError, match="prefix tuning cannot train with gradient checkpointing"):
        model(input_ids=IDS)
    model.eval()  # inference with the flag still set is fine (no recomputation)
    assert torch.isfinite(model(input_ids=IDS).logits).all()
