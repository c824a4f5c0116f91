"""The method contract, for every registered method: disable gives the base exactly and enable gives the
adapted model back; options are read through one schema; one function turns a configuration into
specs (train, eval, plan agree); capabilities, not names, drive the loop."""

from __future__ import annotations

import pytest
import torch

from deltatune.config import TrainConfig
from deltatune.errors import ConfigError
from deltatune.methods.apply import apply_methods
from deltatune.methods.base import MethodSpec, get_method, method_names
from deltatune.methods.specs import specs_from_config
from deltatune.testing import tiny_model

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 40], [1, 7, 8, 100, 200, 300, 2, 2]])

CASES = {
    "lora": [MethodSpec("lora", rank=4)],
    "rslora": [MethodSpec("rslora", rank=4)],
    "dora": [MethodSpec("dora", rank=4)],
    "mora": [MethodSpec("mora", rank=4)],
    "ia3": [MethodSpec("ia3")],
    "vera": [MethodSpec("vera", rank=4)],
    "bitfit": [MethodSpec("bitfit")],
    "adapter-houlsby": [MethodSpec("adapter", options={"bottleneck": 4})],  # trains the norms too
    "adapter-pfeiffer": [MethodSpec("adapter", options={"bottleneck": 4, "variant": "pfeiffer"})],
    "prompt": [MethodSpec("prompt", options={"num_virtual_tokens": 3})],
    "prefix": [MethodSpec("prefix", options={"num_virtual_tokens": 3})],
    "prefix-mlp": [MethodSpec("prefix", options={"num_virtual_tokens": 3, "reparameterize": True, "hidden": 8})],
    "lora+bitfit": [MethodSpec("lora", rank=2), MethodSpec("bitfit")],
    "lora+adapter": [MethodSpec("lora", rank=2, targets="q_proj"), MethodSpec("adapter", options={"bottleneck": 4})],
}
# Not in CASES, with the reason: full finetuning keeps no copy of the base (disable is a one-line
# error, tested below); qlora's base is the NF4 round trip (tests/test_dora_mora_ia3_qlora_universal.py).
NOT_DISABLEABLE_HERE = {"full", "qlora"}


def _randomised(specs):
    adapted = apply_methods(tiny_model(0), specs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return adapted


def test_every_registered_method_has_a_disable_case():
    covered = {s.name for specs in CASES.values() for s in specs}
    assert set(method_names()) - NOT_DISABLEABLE_HERE <= covered


@pytest.mark.parametrize("case", sorted(CASES))
def test_disable_gives_base_exactly_and_enable_gives_adapted_back(case):
    adapted = _randomised(CASES[case])
    model = adapted.model
    base = tiny_model(0)(IDS).logits
    with torch.no_grad():
        on = model(IDS).logits
        assert not torch.allclose(on, base, atol=1e-4)  # the randomised adapter really changes the output
        with adapted.disable_adapters():
            off = model(IDS).logits
        again = model(IDS).logits
    assert torch.equal(off, base)
    assert torch.equal(again, on)


def test_full_finetuning_cannot_be_disabled_and_says_why():
    adapted = apply_methods(tiny_model(0), MethodSpec("full"))
    with pytest.raises(ConfigError, match="cannot be disabled: full finetuning changes the weights"):
        with adapted.disable_adapters():
            pass


@pytest.mark.parametrize("name", sorted(set(method_names())))
def test_unknown_option_is_one_line_listing_the_valid_ones(name):
    with pytest.raises(ConfigError) as err:
        get_method(name)(MethodSpec(name, options={"no_such_option": 1}))
    text = str(err.value)
    assert "\n" not in text and f"unknown option 'no_such_option' for method '{name}'" in text
    schema = get_method(name).options_schema
    assert ("valid options: " + ", ".join(sorted(schema))) in text if schema else "takes no options" in text


def test_option_types_and_choices_are_checked():
    with pytest.raises(ConfigError, match="option init must be one of kaiming, gaussian"):
        get_method("lora")(MethodSpec("lora", options={"init": "xavier"}))
    with pytest.raises(ConfigError, match="option quantize_base must be bool"):
        get_method("dora")(MethodSpec("dora", options={"quantize_base": "yes"}))
    with pytest.raises(ConfigError, match="block_size must be an even number"):
        get_method("mora")(MethodSpec("mora", options={"block_size": 3}))


def test_capabilities_replace_names():
    caps = {n: get_method(n) for n in method_names()}
    assert {n for n, c in caps.items() if c.adds_virtual_tokens} == {"prompt", "prefix"}
    assert {n for n, c in caps.items() if c.trains_full_weights} == {"full"}
    assert {n for n, c in caps.items() if c.has_rank} == {"lora", "rslora", "qlora", "dora", "mora", "vera"}
    assert get_method("mora")(MethodSpec("mora", options={"remora_every": 10})).writes_full_model
    assert not get_method("mora")(MethodSpec("mora")).writes_full_model


def test_one_function_turns_a_config_into_specs():
    cfg = TrainConfig(method="lora+bitfit", rank=4, method_options={"init": "gaussian"})
    from_cfg = specs_from_config(cfg)
    from_yaml = specs_from_config(cfg.model_dump(mode="json"))  # what eval/forgetting read from config.yaml
    assert from_cfg == from_yaml
    assert [s.name for s in from_cfg] == ["lora", "bitfit"]
    assert from_cfg[0].options == {"init": "gaussian"} and from_cfg[1].options == {}  # only lora has `init`
    assert specs_from_config({"method": "lora"})[0].alpha == TrainConfig().alpha  # plan's default = training's
    per_method = specs_from_config({"method": "lora+adapter", "method_options": {"adapter": {"bottleneck": 4}}})
    assert per_method[1].options == {"bottleneck": 4} and per_method[0].options == {}
    with pytest.raises(ConfigError, match="option 'nope' belongs to none of the methods lora\\+bitfit"):
        specs_from_config({"method": "lora+bitfit", "method_options": {"nope": 1}})
    with pytest.raises(ConfigError, match="unknown method 'lora,bitfit'"):
        specs_from_config({"method": "lora,bitfit"})


def test_plan_accepts_plus_and_uses_training_alpha(capsys):
    from deltatune.cli import main

    assert main(["plan", "--model", "llama-7b", "--method", "lora+bitfit", "--json"]) == 0
    assert '"trainable"' in capsys.readouterr().out


def test_eval_labels_use_has_rank(tmp_path):
    from deltatune.evaluate.runs import read_run

    for method, label in (
        ("lora+bitfit", "lora+bitfit r=8"),
        ("bitfit", "bitfit"),
        ("ia3", "ia3"),
        ("mora", "mora r=8"),
    ):
        run = tmp_path / method
        run.mkdir()
        (run / "config.yaml").write_text(f"method: {method}\nrank: 8\n")
        assert read_run(run).label == label


MERGE_CASES = {
    "lora": MethodSpec("lora", rank=4),
    "dora": MethodSpec("dora", rank=4),
    "ia3": MethodSpec("ia3"),
    "vera": MethodSpec("vera", rank=4),
    **{f"mora-{t}": MethodSpec("mora", rank=4, options={"mora_type": t}) for t in (1, 2, 3, 4, 6)},
}


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_merge_inside_a_bf16_autocast_region_is_the_fp32_merge(case):
    """A merge or a weight analysis can run inside a bf16 training step's autocast (learn-forget measures its
    spectrum there): delta W must still be computed in fp32, not rounded to bf16 or refused by an in-place
    op that mixes dtypes (MoRA's index_add_ did)."""
    from deltatune.methods.base import DeltaLinear

    def merged_weights(autocast: bool) -> list[torch.Tensor]:
        model = _randomised([MERGE_CASES[case]]).model
        layers = [m for m in model.modules() if isinstance(m, DeltaLinear)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for layer in layers:
                layer.merge()
        return [layer.base.weight.detach().clone() for layer in layers]

    plain, inside = merged_weights(False), merged_weights(True)
    assert plain and all(w.dtype == torch.float32 for w in inside)
    for a, b in zip(plain, inside):
        assert torch.equal(a, b)


# --- shared_fields: what each method declares it reads is what changes its model ---------------------------

CHANGED = {"targets": "q_proj,v_proj", "rank": 2, "alpha": 4.0, "dropout": 0.5, "rslora": True}


def _observed(name: str, **fields) -> tuple[list, torch.Tensor]:
    """(trainable names and shapes, train-mode logits) of `name` on the tiny model, the trainable tensors
    filled from a fixed generator and the forward's dropout seeded: equal for equal models."""
    torch.manual_seed(0)
    options = {"num_virtual_tokens": 3} if name in ("prompt", "prefix") else {}
    adapted = apply_methods(tiny_model(), [MethodSpec(name, **fields, options=options)])
    trainable = adapted.trainable_parameters()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in trainable:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    adapted.model.train()
    torch.manual_seed(2)
    return [(n, tuple(p.shape)) for n, p in trainable], adapted.model(IDS).logits


@pytest.mark.parametrize("name", sorted(set(method_names()) - {"qlora"}))
def test_shared_fields_are_exactly_the_fields_that_change_the_method(name):
    """A declared field changes the trained tensors or the forward; an undeclared one changes neither (so
    the warning for an unused `--rank` or `targets` never lies)."""
    declared = get_method(name).shared_fields
    base_params, base_logits = _observed(name)
    for field, value in CHANGED.items():
        params, logits = _observed(name, **{field: value})
        changed = params != base_params or not torch.equal(logits, base_logits)
        assert changed == (field in declared), (name, field)


def test_a_shared_field_no_method_reads_is_reported(recwarn):
    import deltatune
    from deltatune.methods.specs import unused_fields

    assert unused_fields(["adapter"], {"rank", "targets"}, {"rank": 16, "targets": "q_proj"}) == [
        "targets 'q_proj' is not used by adapter: it changes nothing",
        "rank 16 is not used by adapter: it changes nothing",
    ]
    assert unused_fields(["lora", "bitfit"], {"rank", "alpha"}, {"rank": 4, "alpha": 8}) == []  # lora reads them
    assert unused_fields(["ia3"], {"dropout"}, {"dropout": 0.1}) == [
        "dropout 0.1 is not used by ia3: it changes nothing"
    ]
    with pytest.warns(UserWarning, match="rank 16 is not used by adapter"):
        deltatune.apply(tiny_model(), "adapter", rank=16)
    deltatune.apply(tiny_model(), "lora", rank=4)  # read: no warning
    assert not [w for w in recwarn if "is not used by" in str(w.message)]
