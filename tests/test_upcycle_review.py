"""Review of sparse upcycling: train/eval mode of the new blocks, bad layer choices and capacities."""

import math

import pytest
import torch

from deltatune.cli import main
from deltatune.errors import UserError
from deltatune.testing import tiny_model, tiny_tokenizer
from deltatune.upcycle.convert import UpcycleSpec, upcycle
from deltatune.upcycle.io import load_upcycled, save_upcycled


def _ids():
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))


def test_upcycled_blocks_follow_the_models_eval_mode_so_nothing_is_dropped_at_inference(tmp_path):
    model = tiny_model(num_hidden_layers=4)  # in eval mode
    upcycle(model, UpcycleSpec(experts=4, layers=[1, 3], capacity=0.5), seed=1)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        ref = model(_ids()).logits
    assert all(int(model.model.layers[i].mlp.last_routing["dropped"]) == 0 for i in (1, 3))
    save_upcycled(model, None, tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(load_upcycled(tmp_path / "out")(_ids()).logits, ref)
    model.train()  # training mode drops again
    model(_ids())
    assert int(model.model.layers[1].mlp.last_routing["dropped"]) > 0


def test_upcycled_blocks_of_a_training_model_train():
    model = tiny_model(num_hidden_layers=2).train()
    upcycle(model, UpcycleSpec(experts=4, layers=[1]))
    assert model.model.layers[1].mlp.training and model.model.layers[1].mlp.router.training


@pytest.mark.parametrize(
    "layers,message",
    [([5], "layer 5 does not exist"), ([-1], "layer -1 does not exist"), ([], "no layers"), ([1, 1], "twice")],
)
def test_upcycle_refuses_bad_layer_lists_with_a_user_error(layers, message):
    with pytest.raises(UserError, match=message):
        upcycle(tiny_model(num_hidden_layers=2), UpcycleSpec(experts=2, layers=layers))


@pytest.mark.parametrize("capacity", [math.nan, math.inf])
def test_upcycle_refuses_a_capacity_that_is_not_finite(capacity):
    with pytest.raises(UserError, match="capacity"):
        upcycle(tiny_model(num_hidden_layers=2), UpcycleSpec(experts=2, layers=[1], capacity=capacity))


def test_upcycle_command_refuses_a_model_with_no_layer_to_upcycle(tmp_path, capsys):
    dense = tmp_path / "one"
    tiny_model(num_hidden_layers=1).save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    out = tmp_path / "moe"
    assert main(["upcycle", "--model", str(dense), "--out", str(out)]) == 2  # every-other of 1 layer: none
    err = capsys.readouterr().err
    assert "no layers" in err and "Traceback" not in err
    assert not out.exists()  # not a dense copy that looks upcycled


def test_corrupt_upcycle_json_layers_are_a_one_line_error(tmp_path):
    import json

    model = upcycle(tiny_model(num_hidden_layers=2), UpcycleSpec(experts=2, layers=[1]))
    save_upcycled(model, None, tmp_path / "out")
    meta_file = tmp_path / "out" / "upcycle.json"
    meta = json.loads(meta_file.read_text())
    meta["spec"]["layers"] = [7]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="layer 7 does not exist"):
        load_upcycled(tmp_path / "out")


def test_an_upcycled_model_loaded_in_bf16_keeps_rope_in_float32(tmp_path):
    """As from_pretrained does: casting the whole model to bf16 also rounded RoPE's inv_freq, which shifts every
    rotary angle with position (the GGUF path had the same defect, models.cast_weights)."""
    model = tiny_model(num_hidden_layers=2)
    upcycle(model, UpcycleSpec(experts=2, layers=[1]), seed=1)
    save_upcycled(model, None, tmp_path / "out")
    loaded = load_upcycled(tmp_path / "out", dtype=torch.bfloat16)
    inv_freq = [b for n, b in loaded.named_buffers() if n.endswith("inv_freq")]
    assert inv_freq and all(b.dtype == torch.float32 for b in inv_freq)
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for n, b in tiny_model(dtype=torch.bfloat16).named_buffers() if "inv_freq" in n)
