"""Review of the delta-tuning methods: defects found against the spec (docs/methods.md) and PEFT, one test each."""

import json

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.methods.apply import apply_methods, load_adapter
from deltatune.methods.base import MethodSpec
from deltatune.testing import tiny_model

peft = pytest.importorskip("peft")

from test_peft_format import logits, randomise  # noqa: E402  (the shared eval-mode logits and perturbation)


# --- targets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_a_target_list_naming_a_module_the_method_cannot_adapt_is_refused_not_dropped(method):
    """ "q_proj,mlp" used to adapt q_proj alone: `mlp` exists (so it was no typo) but is no linear layer."""
    with pytest.raises(ConfigError, match="'mlp' in targets .*LlamaMLP"):
        apply_methods(tiny_model(0), MethodSpec(name=method, targets="q_proj,mlp"))
    with pytest.raises(ConfigError, match="'embed_tokens'"):
        apply_methods(tiny_model(0), MethodSpec(name="lora", targets=["q_proj", "embed_tokens"]))
    # names that all select linears still work, suffixes of qualified names included
    adapted = apply_methods(tiny_model(0), MethodSpec(name=method, targets="q_proj,mlp.down_proj"))
    assert len(adapted.trainable_parameters()) == (8 if method == "lora" else 4)


# --- (IA)3 and PEFT's files ------------------------------------------------------------------------
def test_a_peft_ia3_adapter_with_regex_feedforward_modules_loads(tmp_path):
    """PEFT keeps a regex string for feedforward_modules; it used to be sorted into single characters."""
    config = peft.IA3Config(
        target_modules=r".*\.(k_proj|v_proj|down_proj)", feedforward_modules=r".*\.down_proj", task_type="CAUSAL_LM"
    )
    theirs = peft.get_peft_model(tiny_model(0), config)
    randomise([p for _, p in theirs.named_parameters() if p.requires_grad], std=0.2)
    expected = logits(theirs)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = load_adapter(tiny_model(0), tmp_path / "p")
    torch.testing.assert_close(logits(ours.model), expected, atol=1e-5, rtol=0)
    ff = [n for n, m in ours.methods[0].named_delta_modules(ours.model) if m.is_feedforward]
    assert ff == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_ia3_on_some_layers_writes_feedforward_modules_within_target_modules(tmp_path):
    """Full-name target_modules with suffix feedforward_modules made PEFT refuse the file (not a subset)."""
    adapted = apply_methods(
        tiny_model(0), MethodSpec(name="ia3", targets=r"model\.layers\.1\.self_attn\.k_proj|.*down_proj")
    )
    randomise([p for _, p in adapted.trainable_parameters()], std=0.2)
    adapted.save_adapter(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert set(config["feedforward_modules"]) <= set(config["target_modules"])
    theirs = peft.PeftModel.from_pretrained(tiny_model(0), str(tmp_path / "a"))
    torch.testing.assert_close(logits(theirs), logits(adapted.model), atol=1e-5, rtol=0)


# --- bad input: one-line errors, not tracebacks ------------------------------------------------------
@pytest.mark.parametrize(
    "spec, field",
    [
        (dict(name="mora", rank=-1), "rank"),  # was ValueError: math domain error
        (dict(name="mora", rank=2.5), "rank"),  # was accepted
        (dict(name="mora", dropout=1.5), "dropout"),  # was ValueError from the dropout module
        (dict(name="lora", alpha="16"), "alpha"),  # was TypeError
        (dict(name="dora", rank=True), "rank"),  # was TypeError deep in torch.empty
        (dict(name="prompt", options={"init_token_ids": [99999]}), "init_token_ids"),  # was IndexError
        (dict(name="prefix", options={"init_token_ids": [3, 99999]}), "init_token_ids"),  # was IndexError
        (dict(name="prompt", options={"class_label_ids": [[5], [600]]}), "class_label_ids"),  # was IndexError
    ],
)
def test_bad_values_are_one_line_config_errors(spec, field):
    with pytest.raises(ConfigError, match=field):
        apply_methods(tiny_model(0), MethodSpec(**spec))


# --- GPT-2's Conv1D (fan_in_fan_out) -----------------------------------------------------------------
def gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


GPT2_SPECS = {
    "lora": MethodSpec(name="lora", rank=4, alpha=8),
    "rslora": MethodSpec(name="lora", rank=4, alpha=8, rslora=True, targets="c_attn,c_fc"),
    "dora": MethodSpec(name="dora", rank=4, alpha=8),
    "ia3": MethodSpec(name="ia3", targets="c_attn,mlp.c_proj", options={"feedforward_modules": ["mlp.c_proj"]}),
    "vera": MethodSpec(name="vera", rank=4),
    "mora-6": MethodSpec(name="mora", rank=4),
    "mora-1": MethodSpec(name="mora", rank=4, options={"mora_type": 1}),
}


@pytest.mark.parametrize("case", list(GPT2_SPECS))
def test_gpt2_conv1d_layers_are_adapted_merged_and_unmerged(case):
    """The spec's transposed storage: GPT-2's attention and MLP are Conv1D, which no method could target
    ("all-linear" found nothing but the excluded lm_head)."""
    base = logits(gpt2())
    adapted = apply_methods(gpt2(), GPT2_SPECS[case])
    assert adapted.methods[0].delta_modules(adapted.model)
    torch.testing.assert_close(logits(adapted.model), base, atol=1e-6, rtol=0)
    randomise([p for _, p in adapted.trainable_parameters()], std=0.2 if case == "ia3" else 0.05)
    before = logits(adapted.model)
    assert not torch.allclose(before, base, atol=1e-3)
    for module in adapted.methods[0].delta_modules(adapted.model):  # the explicit delta W is (out, in)
        x = torch.randn(3, module.in_features)
        expected = module(x) - module.base(x)
        if case == "ia3":
            continue
        torch.testing.assert_close(x @ module.delta_weight().T, expected, atol=1e-5, rtol=0)
    weights = {k: v.clone() for k, v in adapted.model.state_dict().items()}
    adapted.merge()
    torch.testing.assert_close(logits(adapted.model), before, atol=1e-5, rtol=0)
    adapted.unmerge()
    assert all(torch.equal(v, adapted.model.state_dict()[k]) for k, v in weights.items())


@pytest.mark.parametrize("case", ["lora", "rslora", "dora", "ia3", "vera"])
def test_gpt2_adapters_equal_peft_both_ways(tmp_path, case):
    adapted = apply_methods(gpt2(), GPT2_SPECS[case])
    randomise([p for _, p in adapted.trainable_parameters()], std=0.2 if case == "ia3" else 0.05)
    ours = logits(adapted.model)
    adapted.save_adapter(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(gpt2(), str(tmp_path / "a"))
    torch.testing.assert_close(logits(theirs), ours, atol=1e-5, rtol=0)
    theirs.save_pretrained(str(tmp_path / "p"))  # PEFT's own file (fan_in_fan_out: true) loads back
    again = load_adapter(gpt2(), tmp_path / "p")
    torch.testing.assert_close(logits(again.model), ours, atol=1e-5, rtol=0)


def test_gpt2_nf4_base_is_refused_in_one_line_not_left_unquantised():
    with pytest.raises(ConfigError, match="Conv1D"):
        apply_methods(gpt2(), MethodSpec(name="qlora", rank=4))


def test_weight_analysis_of_gpt2_conv1d_pairs_are_out_by_in():
    """The ΔM/ΔD decomposition and the spectrum read rows as output units: a Conv1D's stored (in, out) weight
    is transposed for them, for an adapter (its merged weight) and for full finetuning (weight against base)."""
    from deltatune.analysis.decompose import matrix_pairs

    adapted = apply_methods(gpt2(), MethodSpec(name="lora", rank=4, alpha=8, targets="c_fc"))
    randomise([p for _, p in adapted.trainable_parameters()], std=0.05)
    pairs = matrix_pairs(adapted.model)
    modules = dict(adapted.model.named_modules())
    for pair in pairs:
        module = modules[pair.name]
        assert pair.weight.shape == (module.out_features, module.in_features) == (256, 64)
        torch.testing.assert_close(pair.weight - pair.base, module.delta_weight(), atol=1e-6, rtol=0)
    tuned = gpt2()
    with torch.no_grad():
        tuned.transformer.h[0].mlp.c_fc.weight.add_(0.01)
    (pair,) = matrix_pairs(tuned, gpt2())
    assert pair.name.endswith("h.0.mlp.c_fc") and pair.weight.shape == (256, 64)


@pytest.mark.parametrize(
    "specs, message",
    [
        ([MethodSpec(name="lora", rank=4), MethodSpec(name="bitfit", options={"init": "gaussian"})], "init"),
        ([MethodSpec(name="lora", rank=4), MethodSpec(name="ia3", targets="no_such_layer")], "no_such_layer"),
        ([MethodSpec(name="prompt"), MethodSpec(name="lora", targets="nothing_here")], "nothing_here"),
    ],
)
def test_a_refused_combination_leaves_the_model_as_it_was(specs, message):
    """A later method's error (an option it does not take, targets that match nothing) came after the earlier
    methods had wrapped layers and frozen every weight: the model could not be used again. Now it is untouched."""
    from deltatune.errors import ConfigError
    from deltatune.testing import tiny_model

    model = tiny_model()
    model.train()
    ids = torch.tensor([[5, 17, 42, 99]])
    before = {n: type(m) for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    expected = model(input_ids=ids).logits.detach()
    with pytest.raises(ConfigError, match=message):
        apply_methods(model, specs)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads and all(grads.values())
    assert model.training and torch.equal(model(input_ids=ids).logits.detach(), expected)
    adapted = apply_methods(model, [MethodSpec(name="lora", rank=4)])  # usable again
    assert adapted.trainable_parameters()
