"""PEFT interoperability: PEFT loads our LoRA adapters, we load PEFT's; merged export loads in transformers."""

import json

import pytest
import torch

from deltatune.methods.apply import apply_methods, export_merged, load_adapter
from deltatune.methods.base import MethodSpec
from deltatune.testing import tiny_model, tiny_tokenizer

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 77, 300, 12, 9, 2, 45], [1, 200, 3, 4, 5, 6, 7, 2]])


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomise(params, seed=7, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


CASES = {
    "lora-all-linear": MethodSpec(name="lora", rank=4, alpha=8),
    "lora-chosen-layers": MethodSpec(name="lora", rank=2, alpha=5, targets=r"model\.layers\.1\.self_attn\.(q|v)_proj"),
    "rslora": MethodSpec(name="lora", rank=8, alpha=4, rslora=True, targets="q_proj,k_proj,down_proj"),
    "rslora-alias-gaussian": MethodSpec(name="rslora", rank=4, alpha=8, options={"init": "gaussian"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_our_adapter_with_equal_logits(tmp_path, case):
    adapted = apply_methods(tiny_model(0), [CASES[case]])
    randomise([p for _, p in adapted.trainable_parameters()])
    ours = logits(adapted.model)
    assert not torch.allclose(ours, logits(tiny_model(0)), atol=1e-3)
    adapted.save_adapter(tmp_path / "a", base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    spec = CASES[case]
    assert config["peft_type"] == "LORA" and config["r"] == spec.rank and config["lora_alpha"] == spec.alpha
    assert config["use_rslora"] == (spec.rslora or spec.name == "rslora")
    assert config["base_model_name_or_path"] == "tiny-llama"
    theirs = peft.PeftModel.from_pretrained(tiny_model(0), str(tmp_path / "a"))
    torch.testing.assert_close(logits(theirs), ours, atol=1e-5, rtol=0)


def test_target_modules_are_suffixes_or_full_names(tmp_path):
    apply_methods(tiny_model(0), [CASES["lora-all-linear"]]).save_adapter(tmp_path / "all")
    apply_methods(tiny_model(0), [CASES["lora-chosen-layers"]]).save_adapter(tmp_path / "some")
    read = lambda d: json.loads((tmp_path / d / "adapter_config.json").read_text())["target_modules"]
    assert read("all") == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert read("some") == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


@pytest.mark.parametrize("rslora", [False, True])
def test_we_load_a_peft_written_adapter(tmp_path, rslora):
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up_proj"],
        use_rslora=rslora,
        lora_dropout=0.1,
        task_type="CAUSAL_LM",
    )
    theirs = peft.get_peft_model(tiny_model(0), config)
    randomise([p for n, p in theirs.named_parameters() if "lora_B" in n])
    expected = logits(theirs)
    theirs.save_pretrained(str(tmp_path / "p"))
    adapted = load_adapter(tiny_model(0), tmp_path / "p")
    spec = adapted.methods[0].spec
    assert (spec.rank, spec.alpha, spec.rslora, spec.dropout) == (4, 16.0, rslora, 0.1)
    torch.testing.assert_close(logits(adapted.model), expected, atol=1e-5, rtol=0)
    # and back out again: PEFT reads what we re-save
    adapted.save_adapter(tmp_path / "again")
    again = peft.PeftModel.from_pretrained(tiny_model(0), str(tmp_path / "again"))
    torch.testing.assert_close(logits(again), expected, atol=1e-5, rtol=0)


def test_a_peft_adapter_as_peft_reads_it_bin_file_and_a_shared_target_list(tmp_path):
    """PEFT's `.bin` weights (safe_serialization=False) were 'missing adapter weights', and a target_modules list
    naming a module this model lacks (one list for several architectures, which PEFT loads) was refused."""
    from deltatune.serve.adapters import MultiAdapterModel

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "query_key_value"])
    theirs = peft.get_peft_model(tiny_model(0), config)
    randomise([p for n, p in theirs.named_parameters() if "lora_B" in n])
    expected = logits(theirs)
    theirs.save_pretrained(str(tmp_path / "p"), safe_serialization=False)
    assert (tmp_path / "p" / "adapter_model.bin").exists() and not (
        tmp_path / "p" / "adapter_model.safetensors"
    ).exists()
    adapted = load_adapter(tiny_model(0), tmp_path / "p")
    assert adapted.methods[0].spec.targets == ["q_proj", "v_proj"]
    torch.testing.assert_close(logits(adapted.model), expected, atol=1e-5, rtol=0)
    bank = MultiAdapterModel(tiny_model(0))
    assert len(bank.load("p", tmp_path / "p").layers) == 4  # the server reads it the same way
    # a list typed by the user is still checked name by name
    from deltatune.errors import ConfigError

    with pytest.raises(ConfigError, match="'query_key_value' in targets"):
        apply_methods(tiny_model(0), [MethodSpec(name="lora", targets=["q_proj", "query_key_value"])])


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_virtual_tokens_with_modules_to_save_are_refused_by_name(tmp_path, kind):
    """The refusal blamed an 'unexpected key base_model.lm_head.weight', naming neither the option nor the file."""
    from deltatune.errors import ConfigError

    make = peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig
    config = make(num_virtual_tokens=3, modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    peft.get_peft_model(tiny_model(0), config).save_pretrained(str(tmp_path / "p"))
    with pytest.raises(ConfigError, match=r"adapter_config.json: field 'modules_to_save': PEFT .* not supported"):
        load_adapter(tiny_model(0), tmp_path / "p")


def test_a_mora_fork_adapter_is_refused_by_name(tmp_path):
    """The MoRA authors' PEFT fork saves MoRA as peft_type LORA with `use_mora: true`: read as LoRA, its square
    matrices failed on shapes with no word of MoRA."""
    from deltatune.errors import ConfigError

    config = peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    peft.get_peft_model(tiny_model(0), config).save_pretrained(str(tmp_path / "p"))
    path = tmp_path / "p" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_mora": True, "mora_type": 6}))
    with pytest.raises(ConfigError, match=r"field 'use_mora': this adapter was saved by the MoRA authors' fork"):
        load_adapter(tiny_model(0), tmp_path / "p")


def test_unsupported_peft_options_are_named(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2}, task_type="CAUSAL_LM")
    peft.get_peft_model(tiny_model(0), config).save_pretrained(str(tmp_path / "p"))
    from deltatune.errors import ConfigError

    with pytest.raises(ConfigError, match="rank_pattern"):
        load_adapter(tiny_model(0), tmp_path / "p")


def test_export_merged_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapted = apply_methods(tiny_model(0), [MethodSpec(name="lora", rank=4, alpha=8)])
    randomise([p for _, p in adapted.trainable_parameters()])
    expected = logits(adapted.model)
    out = export_merged(adapted, tiny_tokenizer(), tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(str(out)).convert_tokens_to_ids("<|im_end|>") == 2
    assert not any("lora" in k or ".base." in k for k in reloaded.state_dict())
    # PEFT's own merge of the same adapter gives the same weights
    adapted2 = apply_methods(tiny_model(0), [MethodSpec(name="lora", rank=4, alpha=8)])
    randomise([p for _, p in adapted2.trainable_parameters()])
    adapted2.save_adapter(tmp_path / "a")
    peft_merged = peft.PeftModel.from_pretrained(tiny_model(0), str(tmp_path / "a")).merge_and_unload()
    for name, p in peft_merged.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], p, atol=1e-6, rtol=0)


def test_export_refuses_a_model_with_tensors_its_config_lacks(tmp_path):
    from deltatune.errors import ConfigError

    adapted = apply_methods(tiny_model(0), [MethodSpec(name="lora", rank=2)])
    adapted.model.model.extra = torch.nn.Linear(2, 2)  # stands in for a method that adds tensors
    with pytest.raises(ConfigError, match="extra tensor"):
        export_merged(adapted, None, tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_an_adapter_loads_onto_a_bf16_base_as_trained(tmp_path, method):
    """Training holds fp32 adapter tensors over a bf16 base: `trainable_dtype` loads them so, bit for bit, and
    so does the default (nothing saved is rounded on the way in), unless the adapter names its dtype."""
    trained = apply_methods(tiny_model(seed=3), MethodSpec(name=method, rank=4, alpha=8))
    randomise([p for _, p in trained.trainable_parameters()])
    trained.save_adapter(tmp_path / "a")
    saved = {k: v.clone() for k, v in trained.adapter_state_dict().items()}
    as_trained = load_adapter(tiny_model(seed=3).to(torch.bfloat16), tmp_path / "a", trainable_dtype=torch.float32)
    for name, value in as_trained.adapter_state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, saved[name])
    assert all(p.dtype == torch.bfloat16 for n, p in as_trained.model.named_parameters() if not p.requires_grad)
    default = load_adapter(tiny_model(seed=3).to(torch.bfloat16), tmp_path / "a")
    assert all(v.dtype == torch.float32 and torch.equal(v, saved[k]) for k, v in default.adapter_state_dict().items())
    specs = [  # deltatune's format (two methods) records the options; PEFT's has no field for this one
        MethodSpec(name=method, rank=4, alpha=8, targets="q_proj", options={"adapter_dtype": "bf16"}),
        MethodSpec(name="ia3", targets="v_proj"),  # keeps its saved fp32 (BitFit would take the model's dtype)
    ]
    named = apply_methods(tiny_model(seed=3), specs)
    for _, p in named.trainable_parameters():
        p.data = p.data.float()  # saved in fp32 (as training saves), with bf16 asked for by name
    named.save_adapter(tmp_path / "named")
    loaded = load_adapter(tiny_model(seed=3).to(torch.bfloat16), tmp_path / "named")
    dtypes = {n: v.dtype for n, v in loaded.adapter_state_dict().items()}
    assert {d for n, d in dtypes.items() if "q_proj" in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "v_proj" in n} == {torch.float32}


@pytest.mark.parametrize(("targets", "peft"), [("q_proj,v_proj", True), ("all-linear", False)])
def test_an_adapter_on_upcycled_experts_is_saved_in_deltatunes_format(tmp_path, targets, peft):
    """An adapter on an upcycled model's experts and router was saved in PEFT's format: PEFT, over the model's
    transformers export (stacked experts, another router name), dropped those tensors with a warning and computed
    another model. Attention-only adapters keep PEFT's format (those modules are the same there)."""
    import copy

    from deltatune.upcycle.convert import UpcycleSpec, parse_layers, upcycle

    moe = upcycle(tiny_model(num_hidden_layers=2), UpcycleSpec(experts=4, layers=parse_layers("all", 2)), seed=1)
    base = copy.deepcopy(moe)
    adapted = apply_methods(moe, MethodSpec(name="lora", rank=4, alpha=8, targets=targets))
    randomise([p for _, p in adapted.trainable_parameters()])
    adapted.save_adapter(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_config.json").exists() == peft
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        expected = adapted.model(input_ids=ids).logits
        again = load_adapter(base, tmp_path / "a").model(input_ids=ids).logits
    assert torch.equal(again, expected)
