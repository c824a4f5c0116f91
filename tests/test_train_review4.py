"""Review of training (fourth pass): each test failed before its fix."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune.testing import tiny_model, tiny_train_config
from deltatune.train.loop import forward_hidden, train
from deltatune.train.loss import reference_lm_loss_sum, weighted_lm_loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one thread is fastest (conftest.py)


def test_the_loss_of_a_model_with_an_adapted_lm_head_goes_through_the_adapter():
    """The chunked loss read `lm_head.weight`, the frozen base weight, so a LoRA on lm_head computed neither in the
    training loss nor in held-out losses, and its B matrix never left zero. Loss and gradients now equal those of
    the model's own logits."""
    adapted = deltatune.apply(tiny_model(), "lora", rank=4, targets="q_proj,lm_head")
    with torch.no_grad():
        for name, p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    model = adapted.model
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    weights = (torch.rand(2, 24, generator=torch.Generator().manual_seed(1)) > 0.4).float()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(24).expand(2, 24)}

    got, _ = weighted_lm_loss_sum(forward_hidden(model, batch), model.get_output_embeddings(), ids, weights, chunk=8)
    got.backward()
    got_grads = {n: p.grad.clone() for n, p in adapted.trainable_parameters()}
    model.zero_grad()
    want, _ = reference_lm_loss_sum(model(input_ids=ids).logits, ids, weights)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    head_grads = [n for n in got_grads if "lm_head" in n]
    assert head_grads and all(got_grads[n].abs().sum() > 0 for n in head_grads)
    for n, p in adapted.trainable_parameters():
        torch.testing.assert_close(got_grads[n], p.grad, rtol=1e-4, atol=1e-6)


def test_training_a_lora_on_lm_head_trains_it(tiny_dir, data_file, tmp_path):
    run = tmp_path / "run"
    train(tiny_train_config(tiny_dir, data_file, run, steps=3, targets="q_proj,lm_head"), quiet=True)
    tensors = load_file(str(run / "final" / "adapter_model.safetensors"))
    head_b = [v for k, v in tensors.items() if "lm_head" in k and "lora_B" in k]
    assert head_b and head_b[0].abs().max() > 0


def _gpt2_folder(tmp_path, **config):
    import transformers as tf

    from deltatune.models import save_model
    from deltatune.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(
        tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128, **config)
    )
    return save_model(model, tok, tmp_path / "gpt2")


def test_gpt2s_attention_dropout_keeps_training_on_the_mask_path(data_file, tmp_path):
    """GPT-2 names its attention dropout `attn_pdrop` (0.1 in real configs): auto chose packed attention, which
    does not implement it, and the first step ended in a ValueError traceback."""
    from deltatune.train.loop import attention_dropout

    folder = _gpt2_folder(tmp_path, attn_pdrop=0.1)
    result = train(tiny_train_config(folder, data_file, tmp_path / "run", steps=2, targets="c_attn"), quiet=True)
    assert result.final_loss is not None
    from transformers import GPT2Config

    assert attention_dropout(type("M", (), {"config": GPT2Config(attn_pdrop=0.1)})()) == 0.1


def test_compile_layers_auto_stays_eager_for_a_model_without_a_layers_list():
    """GPT-2 and Falcon keep their blocks in `transformer.h`: a long CPU run (where auto compiles) was refused with
    an error about compile_layers, a setting the user never chose."""
    import transformers as tf

    from deltatune.config import load_config
    from deltatune.train.loop import use_compiled_layers

    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    cfg = load_config(overrides={"method": "lora"})
    compiled = use_compiled_layers(
        cfg, model, [], torch.device("cpu"), distributed=False, planned_tokens=10**7, resumed=None, say=lambda m: None
    )
    assert compiled is False


def test_plan_reads_gpt2_and_falcon_mlp_widths(tmp_path, capsys):
    """`deltatune plan` read `intermediate_size`, which GPT-2 (`n_inner`) and Falcon (`ffn_hidden_size`) lack: an
    AttributeError traceback."""
    import transformers as tf

    from deltatune.analysis.memory import mlp_width
    from deltatune.cli import main

    assert mlp_width(tf.GPT2Config(n_embd=32)) == 128 and mlp_width(tf.GPT2Config(n_embd=32, n_inner=48)) == 48
    assert mlp_width(tf.FalconConfig(hidden_size=32, ffn_hidden_size=80)) == 80
    folder = _gpt2_folder(tmp_path)
    assert main(["plan", "--model", str(folder)]) == 0
    assert "activations (rough)" in capsys.readouterr().out


def test_rows_longer_than_a_learned_position_table_are_one_line(tmp_path):
    """GPT-2 with 32 positions and 64-token rows: the first forward stopped with an IndexError traceback (the padding
    and long examples have positions past the table). Rotary models have no table and are not limited."""
    import json

    from transformers import GPT2Config, GPT2LMHeadModel

    from deltatune.testing import tiny_tokenizer

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=4, n_positions=32)).save_pretrained(gpt2)
    tiny_tokenizer().save_pretrained(gpt2)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"add {a} and 1", "output": f"{a + 1}"}) + "\n" for a in range(8))
    )
    with pytest.raises(deltatune.ConfigError, match=r"seq_len 64 is longer than the model's 32 learned positions"):
        train(tiny_train_config(gpt2, data, tmp_path / "run", steps=1, targets="c_attn", eval_fraction=0.5))
    assert not (tmp_path / "run").exists()
    train(tiny_train_config(gpt2, data, tmp_path / "ok", steps=1, targets="c_attn", seq_len=32))
    assert (tmp_path / "ok" / "final").is_dir()
    # prompt tuning's virtual tokens shift the real ones' positions: 28 + 8 > 32
    prompt = tiny_train_config(gpt2, data, tmp_path / "p", steps=1, method="prompt", seq_len=28,
                               method_options={"num_virtual_tokens": 8})  # fmt: skip
    with pytest.raises(
        deltatune.ConfigError, match=r"seq_len 28 with the method's 8 virtual tokens .* set seq_len to 24"
    ):
        train(prompt)
