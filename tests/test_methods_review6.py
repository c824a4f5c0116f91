"""Review 6 of the methods and the Python API: BitFit beside LoRA on an NF4 base, keyword options given to the
methods that have them, an (IA)3 vector with a zero unmerged exactly, a refused merge_and_unload that leaves the
model as it was, and one-line errors for rslora and targets of the wrong type."""

import pytest
import torch

import deltatune
from deltatune.errors import ConfigError
from deltatune.methods.base import MethodSpec
from deltatune.testing import tiny_model


def _ids():
    return torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(0))


def test_lora_plus_bitfit_trains_on_an_nf4_base_and_reloads(tmp_path):
    """QLoRA with BitFit: refused with "no module matches targets 'all-linear'" (the quantised base was not a
    linear slot), though the API allows BitFit beside LoRA on an NF4 base."""
    adapted = deltatune.apply(tiny_model(), "lora+bitfit", quantize="nf4")
    biases = [n for n, _ in adapted.trainable_parameters() if n.endswith(".bias")]
    assert len(biases) == 14  # 7 linears in each of 2 layers
    ids = _ids()
    adapted.model(input_ids=ids, labels=ids).loss.backward()
    grads = dict(adapted.trainable_parameters())
    assert all(grads[n].grad is not None and grads[n].grad.abs().sum() > 0 for n in biases)
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(p.dtype) * 0.05)
        expected = adapted.model(input_ids=ids).logits
    adapted.save_adapter(tmp_path / "a")
    loaded = deltatune.load_adapter(tiny_model(), tmp_path / "a")  # the file records the NF4 base
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, expected)


def test_a_keyword_option_goes_to_the_methods_that_have_it_as_on_the_command_line():
    """`apply(m, "lora+bitfit", init="gaussian")` raised "unknown option 'init' for method 'bitfit'"."""
    from deltatune.api.model import method_specs
    from deltatune.methods.specs import specs_from_config

    api = method_specs("lora+bitfit", init="gaussian")
    cli = specs_from_config({"method": "lora+bitfit", "method_options": {"init": "gaussian"}})
    assert [(s.name, s.options) for s in api] == [(s.name, s.options) for s in cli]
    assert [s.options for s in api] == [{"init": "gaussian"}, {}]
    per_method = method_specs("lora+ia3", lora={"init": "gaussian"})
    assert [s.options for s in per_method] == [{"init": "gaussian"}, {}]
    with pytest.raises(ConfigError, match="belongs to none of the methods"):
        method_specs("lora+bitfit", feedforward_modules=["down_proj"])


def test_an_ia3_vector_with_a_zero_merges_and_unmerges_exactly():
    """unmerge refused a zero entry after merge had accepted it, with some layers unmerged and the rest stuck
    merged; merge had kept every weight that dividing by zero cannot give back."""
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = deltatune.apply(model, "ia3")
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
        layer = adapted.model.model.layers[1].self_attn.v_proj
        layer.ia3_l.view(-1)[3] = 0.0
        ids = _ids()
        unmerged = adapted.model(input_ids=ids).logits
        adapted.merge()
        assert (adapted.model(input_ids=ids).logits - unmerged).abs().max() < 1e-5
        adapted.unmerge()
        assert torch.equal(adapted.model(input_ids=ids).logits, unmerged)
        with adapted.disabled():
            base = adapted.model(input_ids=ids).logits
    assert torch.equal(base, tiny_model()(input_ids=ids).logits)
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "ia3_l" not in k}
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_refused_merge_and_unload_leaves_the_model_as_it_was():
    """BitFit's bias on lm_head cannot be described by the config, so merge_and_unload refuses, and leaves the
    model as it was (it had merged the head by then). The adapted head has its own copy of the tied weight from
    the start (`apply` unties it: tests/test_api_review8.py)."""
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    specs = [
        MethodSpec(name="lora", targets="all-linear,lm_head", rank=2, alpha=4),
        MethodSpec(name="bitfit", targets="lm_head"),
    ]
    adapted = deltatune.apply(model, specs)
    head = adapted.model.lm_head.base.weight
    assert head is not adapted.model.model.embed_tokens.weight and torch.equal(head, model.model.embed_tokens.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="bias"):
        adapted.merge_and_unload()
    assert model.config.tie_word_embeddings is False
    assert adapted.model.lm_head.base.weight is head and not adapted.model.lm_head.merged
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rslora": "false"}, "rslora"),
        ({"targets": 5}, "targets"),
        ({"targets": ["q_proj", 3]}, "targets"),
    ],
)
def test_settings_of_the_wrong_type_are_one_line_errors_and_leave_the_model(kwargs, field):
    """rslora="false" gave rsLoRA's scaling (a non-empty string is true); targets=5 and ["q_proj", 3] were a
    TypeError / AttributeError traceback from inside the target matching."""
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        deltatune.apply(model, "lora", rank=4, alpha=8, **kwargs)
    assert err.value.field == field and "\n" not in str(err.value)
    assert model.state_dict().keys() == before.keys()


@pytest.mark.parametrize("second", ["lora", "bitfit"])
def test_a_second_apply_on_one_model_is_one_line_and_changes_nothing(second):
    """A second LoRA was refused with "a later method froze it"; a second call with BitFit froze the first LoRA's
    parameters silently (the AdaptedModel it returned knew only BitFit)."""
    model = tiny_model()
    first = deltatune.apply(model, "lora", rank=2, alpha=4, targets="q_proj")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(ConfigError, match=r"already carries lora from an earlier call; .* in one call \('lora"):
        deltatune.apply(model, second, targets="v_proj")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    first.merge_and_unload()  # a plain model again: a new method trains on the merged weights
    assert [m.name for m in deltatune.apply(model, second, targets="v_proj").methods] == [second]
