"""The public API (docs/api.md): apply / count / disable / merge / save / load, prepare and the
collator, weighted_loss, train and evaluate as calls, and a cheap `import deltatune`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import deltatune
from deltatune.testing import tiny_model, tiny_tokenizer

RECORDS = [
    {"instruction": f"What is {a} + {b}?", "output": f"The answer is {a + b}."} for a in range(3) for b in range(3)
]


def randomise_adapter(adapted) -> None:
    """LoRA starts as the base model (B = 0); give every trained tensor values so tests can see it."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64]])


# --- the surface ---------------------------------------------------------------------------------
def test_import_is_cheap_and_all_is_complete():
    code = "import sys, deltatune; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    for name in deltatune.__all__:
        assert getattr(deltatune, name) is not None, name
    assert {
        "apply",
        "load_model",
        "load_adapter",
        "AdaptedModel",
        "prepare",
        "DataCollator",
        "weighted_loss",
        "WeightedLossTrainer",
        "train",
        "evaluate",
    } <= set(deltatune.__all__)


def test_train_and_evaluate_are_callable_and_still_packages(tmp_path):
    import deltatune.evaluate.runner  # noqa: F401  (the engine stays importable by its dotted names)
    from deltatune.train.loop import train as loop_train

    assert deltatune.train.loop.train is loop_train
    assert deltatune.evaluate.runner.evaluate_task is not None
    with pytest.raises(deltatune.ConfigError, match="unknown key 'rnak'; did you mean 'rank'"):
        deltatune.train({"rnak": 8, "output": str(tmp_path / "run")})


# --- methods -------------------------------------------------------------------------------------
def test_print_trainable_parameters_agrees_with_plan(tiny_dir, capsys):
    from deltatune.cli import main

    model, _ = deltatune.load_model(tiny_dir)
    adapted = deltatune.apply(model, "lora", rank=4, alpha=8, targets="q_proj,v_proj")
    adapted.print_trainable_parameters()
    printed = capsys.readouterr().out.splitlines()
    assert (
        main(
            [
                "plan",
                "--model",
                str(tiny_dir),
                "--method",
                "lora",
                "--rank",
                "4",
                "--targets",
                "q_proj,v_proj",
                "--json",
            ]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)["params"]
    assert printed[0] == (
        f"trainable params: {plan['trainable']:,d} || all params: {plan['total']:,d} || "
        f"trainable%: {100 * plan['trainable'] / plan['total']:.4f}"
    )
    # the per-layer-type rows: LoRA on q_proj (64 -> 64) and v_proj (64 -> 32), rank 4, 2 layers
    rows = {line.split()[0]: line.split()[1:] for line in printed[2:]}
    assert rows == {
        "q_proj": [f"{2 * 4 * (64 + 64):,}", f"{2 * 64 * 64 + 2 * 4 * (64 + 64):,}"],
        "v_proj": [f"{2 * 4 * (64 + 32):,}", f"{2 * 64 * 32 + 2 * 4 * (64 + 32):,}"],
    }
    assert {k: v[1] for k, v in plan["by_type"].items() if v[1]} == {"q_proj": 1024, "v_proj": 768}


def test_apply_takes_options_and_combinations_as_on_the_command_line():
    adapted = deltatune.apply(tiny_model(), "lora+bitfit", rank=2, targets="q_proj")
    assert [m.name for m in adapted.methods] == ["lora", "bitfit"]
    assert {s.rank for s in adapted.specs} == {2}
    with pytest.raises(deltatune.ConfigError, match="unknown method 'lorra'"):
        deltatune.apply(tiny_model(), "lorra")
    with pytest.raises(deltatune.ConfigError, match="unknown option 'rnak'"):
        deltatune.apply(tiny_model(), "lora", rnak=4)


def test_disabled_merge_unmerge():
    base = tiny_model()
    reference = logits(base, IDS)
    model = tiny_model()
    adapted = deltatune.apply(model, "lora", rank=4)
    randomise_adapter(adapted)
    changed = logits(adapted, IDS)
    assert not torch.allclose(changed, reference, atol=1e-3)
    with adapted.disabled():
        assert torch.equal(logits(model, IDS), reference)
    assert torch.equal(logits(model, IDS), changed)
    weight = model.model.layers[0].self_attn.q_proj.weight.clone()
    adapted.merge()
    assert torch.allclose(logits(model, IDS), changed, atol=1e-5)
    adapted.unmerge()
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight, weight, atol=1e-6)


def test_save_adapter_round_trip_and_peft_reads_it(tmp_path):
    peft = pytest.importorskip("peft")
    adapted = deltatune.apply(tiny_model(), "lora", rank=4, alpha=8, targets="q_proj,v_proj")
    randomise_adapter(adapted)
    expected = logits(adapted, IDS)
    adapted.save_adapter(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    loaded = deltatune.load_adapter(tiny_model(), tmp_path / "adapter")
    assert isinstance(loaded, deltatune.AdaptedModel)
    assert torch.equal(logits(loaded, IDS), expected)
    theirs = peft.PeftModel.from_pretrained(tiny_model(), str(tmp_path / "adapter"))
    assert torch.allclose(logits(theirs, IDS), expected, atol=1e-5)


def test_quantize_nf4_trains_lora_on_an_nf4_base(tiny_dir):
    from deltatune.methods.nf4 import NF4Linear

    model, _ = deltatune.load_model(tiny_dir, quantize="nf4")
    adapted = deltatune.apply(model, "lora", rank=4, targets="q_proj")
    assert [m.name for m in adapted.methods] == ["lora"]  # QLoRA is LoRA over the composable NF4 base
    assert adapted.specs[0].options == {"quantize_base": True}
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 2  # q_proj of both layers
    dora = tiny_model()
    adapted = deltatune.apply(dora, "dora", rank=4, targets="v_proj", quantize="nf4")
    assert adapted.specs[0].options == {"quantize_base": True}
    assert sum(isinstance(m, NF4Linear) for m in dora.modules()) == 2
    with pytest.raises(deltatune.ConfigError, match="NF4 base"):
        deltatune.apply(tiny_model(), "bitfit", quantize="nf4")
    with pytest.raises(deltatune.ConfigError, match="quantize must be one of nf4"):
        deltatune.load_model(tiny_dir, quantize="int3")


def test_quantize_none_keeps_the_base_of_an_nf4_loaded_model(tiny_dir):
    """On a model from `load_model(quantize="nf4")`, `quantize=None` means 'as the model asked', so there was no
    way to apply a method over the unquantised weights; `quantize="none"` is that way."""
    from deltatune.methods.nf4 import NF4Linear

    model, _ = deltatune.load_model(tiny_dir, quantize="nf4")
    adapted = deltatune.apply(model, "lora", rank=4, targets="q_proj", quantize="none")
    assert adapted.specs[0].options == {}
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    with pytest.raises(deltatune.ConfigError, match="'none' or None, got 'off'"):
        deltatune.apply(tiny_model(), "lora", quantize="off")


# --- data ----------------------------------------------------------------------------------------
def test_prepare_weights_the_tokens_the_policy_names():
    tok = tiny_tokenizer()
    record = [{"instruction": "What is 2 + 3?", "output": "The answer is 5."}]

    def text(row, keep):
        return tok.decode([t for t, w in zip(row["input_ids"], row["loss_weights"]) if keep(w)])

    row = deltatune.prepare(record, tok, policy="response")[0]
    assert text(row, lambda w: w == 1) == "The answer is 5.<|im_end|>"
    assert [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100] == [
        t for t, w in zip(row["input_ids"], row["loss_weights"]) if w > 0
    ]
    row = deltatune.prepare(record, tok, policy="instruction")[0]
    assert text(row, lambda w: w == 1) == "What is 2 + 3?The answer is 5.<|im_end|>"
    row = deltatune.prepare(record, tok, policy="weighted:0.25")[0]
    assert text(row, lambda w: w == 0.25) == "What is 2 + 3?"
    assert row["loss_weights"][0] == 0.0
    # no labels: they would say 1 where the policy says 0.25, and a Trainer that drops loss_weights would train that
    assert "labels" not in row
    from datasets import Dataset

    assert deltatune.prepare(Dataset.from_list(record), tok, policy="weighted:0.25")[0] == row
    with pytest.raises(deltatune.ConfigError, match="two-phase"):
        deltatune.prepare(record, tok, policy="instruction->response@10")
    with pytest.raises(deltatune.DataError, match="'output'"):
        deltatune.prepare([{"instruction": "x"}], tok)


def test_collator_pads_and_masks_like_transformers():
    tok = tiny_tokenizer()
    data = deltatune.prepare(RECORDS[:3] + [{"instruction": "What is 10 + 10?", "output": "20"}], tok)
    batch = deltatune.DataCollator(tok)([data[i] for i in range(4)])
    assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids"}
    for i in range(4):
        n = len(data[i]["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == data[i]["input_ids"]
        assert batch["labels"][i, :n].tolist() == data[i]["labels"]
        assert batch["labels"][i, n:].eq(-100).all() and batch["attention_mask"][i, n:].eq(0).all()
        assert batch["attention_mask"][i, :n].eq(1).all()
    # re-weighting from the roles under another policy: the collator's policy wins
    resp = deltatune.DataCollator(tok, policy="response")([data[0]])
    assert resp["labels"][0].tolist() == deltatune.prepare(RECORDS[:1], tok, policy="response")[0]["labels"]
    with pytest.raises(deltatune.DataError, match="remove_unused_columns=False"):
        deltatune.DataCollator(tok, policy="response")([{"input_ids": data[0]["input_ids"]}])
    with pytest.raises(deltatune.ConfigError, match="max_length"):
        deltatune.DataCollator(tok, packing=True)
    as_tensors = data.with_format("torch")  # features as tensors, as some pipelines give them
    again = deltatune.DataCollator(tok)([as_tensors[i] for i in range(4)])
    assert all(torch.equal(again[k], batch[k]) for k in batch)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_never_attend_across_examples(attn):
    """Each packed example's logits equal its solo run, under SDPA and eager attention."""
    tok = tiny_tokenizer()
    model = tiny_model(attn_implementation=attn)
    data = deltatune.prepare(RECORDS, tok, policy="instruction")
    features = [data[i] for i in range(len(data))]
    batch = deltatune.DataCollator(tok, packing=True, max_length=64)(features)
    assert batch["attention_mask"].shape[1] == 1 and batch["attention_mask"].dim() == 4
    assert batch["input_ids"].shape[0] < len(features)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
    seen = 0
    for b in range(batch["input_ids"].shape[0]):
        starts = (batch["position_ids"][b] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        for s, e in zip(starts, starts[1:]):
            ids = batch["input_ids"][b, s:e]
            match = [f for f in features if f["input_ids"] == ids.tolist()]
            if not match:  # padding
                continue
            seen += 1
            solo = logits(model, ids[None])
            assert torch.allclose(packed[b, s:e], solo[0], atol=1e-5), (attn, b, s)
            assert batch["labels"][b, s].item() == -100  # nothing of the example precedes its first token
    assert seen == len(features)


def test_weighted_loss_against_float64():
    g = torch.Generator().manual_seed(0)
    logits_ = torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    w = torch.tensor([[0, 1, 0.5, 0, 1], [0, 0.25, 1, 1, 0]])
    lp = torch.log_softmax(logits_.double(), -1)
    nll = -lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected = (nll * w[:, 1:].double()).sum() / w[:, 1:].double().sum()
    assert deltatune.weighted_loss(logits_, ids, w).item() == pytest.approx(expected.item(), rel=1e-6)
    labels = ids.masked_fill(w == 0, -100)
    mean = torch.nn.functional.cross_entropy(logits_[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert deltatune.weighted_loss(logits_, ids, labels=labels).item() == pytest.approx(mean.item(), rel=1e-6)
    assert deltatune.weighted_loss(logits_, ids, w, num_items_in_batch=10.0).item() == pytest.approx(
        expected.item() * float(w[:, 1:].sum()) / 10.0, rel=1e-6
    )


def test_evaluate_loss_task_equals_weighted_loss(tiny_dir, tmp_path):
    """`deltatune.evaluate` on a loss: task gives Σ w·nll / Σ w over the file, as weighted_loss does."""
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    model, tok = deltatune.load_model(tiny_dir)
    results = deltatune.evaluate(model, tok, f"loss:{path}", policy="instruction")
    data = deltatune.prepare(path, tok, policy="instruction")
    batch = deltatune.DataCollator(tok)([data[i] for i in range(len(data))])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = deltatune.weighted_loss(out, batch["input_ids"], labels=batch["labels"]).item()
    assert results[f"loss:{path}"].score == pytest.approx(expected, rel=1e-5)
    # an AdaptedModel is scored with its adapter on: a randomised one (B = 0 would score as the base whether
    # the adapter ran or not) against weighted_loss of the adapted model's own logits
    adapted = deltatune.apply(model, "lora", rank=4)
    randomise_adapter(adapted)
    with torch.no_grad():
        out = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    adapted_expected = deltatune.weighted_loss(out, batch["input_ids"], labels=batch["labels"]).item()
    assert abs(adapted_expected - expected) > 1e-2
    again = deltatune.evaluate(adapted, tok, [f"loss:{path}"], policy="instruction")
    assert again[f"loss:{path}"].score == pytest.approx(adapted_expected, rel=1e-5)
    with pytest.raises(deltatune.ConfigError, match="unknown evaluation option 'polciy'"):
        deltatune.evaluate(model, tok, f"loss:{path}", polciy="instruction")


def test_command_line_train_runs_through_the_public_api(monkeypatch, tmp_path):
    import deltatune.api.run
    from deltatune.cli import main

    seen = []
    monkeypatch.setattr(deltatune.api.run, "train", lambda config, **kw: seen.append((config, kw)))
    assert (
        main(
            [
                "train",
                "--data",
                "x.jsonl",
                "--method",
                "dora",
                "--rank",
                "4",
                "--policy",
                "instruction",
                "--output",
                str(tmp_path / "run"),
                "--quiet",
            ]
        )
        == 0
    )
    ((config, kwargs),) = seen
    assert (config.data, config.method, config.rank, config.policy) == ("x.jsonl", "dora", 4, "instruction")
    assert kwargs == {"quiet": True}


def test_load_adapter_on_an_nf4_model_gives_the_adapted_linears_their_nf4_base(tiny_dir, tmp_path):
    """`load_model(quantize="nf4")` then `load_adapter` of a plain (PEFT-format) LoRA adapter: the adapted linears
    get the NF4 base `apply` gives them, as the docs promise (the adapter went over the full-precision base)."""
    from deltatune.methods.nf4 import NF4Linear

    plain = deltatune.apply(tiny_model(), "lora", rank=4, targets="q_proj")
    with torch.no_grad():
        for _, p in plain.trainable_parameters():
            p.normal_(0, 0.05)
    plain.save_adapter(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_config.json").exists()  # PEFT's format: nothing says NF4
    reference_model, _ = deltatune.load_model(tiny_dir, quantize="nf4")
    reference = deltatune.apply(reference_model, "lora", rank=4, targets="q_proj")
    reference.load_adapter_state_dict(plain.adapter_state_dict())
    ids = torch.arange(3, 20)[None]
    expected = reference.model.eval()(ids).logits
    model, _ = deltatune.load_model(tiny_dir, quantize="nf4")
    loaded = deltatune.load_adapter(model, tmp_path / "lora")
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 2
    assert torch.equal(loaded.model.eval()(ids).logits, expected)
