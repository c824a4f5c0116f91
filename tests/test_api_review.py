"""Defects found reviewing the public API and merge/export: each test failed before its fix."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune
from deltatune.cli import main
from deltatune.models import save_model
from deltatune.testing import tiny_model, tiny_tokenizer

IDS = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64]])


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomise(adapted, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


# --- merge of an adapter on a weight tied to another (lm_head tied to the input embeddings) ------
def test_merge_of_a_tied_lm_head_changes_the_output_layer_only(tmp_path):
    model = tiny_model()  # tie_word_embeddings=True: lm_head.weight is model.embed_tokens.weight
    adapted = deltatune.apply(model, "lora", rank=4, targets="lm_head,q_proj")
    randomise(adapted)
    expected = logits(adapted)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    adapted.merge()
    torch.testing.assert_close(logits(adapted), expected, atol=1e-5, rtol=0)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    adapted.unmerge()
    torch.testing.assert_close(logits(adapted), expected, atol=1e-5, rtol=0)
    merged = adapted.merge_and_unload()
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path / "m")
    torch.testing.assert_close(logits(load(tmp_path / "m")), expected, atol=1e-5, rtol=0)


def test_merge_command_on_a_tied_lm_head_adapter_gives_the_adapters_logits(tmp_path):
    base = save_model(tiny_model(), tiny_tokenizer(), tmp_path / "base")
    adapted = deltatune.apply(load(base), "lora", rank=4, targets="lm_head")
    randomise(adapted)
    expected = logits(adapted)
    adapted.save_adapter(tmp_path / "a")
    assert main(["merge", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 0
    torch.testing.assert_close(logits(load(tmp_path / "m")), expected, atol=1e-5, rtol=0)
    assert main(["export", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "e")]) == 0
    torch.testing.assert_close(logits(load(tmp_path / "e")), expected, atol=1e-5, rtol=0)


# --- modes, disabling -----------------------------------------------------------------------------
def test_load_adapter_on_an_eval_model_runs_no_dropout(tmp_path):
    adapted = deltatune.apply(tiny_model(), "lora", rank=4, dropout=0.5)
    randomise(adapted)
    adapted.model.eval()
    expected = logits(adapted)
    adapted.save_adapter(tmp_path / "a")
    model = tiny_model()  # in eval mode, as deltatune.load_model returns it
    loaded = deltatune.load_adapter(model, tmp_path / "a")
    assert not any(m.training for m in model.modules())
    assert torch.equal(logits(loaded), expected)
    assert torch.equal(logits(loaded), expected)  # twice: no dropout mask drawn
    fresh = deltatune.apply(tiny_model(), "lora", rank=4, dropout=0.5)
    assert not any(m.training for m in fresh.model.modules())
    fresh.model.train()
    assert all(m.training for m in fresh.model.modules())


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_disabled_while_merged_is_refused_not_silently_adapted(method):
    base = logits(tiny_model())
    adapted = deltatune.apply(tiny_model(), method, rank=4)
    randomise(adapted)
    adapted.merge()
    with pytest.raises(deltatune.ConfigError, match="unmerge"):
        with adapted.disabled():
            pass
    adapted.unmerge()
    with adapted.disabled():
        torch.testing.assert_close(logits(adapted), base, atol=1e-5, rtol=0)


# --- saving -----------------------------------------------------------------------------------------
def test_save_adapter_never_deletes_a_users_folder(tmp_path):
    folder = tmp_path / "trainer-output"
    folder.mkdir()
    (folder / "checkpoint-100").mkdir()
    (folder / "notes.txt").write_text("mine")
    adapted = deltatune.apply(tiny_model(), "lora", rank=2)
    for save in (adapted.save_adapter, adapted.save_pretrained):
        with pytest.raises(deltatune.UserError, match="checkpoint-100"):
            save(folder)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "checkpoint-100").is_dir()
    # an adapter folder is replaced (saving again after more training), and so is anything with overwrite
    adapted.save_adapter(tmp_path / "adapter")
    adapted.save_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    adapted.save_adapter(folder, overwrite=True)
    assert not (folder / "notes.txt").exists()
    deltatune.load_adapter(tiny_model(), folder)


def test_save_adapter_after_merge_and_unload_is_refused(tmp_path):
    adapted = deltatune.apply(tiny_model(), "lora", rank=2)
    adapted.save_adapter(tmp_path / "a")
    adapted.merge_and_unload()
    with pytest.raises(deltatune.ConfigError, match="merge_and_unload"):
        adapted.save_adapter(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peft_type"] == "LORA"  # untouched


# --- one-line errors for the usual mistakes -----------------------------------------------------------
def test_apply_and_load_adapter_name_the_model_argument(tmp_path):
    adapted = deltatune.apply(tiny_model(), "lora", rank=2)
    adapted.save_adapter(tmp_path / "a")
    with pytest.raises(deltatune.ConfigError, match="AdaptedModel") as exc:
        deltatune.apply(adapted, "lora")
    assert exc.value.field == "model"
    with pytest.raises(deltatune.ConfigError, match="load_model"):
        deltatune.apply("HuggingFaceTB/SmolLM2-135M", "lora")
    with pytest.raises(deltatune.ConfigError, match="AdaptedModel"):
        deltatune.load_adapter(adapted, tmp_path / "a")


def test_prepare_names_records_that_are_not_records():
    tok = tiny_tokenizer()
    with pytest.raises(deltatune.DataError, match="one record"):
        deltatune.prepare({"instruction": "a", "output": "b"}, tok)
    with pytest.raises(deltatune.DataError, match="record 1 is a str"):
        deltatune.prepare([{"instruction": "a", "output": "b"}, "c"], tok)
    assert len(deltatune.prepare(iter([{"instruction": "a", "output": "b"}]), tok)) == 1


def test_evaluate_takes_one_task_object(tmp_path):
    from deltatune.evaluate.tasks import resolve_task

    path = tmp_path / "heldout.jsonl"
    path.write_text(json.dumps({"instruction": "What is 1 + 1?", "output": "2"}) + "\n")
    task = resolve_task(f"loss:{path}")
    model, tok = tiny_model(), tiny_tokenizer()
    one = deltatune.evaluate(model, tok, task)
    assert one[task.name].score == pytest.approx(deltatune.evaluate(model, tok, [task])[task.name].score)
    with pytest.raises(deltatune.ConfigError, match="tasks must be"):
        deltatune.evaluate(model, tok, None)


# --- fixed in deltatune/methods: exact unmerge, an adapter's modules in the model's mode -------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "mora", "vera"])
def test_unmerge_restores_the_base_weights_exactly(method, dtype):
    model = tiny_model().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = deltatune.apply(model, method, rank=4)
    randomise(adapted, std=0.5)
    for _ in range(3):  # rounding errors would add up over cycles
        adapted.merge()
        adapted.unmerge()
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if k.replace(".base.", ".") in before}
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not getattr(m, "_originals", {}) for m in model.modules())  # nothing kept once unmerged


def test_load_model_with_an_adapter_runs_no_dropout(tmp_path):
    from deltatune.models import load_model

    base = save_model(tiny_model(), tiny_tokenizer(), tmp_path / "base")
    adapted = deltatune.apply(load(base), "lora", rank=4, dropout=0.5)
    randomise(adapted)
    adapted.save_adapter(tmp_path / "a")
    model, _ = load_model(str(base), adapter=tmp_path / "a")  # what `deltatune generate/eval --adapter` run
    assert not any(m.training for m in model.modules())


def test_keywords_beside_a_method_spec_are_refused_not_ignored():
    from deltatune.methods import MethodSpec

    spec = MethodSpec(name="lora", rank=2, targets="q_proj")
    with pytest.raises(deltatune.ConfigError, match="'rank' is given beside a MethodSpec") as exc:
        deltatune.apply(tiny_model(), spec, rank=16)
    assert exc.value.field == "rank"
    with pytest.raises(deltatune.ConfigError, match="'init'"):
        deltatune.apply(tiny_model(), [spec], init="gaussian")
    assert deltatune.apply(tiny_model(), spec).specs[0].rank == 2
    assert deltatune.apply(tiny_model(), spec, quantize="nf4").specs[0].options == {"quantize_base": True}


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_an_fp32_adapter_over_a_bf16_base_keeps_its_precision_as_peft_does(tmp_path, method):
    """An adapter saved in fp32 and loaded over a bf16 base is not rounded to bf16 (it was, which moved the
    logits about twice as far from the fp32 model as PEFT's load of the same files does); a bf16 adapter loads as
    the method builds it over that base."""
    from peft import PeftModel

    base = save_model(tiny_model(), tiny_tokenizer(), tmp_path / "base")
    rank = {} if method == "ia3" else {"rank": 4}
    adapted = deltatune.apply(load(base), method, **rank)
    randomise(adapted, std=0.05)
    adapted.save_adapter(tmp_path / "fp32")
    saved = {n: p.detach().clone() for n, p in adapted.trainable_parameters()}
    assert all(v.dtype == torch.float32 for v in saved.values())

    ours = deltatune.load_adapter(load(base).to(torch.bfloat16), tmp_path / "fp32")
    held = dict(ours.trainable_parameters())
    assert held.keys() == saved.keys()
    assert all(held[n].dtype == torch.float32 and torch.equal(held[n], saved[n]) for n in saved)
    peft = PeftModel.from_pretrained(load(base).to(torch.bfloat16), tmp_path / "fp32")
    theirs = {n for n, p in peft.named_parameters() if "lora_" in n or "ia3_" in n}
    assert theirs and all(dict(peft.named_parameters())[n].dtype == torch.float32 for n in theirs)
    assert torch.allclose(logits(ours.model).float(), logits(peft).float(), atol=1e-2)

    bf16 = deltatune.apply(load(base).to(torch.bfloat16), method, **rank)
    randomise(bf16, std=0.05)
    for _, p in bf16.trainable_parameters():
        p.data = p.data.to(torch.bfloat16)
    bf16.save_adapter(tmp_path / "bf16")
    again = deltatune.load_adapter(load(base).to(torch.bfloat16), tmp_path / "bf16")
    built = {p.dtype for _, p in deltatune.apply(load(base).to(torch.bfloat16), method, **rank).trainable_parameters()}
    assert {p.dtype for _, p in again.trainable_parameters()} == built  # bf16 for LoRA/DoRA; (IA)3 is built in fp32


def test_a_refused_adapter_leaves_the_model_untouched_and_allocates_nothing(tmp_path):
    """An adapter whose config does not match its tensors was refused only after its methods had been applied: the
    model stayed adapted (the right adapter then failed with "already adapted"), and a config with an enormous rank
    allocated its matrices before the shapes were compared."""
    import shutil

    base = save_model(tiny_model(), tiny_tokenizer(), tmp_path / "base")
    good = deltatune.apply(load(base), "lora", rank=4, targets="q_proj")
    randomise(good)
    good.save_adapter(tmp_path / "good")
    expected = logits(good.model)
    for name, rank in (("other", 8), ("enormous", 2**40)):
        shutil.copytree(tmp_path / "good", tmp_path / name)
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**config, "r": rank}))
    model = load(base)
    for name in ("other", "enormous"):  # 2**40 x 64 fp32 would be 256 TiB
        with pytest.raises(deltatune.ConfigError, match=r"lora_A.weight' has shape \(4, 64\), the model expects"):
            deltatune.load_adapter(model, tmp_path / name)
        assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.equal(logits(deltatune.load_adapter(model, tmp_path / "good").model), expected)


@pytest.mark.parametrize("method", ["bitfit", "adapter"])
def test_methods_whose_forward_takes_the_activations_dtype_load_in_the_models(tmp_path, method):
    """Keeping an fp32 adapter's precision over a bf16 model broke BitFit and bottleneck adapters (fp32 tensors met
    bf16 activations: a dtype error in the forward): their tensors take the model's dtype, as before."""
    base = save_model(tiny_model(), tiny_tokenizer(), tmp_path / "base")
    adapted = deltatune.apply(load(base), method, **({"rank": 4} if method == "adapter" else {}))
    randomise(adapted, std=0.05)
    adapted.save_adapter(tmp_path / "a")
    ours = deltatune.load_adapter(load(base).to(torch.bfloat16), tmp_path / "a")
    built = deltatune.apply(load(base).to(torch.bfloat16), method, **({"rank": 4} if method == "adapter" else {}))
    assert [p.dtype for _, p in ours.trainable_parameters()] == [p.dtype for _, p in built.trainable_parameters()]
    assert torch.isfinite(logits(ours.model).float()).all()  # the forward runs (it raised for BitFit)
