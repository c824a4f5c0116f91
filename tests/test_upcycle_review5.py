"""Review 5 of sparse upcycling: virtual tokens through MoE blocks, refusing MoE sources, damaged folders,
the dense generation_config, the expert-choice summary line, and the exported balancing coefficient."""

import json
import shutil

import pytest
import torch

from deltatune.cli import main
from deltatune.errors import UserError
from deltatune.methods.apply import apply_methods
from deltatune.methods.base import MethodSpec
from deltatune.methods.virtual_tokens import prepended_tokens
from deltatune.testing import TINY_SHAPE, tiny_model, tiny_tokenizer, tiny_train_config
from deltatune.train.loop import train
from deltatune.upcycle.convert import UpcycleSpec, upcycle
from deltatune.upcycle.moe import moe_blocks, routed_tokens


def _upcycle_cli(src, out, *extra: str) -> None:
    assert main(["upcycle", "--model", str(src), "--experts", "4", "--out", str(out), *extra]) == 0


@pytest.fixture(scope="module")
def moe_dir(tiny_dir, tmp_path_factory):
    """Top-2 on layer 1: a Qwen2-MoE folder."""
    out = tmp_path_factory.mktemp("up5") / "moe"
    _upcycle_cli(tiny_dir, out)
    return out


@pytest.fixture(scope="module")
def ec_dir(tiny_dir, tmp_path_factory):
    """Expert choice on both layers: deltatune's format."""
    out = tmp_path_factory.mktemp("up5") / "ec"
    _upcycle_cli(tiny_dir, out, "--layers", "all", "--router", "expert-choice")
    return out


def _cfg(model, data_file, out, **kw):
    """The tiny-run config of the other tests, with two steps at lr 1e-3 and every step logged."""
    return tiny_train_config(model, data_file, out, **{"lr": 1e-3, "steps": 2, "log_every": 1, **kw})


# --- #1: prompt tuning (virtual tokens) on upcycled models ------------------------------------------------------
@pytest.mark.parametrize("which", ["moe", "ec"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_token_methods_train_on_upcycled_models(request, which, method, data_file, tmp_path):
    """Prompt tuning crashed: its virtual tokens lengthen the sequence past the [B, T] routing mask."""
    model_dir = request.getfixturevalue(f"{which}_dir")
    run = tmp_path / "run"
    options = {"num_virtual_tokens": 4}
    result = train(_cfg(model_dir, data_file, run, method=method, lr=1e-2, method_options=options), quiet=True)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "expert_load" in m] == [1, 2]
    assert all(m["moe_aux_loss"] > 0 for m in lines if "moe_aux_loss" in m)
    assert result.eval_loss is not None and (run / "final").is_dir()


def _padded_batch():
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False  # row 1: 6 real tokens, then right padding
    return ids, mask


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_route_as_real_tokens_and_padding_does_not(method):
    """Top-k without a capacity routes each token alone, so a padded batch under routed_tokens must give each
    row's real tokens the logits of that row run alone (its virtual tokens routed, as they are there)."""
    model = upcycle(tiny_model(num_hidden_layers=2), UpcycleSpec(experts=4, layers=[0, 1]), seed=2)
    adapted = apply_methods(model, MethodSpec(name=method, options={"num_virtual_tokens": 3}))
    with torch.no_grad():
        for p in adapted.model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    ids, mask = _padded_batch()
    blocks = [b for _, b in moe_blocks(model)]
    with torch.no_grad(), routed_tokens(blocks, mask, prepended_tokens(model)):
        batch = model(ids, attention_mask=mask.long()).logits
        routed = blocks[0].last_routing["logits"].shape[0]
    assert routed == int(mask.sum()) + (2 * 3 if method == "prompt" else 0)
    with torch.no_grad():
        for row in range(2):
            n = int(mask[row].sum())
            alone = model(ids[row : row + 1, :n]).logits[0]
            assert (batch[row, :n] - alone).abs().max() < 1e-5


def test_expert_choice_counts_virtual_tokens_among_the_routed_tokens():
    model = upcycle(
        tiny_model(num_hidden_layers=2), UpcycleSpec(experts=4, layers=[1], router="expert-choice", capacity=1.0)
    )
    apply_methods(model, MethodSpec(name="prompt", options={"num_virtual_tokens": 3}))
    ids, mask = _padded_batch()
    block = model.model.layers[1].mlp
    with torch.no_grad(), routed_tokens([block], mask, prepended_tokens(model)):
        model(ids, attention_mask=mask.long())
    n = int(mask.sum()) + 2 * 3
    assert block.last_routing["logits"].shape[0] == n
    assert block.last_routing["processed"].tolist() == [-(-n // 4)] * 4  # T = ceil(C n / E) of the n routed


def test_a_mask_of_another_batch_is_still_refused():
    block = upcycle(tiny_model(num_hidden_layers=2), UpcycleSpec(experts=2, layers=[1])).model.layers[1].mlp
    block.token_mask = torch.ones(3, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="another batch"):
        block(torch.randn(2, 5, 64))


@pytest.mark.parametrize(("columns", "virtual"), [(3, 0), (3, 1), (2, 2)])
def test_a_mask_with_fewer_columns_is_read_as_virtual_tokens_only_for_exactly_their_count(columns, virtual):
    """A [B, T] mask for hidden states of T' > T positions was taken as T' - T virtual tokens whatever T' was: a
    stale mask of a shorter batch routed the wrong tokens. Only prompt tuning's declared p pads it."""
    block = upcycle(tiny_model(num_hidden_layers=2), UpcycleSpec(experts=2, layers=[1])).model.layers[1].mlp
    mask = torch.ones(2, columns, dtype=torch.bool)
    with routed_tokens([block], mask, virtual), pytest.raises(RuntimeError, match="another batch"):
        block(torch.randn(2, 5, 64))
    with routed_tokens([block], mask, 5 - columns):
        assert block.mask_for(torch.Size([2, 5, 64])).tolist() == [[True] * 5] * 2


def test_prepended_tokens_counts_prompt_tuning_only_while_enabled():
    adapted = apply_methods(tiny_model(), MethodSpec(name="prompt", options={"num_virtual_tokens": 3}))
    assert prepended_tokens(adapted.model) == 3
    with adapted.disable_adapters():
        assert prepended_tokens(adapted.model) == 0
    prefixed = apply_methods(tiny_model(), MethodSpec(name="prefix", options={"num_virtual_tokens": 3}))
    assert prepended_tokens(prefixed.model) == 0 == prepended_tokens(tiny_model())


# --- #3: a source that is already a mixture of experts ----------------------------------------------------------
def _moe_source(kind: str, path) -> None:
    """A tiny random transformers MoE (no upcycle.json), as a real Mixtral / Qwen2-MoE download would be."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(TINY_SHAPE, max_position_embeddings=512)
    extra = {
        "mixtral": dict(num_local_experts=4),
        "qwen2_moe": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    }[kind]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **common, **extra)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)


@pytest.mark.parametrize("kind,key", [("mixtral", "num_local_experts"), ("qwen2_moe", "num_experts")])
def test_upcycle_refuses_a_model_that_is_already_a_mixture_of_experts(kind, key, tmp_path, capsys):
    """It wrote a folder of deep-copied sparse blocks as 'experts', which no forward could run."""
    src, out = tmp_path / "src", tmp_path / "out"
    _moe_source(kind, src)
    capsys.readouterr()
    assert main(["upcycle", "--model", str(src), "--experts", "4", "--layers", "all", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("deltatune upcycle: error: field 'model': ") and str(src) in last
    assert "already a mixture of experts" in last and key in last and "Traceback" not in err
    assert not out.exists()


def test_upcycle_function_refuses_a_mixture_of_experts_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mixtral", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_local_experts = 2, 1, 2
    with pytest.raises(UserError, match="already a mixture of experts"):
        upcycle(AutoModelForCausalLM.from_config(cfg), UpcycleSpec(experts=2, layers=[0]))


# --- #5: damaged or inconsistent upcycled folders ---------------------------------------------------------------
def _edit_meta(**changes):
    def edit(folder):
        meta = json.loads((folder / "upcycle.json").read_text())
        for key, value in changes.items():
            if key.startswith("spec_"):
                meta["spec"][key[5:]] = value
            elif key == "hidden_size":
                meta["dense_config"]["hidden_size"] = value
            else:
                meta[key] = value
        (folder / "upcycle.json").write_text(json.dumps(meta))

    return edit


def _remove(name):
    return lambda folder: (folder / name).unlink()


def _truncate(name):
    def cut(folder):
        data = (folder / name).read_bytes()[:1000]
        (folder / name).write_bytes(data)

    return cut


def _edit_config(**changes):
    """config.json edited by hand (review 8: transformers built the model from it, deltatune from upcycle.json)."""

    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            config[key] = (not config[key]) if value == "flip" else value
        (folder / "config.json").write_text(json.dumps(config))

    return edit


DAMAGE = {
    "config.json k 1": ("moe", _edit_config(num_experts_per_tok=1), "config.json: field 'num_experts_per_tok': is 1"),
    "config.json norm flipped": ("moe", _edit_config(norm_topk_prob="flip"), "config.json: field 'norm_topk_prob'"),
    "no model.safetensors": ("moe", _remove("model.safetensors"), "model.safetensors: field 'model': is missing"),
    "cut model.safetensors": ("moe", _truncate("model.safetensors"), "model.safetensors: field 'model': the weights"),
    "cut upcycled.safetensors": ("ec", _truncate("upcycled.safetensors"), "upcycled.safetensors: field 'model'"),
    "experts 8 (qwen2_moe)": ("moe", _edit_meta(spec_experts=8), "upcycle.json: field 'spec.experts': 8 experts"),
    "experts 8 (deltatune)": ("ec", _edit_meta(spec_experts=8), "upcycle.json: field 'spec.experts': 8 experts"),
    "experts '4'": ("moe", _edit_meta(spec_experts="4"), "upcycle.json: field 'spec.experts': must be an integer"),
    "k null": ("moe", _edit_meta(spec_k=None), "upcycle.json: field 'spec.k': must be an integer"),
    "spec a list": ("moe", _edit_meta(spec=[1]), "upcycle.json: field 'spec': must be an object"),
    "layers a string": ("moe", _edit_meta(spec_layers="1"), "upcycle.json: field 'spec.layers': must be a list"),
    "layers dense in the weights": ("moe", _edit_meta(spec_layers=[0]), "upcycle.json: field 'spec.layers'"),
    "router foo": ("moe", _edit_meta(spec_router="foo"), "upcycle.json: field 'spec.router': router 'foo' unknown"),
    "format foo": ("moe", _edit_meta(format="foo"), "upcycle.json: field 'format'"),
    "dense_config empty": ("moe", _edit_meta(dense_config={}), "upcycle.json: field 'dense_config'"),
    "dense_config bad field": ("moe", _edit_meta(hidden_size="x"), "upcycle.json: field 'dense_config'"),
    "dense_config other width": ("ec", _edit_meta(hidden_size=32), "upcycled.safetensors: field 'model.embed_tokens"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_upcycled_folder_is_a_one_line_error_naming_file_and_field(case, request, tmp_path, capsys):
    which, damage, expect = DAMAGE[case]
    folder = tmp_path / "m"
    shutil.copytree(request.getfixturevalue(f"{which}_dir"), folder)
    damage(folder)
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("deltatune generate: error: ")
    assert expect in last, last


# --- #6: the dense generation_config survives upcycling and the saves after it ----------------------------------
GEN = dict(eos_token_id=[2, 5], do_sample=True, temperature=0.6, top_p=0.9)


@pytest.fixture(scope="module")
def gc_dir(tiny_dir, tmp_path_factory):
    """The tiny model with a second eos id and sampling defaults in generation_config.json only."""
    folder = tmp_path_factory.mktemp("gc") / "dense"
    shutil.copytree(tiny_dir, folder)
    file = folder / "generation_config.json"
    gen = json.loads(file.read_text()) if file.is_file() else {}
    file.write_text(json.dumps({**gen, **GEN}))
    return folder


def _assert_generation_config(folder) -> None:
    from transformers import GenerationConfig

    from deltatune.models import load_model

    model, _ = load_model(str(folder))
    loaded = model.generation_config
    assert [loaded.eos_token_id, loaded.do_sample, loaded.temperature, loaded.top_p] == list(GEN.values())
    on_disk = GenerationConfig.from_pretrained(str(folder))  # what transformers' generate on the folder uses
    assert on_disk.eos_token_id == [2, 5] and on_disk.temperature == 0.6


@pytest.mark.parametrize(
    "extra,fmt",
    [((), "qwen2_moe"), (("--layers", "all", "--normalize"), "mixtral"), (("--router", "expert-choice"), "deltatune")],
)
def test_upcycling_keeps_the_dense_generation_config(gc_dir, tmp_path, extra, fmt):
    out = tmp_path / "up"
    _upcycle_cli(gc_dir, out, *extra)
    assert json.loads((out / "upcycle.json").read_text())["format"] == fmt
    _assert_generation_config(out)


@pytest.mark.parametrize("router", ["topk", "expert-choice"])
def test_full_finetuning_and_merge_keep_the_generation_config(router, gc_dir, data_file, tmp_path):
    up = tmp_path / "up"
    _upcycle_cli(gc_dir, up, "--router", router)
    train(_cfg(up, data_file, tmp_path / "full", method="full", steps=1), quiet=True)
    _assert_generation_config(tmp_path / "full" / "final")
    train(_cfg(up, data_file, tmp_path / "lora", method="lora", rank=4, alpha=8, steps=1), quiet=True)
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(tmp_path / "lora" / "final"), "--out", str(merged)]) == 0
    _assert_generation_config(merged)


# --- #7: the summary line of an expert-choice upcycle -----------------------------------------------------------
def test_expert_choice_summary_does_not_mention_softmax_weights(tiny_dir, tmp_path, capsys):
    capsys.readouterr()
    _upcycle_cli(tiny_dir, tmp_path / "ec", "--router", "expert-choice")
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("to 4 experts (expert-choice, capacity 2.0)") and "softmax" not in first
    _upcycle_cli(tiny_dir, tmp_path / "tk", "--normalize")
    assert "(topk, k=2, capacity None, renormalised weights)" in capsys.readouterr().out


# --- #2: transformers' balancing coefficient in the exported config ---------------------------------------------
def test_exported_router_aux_loss_coef_gives_transformers_the_same_balancing_loss(moe_dir):
    """transformers' loss is k times ours (f_e sums to k there): the export writes moe_aux_loss / k, so the
    weighted loss a transformers run adds (output_router_logits=True) equals deltatune's."""
    from transformers import AutoModelForCausalLM

    from deltatune.models import load_model
    from deltatune.upcycle.losses import RouterLosses

    cfg = json.loads((moe_dir / "config.json").read_text())
    assert cfg["router_aux_loss_coef"] == pytest.approx(0.01 / 2)
    assert cfg.get("output_router_logits", False) is False  # True breaks transformers' generate with a mask
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(7))
    ours, _ = load_model(str(moe_dir))
    with torch.no_grad():
        ours(ids)
        weighted = float(RouterLosses(ours, aux_weight=0.01, z_weight=0.0).collect())
        theirs = AutoModelForCausalLM.from_pretrained(str(moe_dir), output_router_logits=True)
        aux = theirs(ids).aux_loss
    assert float(theirs.config.router_aux_loss_coef * aux) == pytest.approx(weighted, rel=1e-5)


def test_the_export_after_training_carries_the_runs_balancing_weight(moe_dir, data_file, tmp_path):
    from deltatune.config import TrainConfig
    from deltatune.upcycle.moe import DEFAULT_AUX_WEIGHT

    assert TrainConfig.model_fields["moe_aux_loss"].default == DEFAULT_AUX_WEIGHT
    train(_cfg(moe_dir, data_file, tmp_path / "run", method="full", steps=1, moe_aux_loss=0.05), quiet=True)
    cfg = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert cfg["router_aux_loss_coef"] == pytest.approx(0.05 / 2)


@pytest.mark.parametrize(
    ("layers", "router", "fmt"),
    [("all", "topk", "mixtral"), ([0], "topk", "qwen2_moe"), ("all", "expert-choice", "deltatune")],
)
def test_a_loaded_upcycled_model_saves_again_with_its_balancing_weight(tmp_path, layers, router, fmt):
    """Loading an upcycled folder and saving it again wrote router_aux_loss_coef = 0.01/k, the default, whatever
    the model trained with: the weight is recorded in upcycle.json and restored on load."""
    from deltatune.upcycle.convert import parse_layers
    from deltatune.upcycle.io import load_upcycled, save_upcycled, transformers_aux_coef

    n = 2
    spec = UpcycleSpec(
        experts=4,
        layers=parse_layers(layers, n) if layers == "all" else layers,
        router=router,
        normalize=fmt == "mixtral",
    )
    moe = upcycle(tiny_model(num_hidden_layers=n), spec, seed=1)
    for _, block in moe_blocks(moe):
        block.aux_loss_weight = 0.05
    save_upcycled(moe, None, tmp_path / "first")
    assert json.loads((tmp_path / "first" / "upcycle.json").read_text())["format"] == fmt
    loaded = load_upcycled(tmp_path / "first")
    assert {b.aux_loss_weight for _, b in moe_blocks(loaded)} == {0.05}
    save_upcycled(loaded, None, tmp_path / "again")
    if fmt != "deltatune":
        coef = json.loads((tmp_path / "again" / "config.json").read_text())["router_aux_loss_coef"]
        assert coef == pytest.approx(0.05 / spec.k) == transformers_aux_coef(moe, spec)


def test_an_upcycled_folder_without_a_recorded_weight_takes_it_from_the_transformers_config(tmp_path):
    """Folders written before upcycle.json recorded the weight: router_aux_loss_coef times k."""
    from deltatune.upcycle.convert import parse_layers
    from deltatune.upcycle.io import load_upcycled, save_upcycled

    moe = upcycle(tiny_model(num_hidden_layers=2), UpcycleSpec(experts=4, layers=parse_layers("all", 2)), seed=1)
    for _, block in moe_blocks(moe):
        block.aux_loss_weight = 0.04
    save_upcycled(moe, None, tmp_path / "old")
    meta_file = tmp_path / "old" / "upcycle.json"
    meta = json.loads(meta_file.read_text())
    del meta["aux_loss_weight"]
    meta_file.write_text(json.dumps(meta))
    assert [b.aux_loss_weight for _, b in moe_blocks(load_upcycled(tmp_path / "old"))] == pytest.approx([0.04] * 2)
    meta["aux_loss_weight"] = "high"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="upcycle.json.*aux_loss_weight.*must be a number"):
        load_upcycled(tmp_path / "old")
