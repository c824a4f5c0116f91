"""Review 8 of the public API with transformers' Trainer: `turns=last` through the collator on truncated records,
an adapted tied head that a Trainer can save, and the Trainer loss options WeightedLossTrainer cannot honour.
Each test failed before its fix."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune
from deltatune.errors import ConfigError
from deltatune.testing import tiny_model, tiny_tokenizer

LONG_QUESTION = "Please tell me the answer to the next question as well. " * 3
CHAT = {
    "messages": [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "The answer is 5."},
        {"role": "user", "content": LONG_QUESTION + "And 4 + 4?"},
        {"role": "assistant", "content": "The answer is 8."},
    ]
}


def test_the_collators_turns_last_never_trains_an_earlier_answer_of_a_truncated_record():
    # prepared under `response`, re-weighted by the collator under `turns=last`: the dataset had no column for the
    # last answer's turn, so the collator took the first answer (all truncation left) for the last and trained it
    tok = tiny_tokenizer()
    assert len(deltatune.prepare([CHAT], tok, policy="response,turns=last", max_len=40)) == 0  # what prepare drops
    prepared = deltatune.prepare([CHAT], tok, policy="response", max_len=40)
    assert prepared[0]["last_response_turn"] is not None
    untruncated = deltatune.prepare([CHAT], tok, policy="response")
    assert untruncated[0]["last_response_turn"] is None
    batch = deltatune.DataCollator(tok, policy="response,turns=last")([prepared[0], untruncated[0]])
    assert int((batch["labels"][0] != -100).sum()) == 0  # the truncated record trains nothing
    trained = batch["labels"][1][batch["labels"][1] != -100].tolist()
    assert tok.decode(trained) == "The answer is 8.<|im_end|>"


def test_a_tied_head_adapted_saves_with_save_pretrained_and_loads_back(tmp_path):
    # the head's base weight was the embeddings' under another name (`lm_head.base.weight`): save_pretrained, which a
    # Trainer's checkpoints call, raised "shared tensors ... not properly defined"
    model = tiny_model()
    assert model.config.tie_word_embeddings
    adapted = deltatune.apply(model, "lora", rank=4, targets="all-linear,lm_head")
    assert model.lm_head.base.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.base.weight, model.model.embed_tokens.weight)
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    model.save_pretrained(tmp_path / "whole")
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["tie_word_embeddings"] is False
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = adapted.model(input_ids=ids).logits
        embeddings = model.model.embed_tokens.weight.clone()
    adapted.save_adapter(tmp_path / "adapter")
    again = deltatune.load_adapter(tiny_model(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, want)
    merged = adapted.merge_and_unload()
    assert torch.equal(merged.model.embed_tokens.weight, embeddings)  # merging never touches the embeddings


@pytest.mark.parametrize("option", ["label_smoothing_factor", "compute_loss_func"])
def test_weighted_loss_trainer_refuses_the_loss_options_it_would_ignore(tmp_path, option):
    # label smoothing 0.5 gave the loss of 0.0; a compute_loss_func was never called
    from transformers import TrainingArguments

    tok = tiny_tokenizer()
    data = deltatune.prepare([{"instruction": "What is 2 + 3?", "output": "5"}] * 2, tok)
    adapted = deltatune.apply(tiny_model(), "lora", rank=4)
    extra = {"label_smoothing_factor": 0.5} if option == "label_smoothing_factor" else {}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, **extra)
    given = {"compute_loss_func": lambda *a, **k: 0.0} if option == "compute_loss_func" else {}
    with pytest.raises(ConfigError, match=option):
        deltatune.WeightedLossTrainer(
            model=adapted.model, args=args, train_dataset=data, data_collator=deltatune.DataCollator(tok), **given
        )


def test_an_adapter_refused_after_apply_leaves_the_head_tied_and_the_config_saying_so(tmp_path):
    # apply now unties an adapted head; a refusal after it (a PEFT file whose saved base head differs) put the shared
    # weight back but left tie_word_embeddings false, and save_pretrained then wrote a model without its head
    from safetensors.torch import load_file, save_file

    adapted = deltatune.apply(tiny_model(), "lora", rank=4, targets="lm_head")
    adapted.save_adapter(tmp_path / "peft")
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k).replace("lora_A.weight", "base_layer.weight")
    tensors[key] = torch.randn(512, 64)  # a retrained vocabulary's head
    save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
    victim = tiny_model()
    with pytest.raises(ConfigError, match="base"):
        deltatune.load_adapter(victim, tmp_path / "peft")
    assert victim.lm_head.weight is victim.model.embed_tokens.weight
    assert victim.config.tie_word_embeddings is True
