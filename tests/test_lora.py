"""LoRA / rsLoRA: the universal adapter properties (methods.md §1) and LoRA's own (§2)."""

import math
import warnings

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.methods.apply import apply_methods
from deltatune.methods.base import MethodSpec
from deltatune.methods.lora import LoRALinear
from deltatune.testing import tiny_llama_config, tiny_model

IDS = torch.tensor([[1, 5, 77, 300, 12, 9, 2, 45], [1, 200, 3, 4, 5, 6, 7, 2]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomise_lora(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def lora(model, **kw):
    return apply_methods(model, [MethodSpec(name=kw.pop("name", "lora"), **kw)])


def test_identity_at_init_and_only_B_gets_gradient_at_step_0():
    base = logits(tiny_model(0))
    adapted = lora(tiny_model(0), rank=4, alpha=8)
    assert torch.equal(logits(adapted.model), base)  # B = 0: exactly the base
    out = adapted.model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    for name, p in adapted.trainable_parameters():
        if "lora_A" in name:
            assert torch.count_nonzero(p.grad) == 0, name  # dL/dA = s B^T g x^T = 0 when B = 0
        else:
            assert p.grad.abs().sum() > 0, name


def test_merge_equals_unmerged_and_unmerge_restores_weights():
    adapted = lora(tiny_model(0), rank=4, alpha=8)
    randomise_lora(adapted.model)
    before = logits(adapted.model)
    weights = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if ".base." in n}
    adapted.merge()
    merged = logits(adapted.model)
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)
    changed = [n for n, p in adapted.model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert changed, "merge did not change any base weight"
    with pytest.warns(UserWarning, match="already merged"):
        adapted.merge()
    adapted.unmerge()
    for n, p in adapted.model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(adapted.model), before, atol=1e-5, rtol=0)


def test_disable_gives_the_base_model_exactly():
    base = logits(tiny_model(0))
    adapted = lora(tiny_model(0), rank=4, alpha=8)
    randomise_lora(adapted.model)
    assert not torch.allclose(logits(adapted.model), base, atol=1e-4)
    with adapted.disable_adapters():
        assert torch.equal(logits(adapted.model), base)
    assert not torch.allclose(logits(adapted.model), base, atol=1e-4)


@pytest.mark.parametrize(
    "targets,matrices", [("all-linear", ("q", "k", "v", "o", "gate", "up", "down")), ("q_proj,v_proj", ("q", "v"))]
)
def test_trainable_count_matches_formula_and_only_adapters_train(targets, matrices):
    cfg = tiny_llama_config()
    h, i, kv = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads),
    )
    shapes = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
    r = 4
    expected = cfg.num_hidden_layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in matrices)
    adapted = lora(tiny_model(0), rank=r, targets=targets)
    trainable = adapted.trainable_parameters()
    assert sum(p.numel() for _, p in trainable) == expected
    assert {n for n, p in adapted.model.named_parameters() if p.requires_grad} == {n for n, _ in trainable}
    assert all(".lora_A.weight" in n or ".lora_B.weight" in n for n, _ in trainable)


def test_one_step_changes_only_adapter_parameters():
    adapted = lora(tiny_model(0), rank=4, alpha=8)
    frozen = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if not p.requires_grad}
    params = [p for _, p in adapted.trainable_parameters()]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        adapted.model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    for n, p in adapted.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_forward_matches_float64_reference_and_delta_rank():
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 24)
    layer = LoRALinear(base, r=3, alpha=6.0)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 32)
    w, b = base.weight.double(), base.bias.double()
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    ref = x.double() @ w.T + b + (6.0 / 3) * (x.double() @ A.T @ B.T)
    torch.testing.assert_close(layer(x).double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight().double(), 2.0 * B @ A, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(layer.delta_weight()) == 3


def test_rslora_scaling_ratio():
    base = torch.nn.Linear(8, 8)
    lo = [LoRALinear(base, r, 16.0).scaling for r in (4, 64)]
    rs = [LoRALinear(base, r, 16.0, rslora=True).scaling for r in (4, 64)]
    assert lo == [4.0, 0.25] and lo[0] / lo[1] == 16
    assert rs == [8.0, 2.0] and rs[0] / rs[1] == 4
    via_alias = lora(tiny_model(0), name="rslora", rank=4, alpha=8)
    via_flag = lora(tiny_model(0), rank=4, alpha=8, rslora=True)
    for adapted in (via_alias, via_flag):
        assert {m.scaling for m in adapted.model.modules() if isinstance(m, LoRALinear)} == {8 / math.sqrt(4)}


def test_initialisations():
    torch.manual_seed(0)
    d_in, r = 256, 16
    kai = LoRALinear(torch.nn.Linear(d_in, 64), r, 16.0).lora_A.weight
    bound = 1 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) on (r, d_in)
    assert kai.abs().max() <= bound and kai.abs().max() > 0.95 * bound
    gau = LoRALinear(torch.nn.Linear(d_in, 64), r, 16.0, init="gaussian").lora_A.weight
    assert abs(gau.std().item() - 1 / r) < 0.1 / r
    with pytest.raises(ConfigError, match="init"):
        lora(tiny_model(0), options={"init": "orthogonal"})


def test_dropout_only_on_adapter_branch_and_free_when_zero():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 16)
    assert LoRALinear(base, 4, 8.0).lora_dropout is None  # zero dropout: no module, no call
    layer = LoRALinear(base, 4, 8.0, dropout=0.5).train()
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))  # B = 0: the base branch sees the clean x even in training
    torch.nn.init.normal_(layer.lora_B.weight)
    assert not torch.equal(layer(x), layer(x))  # dropout active on the adapter branch
    layer.eval()
    clean = base(x) + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), clean, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("adapter_dtype", ["fp32", "bf16"])
def test_bf16_base_with_fp32_or_bf16_adapters(adapter_dtype):
    model = tiny_model(0, dtype=torch.bfloat16)
    adapted = lora(model, rank=4, alpha=8, options={"adapter_dtype": adapter_dtype})
    want = torch.float32 if adapter_dtype == "fp32" else torch.bfloat16
    assert {p.dtype for _, p in adapted.trainable_parameters()} == {want}
    randomise_lora(adapted.model)
    layer = adapted.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    w = layer.base.weight.double()
    ref = x.double() @ w.T + layer.scaling * (
        x.double() @ layer.lora_A.weight.double().T @ layer.lora_B.weight.double().T
    )
    torch.testing.assert_close(y.double(), ref, atol=0.05, rtol=0.02)
    out = adapted.model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == want for _, p in adapted.trainable_parameters())
    before = logits(adapted.model).float()
    adapted.merge()
    torch.testing.assert_close(logits(adapted.model).float(), before, atol=0.1, rtol=1e-2)


def test_unknown_target_lists_existing_module_names():
    with pytest.raises(ConfigError) as err:
        lora(tiny_model(0), targets="qproj")
    msg = str(err.value)
    assert "qproj" in msg and "q_proj" in msg and "down_proj" in msg


def test_bad_hyperparameters_are_config_errors():
    for kw, field in (
        ({"rank": 0}, "rank"),
        ({"alpha": -1.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"options": {"rnak": 4}}, "rnak"),
    ):
        with pytest.raises(ConfigError, match=field):
            lora(tiny_model(0), **kw)


def test_regex_targets_select_chosen_layers():
    adapted = lora(tiny_model(0), rank=2, targets=r"model\.layers\.1\.self_attn\.(q|v)_proj")
    names = [n for n, m in adapted.model.named_modules() if isinstance(m, LoRALinear)]
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_merge_twice_warns_and_does_nothing():
    adapted = lora(tiny_model(0), rank=2)
    randomise_lora(adapted.model)
    adapted.merge()
    w = adapted.model.model.layers[0].mlp.up_proj.base.weight.clone()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        adapted.merge()
    assert rec and torch.equal(adapted.model.model.layers[0].mlp.up_proj.base.weight, w)


def test_a_rank_above_a_layers_smaller_side_warns_once_naming_it():
    """B A has rank at most min(in, out): the tiny model's k/v projections (64 -> 32) cannot use rank 48."""
    adapted = apply_methods(tiny_model(), [MethodSpec(name="lora", rank=48)])
    (message,) = adapted.methods[0].training_warnings(adapted.model)
    assert message.startswith(
        "rank 48 is above min(in, out) in 4 of the 14 adapted layers (e.g. model.layers.0.self_attn.k_proj, "
        "64 -> 32): their update B A cannot have a rank above 32"
    )
    adapted = apply_methods(tiny_model(), [MethodSpec(name="lora", rank=32)])  # = min(in, out) where it is least
    assert adapted.methods[0].training_warnings(adapted.model) == []


def test_train_prints_the_rank_warning_as_one_line(capsys, tiny_dir, data_file, tmp_path):
    from reliability_helpers import train_args

    from deltatune.cli import main

    argv = [str(a) for a in train_args(tiny_dir, data_file, tmp_path / "run", "--rank", "48", steps=1)]
    assert main(argv) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "min(in, out)" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: rank 48 is above min(in, out) in 4 of the 14")
