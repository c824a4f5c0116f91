"""Weight-change analysis: rank@90%, magnitude/direction change, regression, run reading, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from deltatune.analysis.decompose import (
    MatrixPair,
    dd_dm_fit,
    decomposition_rows,
    layer_index,
    layer_type,
    magnitude_direction,
    matrix_pairs,
    mean_by_type,
    regression,
)
from deltatune.analysis.spectrum import rank_at_energy, singular_values, spectrum_rows, summarise_by_type


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


# --- spectrum ---------------------------------------------------------------------------------


def test_rank90_of_known_singular_values_is_exact():
    # s = 4, 3, 2, 1, 0.5: energies 16, 9, 4, 1, 0.25 (total 30.25); 90% = 27.225 -> 16+9+4 = 29 >= it, k = 3
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    u, v = _orthogonal(6, 0)[:, :5], _orthogonal(5, 1)
    m = u @ torch.diag(s) @ v.T
    assert torch.allclose(singular_values(m), s, atol=1e-12)
    assert rank_at_energy(singular_values(m), 0.9) == 3
    assert rank_at_energy(s, 0.5) == 1  # 16 / 30.25 = 0.53
    assert rank_at_energy(s, 0.99) == 4  # 29.99 / 30.25 = 0.9914 ... 30/30.25 = 0.9917 -> k=4
    assert rank_at_energy(s, 1.0) == 5
    # the boundary is inclusive: (3, 1) has 9/10 = 90% in the first value exactly
    assert rank_at_energy(torch.tensor([3.0, 1.0]), 0.9) == 1
    assert rank_at_energy(torch.zeros(4), 0.9) == 0


@pytest.mark.parametrize("k", [1, 3, 8])
def test_rank90_of_a_rank_k_matrix_is_at_most_k(k):
    g = torch.Generator().manual_seed(k)
    m = torch.randn(40, k, generator=g) @ torch.randn(k, 30, generator=g)
    s = singular_values(m)
    assert 1 <= rank_at_energy(s, 0.9) <= k
    assert rank_at_energy(s, 1.0) == k  # float64 SVD: the zero tail holds no energy


def test_rank90_of_gaussian_noise_is_about_half():
    g = torch.Generator().manual_seed(0)
    n = 128
    r = rank_at_energy(singular_values(torch.randn(n, n, generator=g, dtype=torch.float64)), 0.9)
    assert 0.45 * n <= r <= 0.6 * n


def test_spectrum_rows_of_a_lora_update(tiny_lm):
    from deltatune.methods import MethodSpec
    from deltatune.methods.apply import apply_methods

    adapted = apply_methods(tiny_lm, MethodSpec("lora", targets="q_proj,down_proj", rank=4, alpha=8))
    torch.manual_seed(1)
    for m in adapted.model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight)
    rows = spectrum_rows(matrix_pairs(adapted.model))
    assert {r["type"] for r in rows} == {"q_proj", "down_proj"} and len(rows) == 4
    for r in rows:
        assert 1 <= r["rank90"] <= 4 and r["full_rank"] == 64
        assert len(r["singular_values"]) == 64 and r["singular_values"][4] < 1e-4 * r["singular_values"][0]


def test_relative_update_size_is_the_frobenius_ratio():
    # W0 = 2 I (||W0||_F = 2 sqrt(3)); dW = diag(3, 4, 0) (||dW||_F = 5)
    base = 2 * torch.eye(3)
    pair = MatrixPair("model.layers.0.self_attn.q_proj", base, base + torch.diag(torch.tensor([3.0, 4.0, 0.0])))
    (row,) = spectrum_rows([pair])
    assert row["rel_norm"] == pytest.approx(5 / (2 * 3**0.5), rel=1e-12)
    assert summarise_by_type([row, {**row, "rel_norm": 0.0}])[0]["rel_norm_mean"] == pytest.approx(5 / (4 * 3**0.5))
    assert summarise_by_type([row])[0]["full_rank"] == 3  # the spectrum plot draws it dashed


# --- magnitude and direction ------------------------------------------------------------------


def test_magnitude_direction_hand_built():
    w0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    w = torch.tensor([[6.0, 8.0], [0.0, 2.0]])
    # row norms 5 -> 10 and 1 -> 2: dM = (5 + 1) / 2 = 3; row 0 keeps its direction (1 - cos = 0),
    # row 1 turns by 90 degrees (1 - cos = 1): dD = 0.5
    dm, dd = magnitude_direction(w0, w)
    assert dm == pytest.approx(3.0) and dd == pytest.approx(0.5)
    # a 60-degree turn with the norm kept: dM = 0, dD = 1 - cos 60 = 0.5
    turned = torch.tensor([[math.cos(math.pi / 3), math.sin(math.pi / 3)]])
    dm, dd = magnitude_direction(torch.tensor([[1.0, 0.0]]), turned)
    assert dm == pytest.approx(0.0, abs=1e-7) and dd == pytest.approx(0.5)


def test_zero_rows_have_not_turned_or_have_no_direction():
    """A row that is zero in both weights counted as a full turn (cos 0): an unchanged head with zero rows for
    reserved tokens gave dD 0.25. Zero in both: no turn; zero on one side only: no direction, left out of dD."""
    w0 = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    assert magnitude_direction(w0, w0) == (0.0, 0.0)
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    # dM = (0 + 0 + 1 + 1) / 4; dD over rows 0-2 (row 3 had no direction): (0 + 0 + 1) / 3
    dm, dd = magnitude_direction(w0, w)
    assert dm == pytest.approx(0.5) and dd == pytest.approx(1 / 3)
    dm, dd = magnitude_direction(torch.zeros(2, 2), torch.eye(2))
    assert dm == pytest.approx(1.0) and math.isnan(dd)


def test_per_output_unit_convention():
    # scaling one INPUT column changes every row's norm; scaling one OUTPUT row changes one norm
    w0 = torch.eye(3)
    row = w0.clone()
    row[0] *= 2.0
    assert magnitude_direction(w0, row) == pytest.approx((1 / 3, 0.0))


def test_regression_hand_numbers():
    fit = regression([0.0, 1.0, 2.0], [1.0, 3.0, 5.0])
    assert fit["slope"] == pytest.approx(2.0) and fit["intercept"] == pytest.approx(1.0)
    assert fit["correlation"] == pytest.approx(1.0)
    fit = regression([0.0, 1.0, 2.0, 3.0], [3.0, 1.0, 2.0, 0.0])  # sxy = -4, sxx = 5, syy = 5
    assert fit["slope"] == pytest.approx(-0.8) and fit["correlation"] == pytest.approx(-0.8)
    assert math.isnan(regression([1.0], [2.0])["slope"])


def test_layer_names():
    assert layer_type("model.layers.12.mlp.down_proj") == "down_proj"
    assert layer_index("model.layers.12.mlp.down_proj") == 12
    assert layer_index("lm_head") is None


def test_matrix_pairs_lora_equals_delta_weight_and_leaves_model_alone(tiny_lm):
    from deltatune.methods import MethodSpec
    from deltatune.methods.apply import apply_methods

    adapted = apply_methods(tiny_lm, MethodSpec("lora", targets="v_proj", rank=2, alpha=4))
    mods = [m for m in adapted.model.modules() if hasattr(m, "lora_B")]
    for m in mods:
        torch.nn.init.normal_(m.lora_B.weight)
    before = [m.base.weight.clone() for m in mods]
    pairs = matrix_pairs(adapted.model)
    assert [p.name for p in pairs] == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    for p, m, b in zip(pairs, mods, before):
        assert torch.allclose(p.weight - p.base, m.delta_weight(), atol=1e-6)
        assert torch.equal(m.base.weight, b) and not m.merged


def test_matrix_pairs_full_finetune_only_changed_layers(tiny_lm):
    import copy

    tuned = copy.deepcopy(tiny_lm)
    with torch.no_grad():
        tuned.model.layers[1].mlp.up_proj.weight.add_(0.01)
    pairs = matrix_pairs(tuned, tiny_lm)
    assert [p.name for p in pairs] == ["model.layers.1.mlp.up_proj"]
    assert torch.allclose(pairs[0].weight - pairs[0].base, torch.full_like(pairs[0].base, 0.01), atol=1e-6)


def test_matrix_pairs_of_an_adapter_beside_full_finetuning(tiny_lm):
    """ "lora+full": the fully trained linears were dropped as soon as any DeltaLinear existed."""
    import copy

    from deltatune.methods import MethodSpec
    from deltatune.methods.apply import apply_methods

    base = copy.deepcopy(tiny_lm)
    adapted = apply_methods(tiny_lm, MethodSpec("lora", targets="v_proj", rank=2, alpha=4))
    for m in adapted.model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight)
    with torch.no_grad():
        adapted.model.model.layers[1].mlp.up_proj.weight.add_(0.01)
    pairs = matrix_pairs(adapted.model, base)
    assert [p.name for p in pairs] == [
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.up_proj",
    ]  # in the model's order
    assert torch.allclose(pairs[2].weight - pairs[2].base, torch.full_like(pairs[2].base, 0.01), atol=1e-6)


def test_mean_by_type_and_fit():
    pairs = [
        MatrixPair("model.layers.0.q_proj", torch.eye(2), 2 * torch.eye(2)),
        MatrixPair("model.layers.1.q_proj", torch.eye(2), 3 * torch.eye(2)),
    ]
    rows = decomposition_rows(pairs, "step 5", 5)
    by = mean_by_type(rows)
    assert by == [{"checkpoint": "step 5", "step": 5, "type": "q_proj", "matrices": 2, "dM": 1.5, "dD": 0.0}]
    assert dd_dm_fit(rows)["points"] == 2


# --- a run folder, end to end through `deltatune analyze` -------------------------------------


@pytest.fixture
def lora_run(tmp_path, tiny_lm, tiny_tok):
    """base model folder + run folder with config.yaml, two checkpoints and final/ (LoRA r=2 on q,v)."""
    from deltatune.methods import MethodSpec
    from deltatune.methods.apply import apply_methods

    base_dir = tmp_path / "base"
    tiny_lm.save_pretrained(base_dir)
    tiny_tok.save_pretrained(base_dir)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": str(base_dir), "method": "lora", "rank": 2, "alpha": 4.0, "targets": "q_proj,v_proj"})
    )
    adapted = apply_methods(tiny_lm, MethodSpec("lora", targets="q_proj,v_proj", rank=2, alpha=4.0))
    torch.manual_seed(0)
    for m in adapted.model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    trainable = dict(adapted.trainable_parameters())
    for step, scale in ((10, 0.25), (20, 0.5)):
        ck = run / "checkpoints" / f"step-{step}"
        ck.mkdir(parents=True)
        save_file(
            {n: (p * scale if "lora_B" in n else p).detach().contiguous() for n, p in trainable.items()},
            str(ck / "trainable.safetensors"),
        )
        (ck / "meta.json").write_text(json.dumps({"position": {"step": step}}))
    adapted.save_adapter(run / "final")
    return base_dir, run, adapted


def test_read_run(lora_run):
    from deltatune.evaluate.runs import read_run

    _, run, _ = lora_run
    info = read_run(run)
    assert info.label == "lora r=2" and info.method == "lora" and info.rank == 2
    assert info.final.kind == "adapter" and [c.step for c in info.checkpoints] == [10, 20]


def test_analyze_cli_end_to_end(lora_run, tmp_path):
    from deltatune.cli import main

    base_dir, run, adapted = lora_run
    out = tmp_path / "analysis"
    assert main(["analyze", "--base", str(base_dir), "--run", str(run), "--out", str(out)]) == 0
    for name in ("decomposition.md", "decomposition.json", "spectrum.md", "spectrum.json", "dd_dm.png", "spectrum.png"):
        assert (out / name).stat().st_size > 0
    dec = json.loads((out / "decomposition.json").read_text())["decomposition"]
    assert len(dec["points"]) == 4 * 3  # 4 adapted matrices x (2 checkpoints + final)
    # the checkpoint with B scaled by 0.5 moved each matrix's magnitude; check one by hand
    name = "model.layers.0.self_attn.q_proj"
    mod = adapted.model.get_submodule(name)
    w0 = mod.base.weight.detach()
    expected = magnitude_direction(w0, w0 + 0.5 * mod.delta_weight())
    point = next(p for p in dec["points"] if p["name"] == name and p["step"] == 20)
    assert (point["dM"], point["dD"]) == pytest.approx(expected, rel=1e-5)
    from deltatune.analysis.decompose import dd_dm_fit_within_types

    assert dec["fit_within_types"] == pytest.approx(dd_dm_fit_within_types(dec["points"]), nan_ok=True)
    assert "| all, within types | 12 |" in (out / "decomposition.md").read_text()
    spec = json.loads((out / "spectrum.json").read_text())["spectrum"]
    assert spec["snapshot"] == "final" and all(1 <= m["rank90"] <= 2 for m in spec["matrices"])


def test_analyze_cli_bad_run_exits_2(tmp_path, capsys):
    from deltatune.cli import main

    assert main(["analyze", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_matrix_pairs_dora_uses_the_rescaled_merged_weight(tiny_lm):
    from deltatune.methods import MethodSpec
    from deltatune.methods.apply import apply_methods

    adapted = apply_methods(tiny_lm, MethodSpec("dora", targets="o_proj", rank=2, alpha=4))
    torch.manual_seed(0)
    mods = [m for m in adapted.model.modules() if hasattr(m, "lora_magnitude_vector")]
    with torch.no_grad():
        for m in mods:
            torch.nn.init.normal_(m.lora_B.weight, std=0.1)
            m.lora_magnitude_vector.mul_(1.0 + 0.1 * torch.rand_like(m.lora_magnitude_vector))
    for p, m in zip(matrix_pairs(adapted.model), mods):
        mag = m.lora_magnitude_vector.detach().double()
        # DoRA's merge defines the row norms of the merged weight as the magnitude vector
        assert torch.allclose(p.weight.double().norm(dim=1), mag, rtol=1e-5)
        dm, _ = magnitude_direction(p.base, p.weight)
        assert dm == pytest.approx(float((mag - p.base.double().norm(dim=1)).abs().mean()), rel=1e-4)
        assert not m.merged


def test_analyze_works_on_an_nf4_base(tmp_path, tiny_lm, tiny_tok):
    """QLoRA (and any weight-delta method with quantize_base): W0 is the dequantised NF4 weight, the
    merged weight is W0 + delta W, and `deltatune analyze` runs on the run folder."""
    from deltatune.cli import main
    from deltatune.methods import MethodSpec
    from deltatune.methods.apply import apply_methods

    base_dir = tmp_path / "base"
    tiny_lm.save_pretrained(base_dir)
    tiny_tok.save_pretrained(base_dir)
    spec = MethodSpec("qlora", targets="q_proj,v_proj", rank=2, alpha=4.0, options={"compute_dtype": "float32"})
    adapted = apply_methods(tiny_lm, spec)
    torch.manual_seed(0)
    for m in adapted.model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    pairs = matrix_pairs(adapted.model)
    assert len(pairs) == 4
    for p in pairs:
        mod = adapted.model.get_submodule(p.name)
        assert torch.equal(p.base, mod.base.dequantize(torch.float32))  # the 4-bit base, not the original
        torch.testing.assert_close(p.weight, p.base + mod.delta_weight(), rtol=0, atol=1e-6)
        assert mod.base_is_quantized  # analysis left the model alone
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(base_dir), "method": "qlora", "rank": 2}))
    adapted.save_adapter(run / "final")
    out = tmp_path / "analysis"
    assert main(["analyze", "--base", str(base_dir), "--run", str(run), "--out", str(out)]) == 0
    assert len(json.loads((out / "decomposition.json").read_text())["decomposition"]["points"]) == 4


def test_the_headline_fit_is_within_layer_types_not_pooled():
    """Simpson's paradox by hand: in each type dM falls as dD rises (slope -1), but the type with larger dD
    also has larger dM, so the pooled fit rises. The within-types fit finds the slope of every type."""
    from deltatune.analysis.decompose import dd_dm_fit_within_types

    q = [(0.0, 1.0), (1.0, 0.0), (2.0, -1.0)]  # (dD, dM): slope -1, mean (1, 0)
    down = [(10.0, 11.0), (11.0, 10.0), (12.0, 9.0)]  # slope -1, mean (11, 10)
    rows = [{"type": "q_proj", "dD": x, "dM": y} for x, y in q] + [
        {"type": "down_proj", "dD": x, "dM": y} for x, y in down
    ]
    assert dd_dm_fit(rows)["slope"] > 0 and dd_dm_fit(rows)["correlation"] > 0.9  # pooled: the wrong sign
    within = dd_dm_fit_within_types(rows)
    assert within["slope"] == pytest.approx(-1.0) and within["correlation"] == pytest.approx(-1.0)
    assert within["points"] == 6 and within["intercept"] == pytest.approx(5.0 + 6.0)  # through the mean (6, 5)


def test_two_modules_sharing_a_name_are_two_layer_types():
    """GPT-2's attn.c_proj (32x32) and mlp.c_proj (32x128) were one type "c_proj": averaged together in every table
    and fit, and spectrum.md's per-layer grid kept one of the two."""
    from deltatune.analysis.decompose import MatrixPair, decomposition_rows, layer_types
    from deltatune.analysis.spectrum import spectrum_rows, summarise_by_type

    gpt2 = [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert [layer_types(gpt2)[n] for n in gpt2[:4]] == ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    llama = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")]
    assert set(layer_types(llama).values()) == {"q_proj", "down_proj"}  # unchanged where names are unique
    g = torch.Generator().manual_seed(0)
    pairs = []
    for name in gpt2:
        shape = (32, 128) if name.endswith("mlp.c_proj") else (32, 32)
        base = torch.randn(shape, generator=g)
        pairs.append(MatrixPair(name, base, base + 0.1 * torch.randn(shape, generator=g)))
    by_type = {s["type"]: s for s in summarise_by_type(spectrum_rows(pairs))}
    assert by_type["attn.c_proj"]["matrices"] == 2 and by_type["mlp.c_proj"]["matrices"] == 2
    assert {r["type"] for r in decomposition_rows(pairs)} == {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"}


def test_analyze_keeps_an_earlier_analysis_and_names_a_damaged_snapshot(lora_run, tmp_path, capsys):
    """An earlier analysis in --out was replaced without asking; a truncated snapshot or one of other shapes than
    config.yaml says gave a traceback; a snapshot lacking tensors was analysed with them at their initial values
    (an update of zero); bad YAML in config.yaml was an 8-line message."""
    import shutil

    from deltatune.cli import main

    base_dir, run, _ = lora_run
    out = tmp_path / "analysis"
    assert main(["analyze", "--base", str(base_dir), "--run", str(run), "--out", str(out)]) == 0
    before = (out / "spectrum.json").read_bytes()
    assert (
        main(["analyze", "--base", str(base_dir), "--run", str(run), "--out", str(out), "--checkpoints", "final"]) == 2
    )
    assert "--overwrite" in capsys.readouterr().err and (out / "spectrum.json").read_bytes() == before
    assert main(["analyze", "--base", str(base_dir), "--run", str(run), "--out", str(out), "--overwrite"]) == 0

    def damaged(name, change) -> str:
        copy = tmp_path / name
        shutil.copytree(run, copy)
        change(copy)
        capsys.readouterr()
        assert main(["analyze", "--base", str(base_dir), "--run", str(copy), "--out", str(tmp_path / f"o-{name}")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("error:") == 1 and not (tmp_path / f"o-{name}").exists(), err
        assert len(err.split("error:")[1].strip().splitlines()) == 1, err
        return err

    weights = "checkpoints/step-20/trainable.safetensors"
    cut = damaged("cut", lambda r: (r / weights).write_bytes((r / weights).read_bytes()[:100]))
    assert f"{weights}: not a readable safetensors file" in cut

    def drop_layer_1(r):
        state = load_file(str(r / weights))
        save_file({k: v for k, v in state.items() if "layers.1." not in k}, str(r / weights))

    assert "lacks 4 trained tensor(s), e.g. 'model.layers.1." in damaged("lacking", drop_layer_1)

    def other_rank(r):
        (r / "final").rename(r / "final-away")  # the method then comes from config.yaml
        (r / "config.yaml").write_text((r / "config.yaml").read_text().replace("rank: 2", "rank: 3"))

    assert "has shape (2, 64), the model expects (3, 64)" in damaged("rank", other_rank)
    bad_yaml = damaged("yaml", lambda r: (r / "config.yaml").write_text("method: lora\nrank: [2\n"))
    assert "config.yaml:3: not valid YAML" in bad_yaml or "config.yaml:2: not valid YAML" in bad_yaml


@pytest.mark.parametrize("given", ["run", "adapter folder"])
def test_a_damaged_adapter_is_blamed_on_the_run_flag_the_user_gave(lora_run, tmp_path, capsys, given):
    """The error named field 'adapter', a flag analyze does not have; a damaged checkpoint already named 'run'."""
    from deltatune.cli import main

    base_dir, run, _ = lora_run
    weights = run / "final" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    folder = run if given == "run" else run / "final"
    args = ["analyze", "--base", str(base_dir), "--run", str(folder), "--out", str(tmp_path / "o")]
    assert main([*args, "--checkpoints", "final"]) == 2
    err = capsys.readouterr().err
    assert f"error: field 'run': {weights}: not a readable safetensors file" in err, err


def test_an_adapter_folder_alone_is_analysed_against_the_base_it_records(lora_run, tmp_path, capsys):
    """Without config.yaml, analyze loaded the default model for an adapter folder (and blamed the adapter for
    lacking 392 tensors); forgetting already read the adapter's base_model_name_or_path."""
    import shutil

    from deltatune.cli import main

    base_dir, run, _ = lora_run
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "final", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base_dir)}))
    assert main(["analyze", "--run", str(adapter), "--out", str(tmp_path / "alone")]) == 0, capsys.readouterr().err
    given = ["analyze", "--base", str(base_dir), "--run", str(adapter), "--out", str(tmp_path / "given")]
    assert main(given) == 0
    alone = json.loads((tmp_path / "alone" / "spectrum.json").read_text())["spectrum"]
    assert alone == json.loads((tmp_path / "given" / "spectrum.json").read_text())["spectrum"]


def test_analyze_says_when_a_model_is_stored_in_bf16(lora_run, tmp_path, capsys):
    """A merge saved in bf16 measured bf16's rounding as part of dW (rank@90% 7 became 100 in one check), silently."""
    from deltatune.cli import main

    base_dir, run, _ = lora_run
    for dtype in ("bf16", "fp32"):
        merged = tmp_path / f"merged-{dtype}"
        args = ["merge", "--model", str(base_dir), "--adapter", str(run / "final"), "--out", str(merged)]
        assert main([*args, "--save-dtype", dtype]) == 0
        capsys.readouterr()
        out = tmp_path / f"a-{dtype}"
        assert main(["analyze", "--base", str(base_dir), "--run", str(merged), "--out", str(out)]) == 0
        warned = "stores weights in bf16: the rounding to it is part of the dW" in capsys.readouterr().err
        assert warned == (dtype == "bf16")


def test_the_spectrum_grid_shows_every_expert_of_a_layer():
    """The per-layer grid kept one matrix per (layer, type): a mixture's eight experts of layer 0 showed as the last
    one alone. Several matrices of a type in a layer show their range of ranks and their count."""
    from deltatune.cli.analyze import spectrum_markdown

    def row(name, rank):
        return {"name": name, "type": layer_type(name), "layer": layer_index(name), "rank90": rank, "full_rank": 64}

    experts = [row(f"model.layers.0.mlp.experts.{e}.up_proj", r) for e, r in enumerate([3, 9, 5])]
    matrices = [*experts, row("model.layers.0.self_attn.q_proj", 4), row("model.layers.1.mlp.experts.0.up_proj", 7)]
    result = {
        "label": "moe",
        "energy": 0.9,
        "spectrum": {"snapshot": "final", "matrices": matrices, "by_type": [], "over_time": []},
    }
    text = spectrum_markdown(result)
    grid = text.split("per layer\n\n")[1].split("\n\n")[0]
    assert grid.splitlines()[2:] == ["| 0 | 4/64 | 3-9/64 (x3) |", "| 1 |  | 7/64 |"]
