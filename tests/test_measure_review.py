"""Review of the measurement area: memory plans against hand computations, analyze's labels and inputs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from deltatune.analysis.memory import parameter_report, plan_finetune
from deltatune.methods.apply import apply_methods
from deltatune.methods.base import MethodSpec
from deltatune.testing import tiny_llama_config, tiny_model

CFG = tiny_llama_config()
H, I, L, V = CFG.hidden_size, CFG.intermediate_size, CFG.num_hidden_layers, CFG.vocab_size
KV = CFG.num_key_value_heads * H // CFG.num_attention_heads
LINEAR = H * H + 2 * H * KV + H * H + 3 * H * I  # q, k, v, o, gate, up, down of one layer
BASE_TOTAL = V * H + L * (LINEAR + 2 * H) + H  # tied head, 2 norms/layer + final


# --- memory plans ---------------------------------------------------------------------------------
def test_qlora_plan_counts_the_nf4_base_weights():
    """QLoRA on all linears: the 4-bit base is half a byte per weight plus its (double-quantised) scales;
    it is part of the model's parameters and of its weight memory."""
    r = 4
    spec = [MethodSpec(name="qlora", rank=r)]
    p = plan_finetune(CFG, spec, dtype="fp32", batch_size=1, seq_len=8).params
    lora = L * r * (2 * (H + H) + 2 * (H + KV) + 3 * (H + I))
    assert p.trainable == lora
    assert p.total == BASE_TOTAL + lora  # every base weight counted once, as PEFT does for 4-bit layers
    nf4 = 0
    for d_out, d_in in [(H, H), (KV, H), (KV, H), (H, H), (I, H), (I, H), (H, I)]:
        n = d_out * d_in
        blocks = -(-n // 64)
        nf4 += n // 2 + blocks + 4 * -(-blocks // 256) + 4  # codes, uint8 absmax, fp32 dq scales, fp32 offset
    other = V * H + (2 * L + 1) * H  # embeddings and norms, fp32
    assert p.weight_bytes == L * nf4 + 4 * (other + lora)
    # the same on a materialised model
    assert parameter_report(apply_methods(tiny_model(0), spec)).to_dict() == p.to_dict()


def test_qlora_plan_for_llama_7b_is_about_3_6_gib_of_weights():
    p = plan_finetune("llama-7b", [MethodSpec(name="qlora", rank=8)], dtype="bf16").params
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # 6,476,005,376 weights in NF4
    assert p.total == 6_738_415_616 + 19_988_480
    gib = p.weight_bytes / 2**30
    assert 3.5 < gib < 3.8, gib  # 0.5 B/weight + scales (3.11 GiB) + bf16 embeddings and head (0.49 GiB)
    assert p.weight_bytes > linear // 2


def test_bf16_plan_counts_fp32_master_weights_as_training_keeps_them():
    """`deltatune train --precision bf16` keeps whatever trains in fp32 (and full finetuning's whole model):
    the plan for --dtype bf16 must count those bytes, not bf16 ones."""
    lora = plan_finetune(CFG, [MethodSpec(name="lora", rank=4)], dtype="bf16", batch_size=1, seq_len=8).params
    assert lora.weight_bytes == 2 * BASE_TOTAL + 4 * lora.trainable  # bf16 frozen base, fp32 adapters
    assert lora.gradient_bytes == 4 * lora.trainable
    full = plan_finetune(CFG, [MethodSpec(name="full")], dtype="bf16", batch_size=1, seq_len=8).params
    assert full.weight_bytes == full.gradient_bytes == 4 * BASE_TOTAL  # trained from fp32 weights
    assert full.optimizer_bytes == 8 * BASE_TOTAL


# --- analyze --------------------------------------------------------------------------------------
@pytest.fixture
def small_run(tmp_path, tiny_lm, tiny_tok):
    base_dir = tmp_path / "base"
    tiny_lm.save_pretrained(base_dir)
    tiny_tok.save_pretrained(base_dir)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": str(base_dir), "method": "lora", "rank": 4, "alpha": 8.0, "targets": "q_proj"})
    )
    adapted = apply_methods(tiny_lm, MethodSpec("lora", targets="q_proj", rank=4, alpha=8.0))
    torch.manual_seed(0)
    for m in adapted.model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    adapted.save_adapter(run / "final")
    return base_dir, run


def test_analyze_labels_the_energy_asked_for(small_run, tmp_path, monkeypatch):
    """--energy 0.8: the tables and plots say rank@80%, never 90%."""
    import matplotlib.axes

    from deltatune.cli import main

    labels: list[str] = []
    for setter in ("set_ylabel", "set_xlabel", "set_title"):
        original = getattr(matplotlib.axes.Axes, setter)

        def spy(self, text, *a, _original=original, **k):
            labels.append(str(text))
            return _original(self, text, *a, **k)

        monkeypatch.setattr(matplotlib.axes.Axes, setter, spy)
    base_dir, run = small_run
    out = tmp_path / "analysis"
    assert main(["analyze", "--base", str(base_dir), "--run", str(run), "--energy", "0.8", "--out", str(out)]) == 0
    assert not [t for t in labels if "90%" in t], labels
    assert any("80%" in t for t in labels)
    md = (out / "spectrum.md").read_text()
    assert "90%" not in md and "rank90" not in md and "rank@80%_mean" in md, md


def test_analyze_refuses_an_out_that_is_a_file_before_analysing(small_run, tmp_path, capsys, monkeypatch):
    from deltatune.cli import analyze, main

    base_dir, run = small_run
    target = tmp_path / "results.txt"
    target.write_text("the user's file\n")
    called = []
    monkeypatch.setattr(analyze, "analyze_run", lambda *a, **k: called.append(1))
    assert main(["analyze", "--base", str(base_dir), "--run", str(run), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "out" in err and str(target) in err and len(err.strip().splitlines()) == 1
    assert not called and target.read_text() == "the user's file\n"


# --- devices --------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_full_finetuning_pairs_compare_a_gpu_model_with_a_cpu_base():
    """learn-forget measures full finetuning's spectrum on the model training on the GPU against the base it
    loaded on the CPU."""
    from deltatune.analysis.decompose import matrix_pairs
    from deltatune.analysis.spectrum import spectrum_rows

    base = tiny_model(0)
    trained = tiny_model(0).cuda()
    with torch.no_grad():
        trained.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    pairs = matrix_pairs(trained, base)
    assert [p.name for p in pairs] == ["model.layers.0.self_attn.q_proj"]
    assert spectrum_rows(pairs)[0]["rank90"] == 1


# --- plan's inputs --------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["1.2.3GB", ".", "e", "1e999", "+"])
def test_plan_unreadable_gpu_memory_is_one_line(size, capsys):
    from deltatune.cli import main

    assert main(["plan", "--model", "smollm2-135m", "--gpu-memory", size]) == 2
    err = capsys.readouterr().err
    assert "gpu-memory" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "text",
    ["{not json", json.dumps({"model_type": "no-such-arch"}), json.dumps({"model_type": "llama", "hidden_size": "x"})],
)
def test_plan_unreadable_model_config_is_one_line_naming_the_file(text, tmp_path, capsys):
    from deltatune.cli import main

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(text)
    assert main(["plan", "--model", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "m" / "config.json") in err and len(err.strip().splitlines()) == 1


def test_learn_forget_never_reuses_base_scores_or_data_files_of_other_sizes(tmp_path):
    """A folder retaken after a failed set-up under other sizes held the earlier attempt's base.json and data
    files: the base was then scored on other items than the runs. They are measured and written again; with the
    same sizes (a resume) they are read back."""
    from types import SimpleNamespace

    from deltatune.experiments import learn_forget as lf
    from deltatune.experiments.common import Context

    ctx = Context("learn-forget", tmp_path / "exp", quick=False, seeds=[0], model="unused", quiet=True)
    measured = []

    class FakeMeasures:
        precision = "fp32"

        def __init__(self, sizes):
            self.sizes = sizes

        def missing(self, scores):
            return []

        def base_scores(self, frozen, tasks=None):
            measured.append(dict(self.sizes))
            return {"n": {"gsm8k": self.sizes["gsm8k"]}, "eval_seconds": {}, "gsm8k": 0.5}

    first, second = FakeMeasures({"gsm8k": 40}), FakeMeasures({"gsm8k": 10})
    lf._base(ctx, first, "base.json", True)
    lf._base(ctx, second, "base.json", True)
    assert lf._base(ctx, second, "base.json", True)["n"] == {"gsm8k": 10}
    assert measured == [{"gsm8k": 40}, {"gsm8k": 10}]  # re-measured once for the new sizes, then read back

    items = [SimpleNamespace(prompt=f"q{i}", shot_answer=f"a{i}") for i in range(3)]
    path = lf._gsm8k_test_file(ctx, items)
    assert path.read_text().count("\n") == 3
    lf._gsm8k_test_file(ctx, items[:1])
    assert path.read_text().count("\n") == 1


def test_masking_records_its_resolved_plan_so_a_folder_of_other_defaults_is_refused(tmp_path, monkeypatch):
    """Like learn-forget's sizes: the masking experiment's manifest holds the plan its defaults and options
    resolve to, so a folder whose runs were made under other defaults is refused instead of mixed."""
    import argparse

    from deltatune.errors import UserError
    from deltatune.experiments import masking
    from deltatune.experiments.common import Context

    args = argparse.Namespace(quick=False, sizes=None, steps=None, batch_size=None, heldout=None, generate=None)
    plan = masking.defining_settings(args)["plan"]
    assert plan["sizes"] == [50, 200, 800] and plan["steps"] == {"gsm8k": 24, "mmlu": 32}
    args.steps, args.sizes = 5, "10,20"
    assert masking.resolved_plan(False, args)["steps"] == {"gsm8k": 5, "mmlu": 5}
    assert masking.resolved_plan(False, args)["sizes"] == [10, 20] and masking.FULL["sizes"] == [50, 200, 800]
    args.steps, args.sizes = None, None

    def claim():
        return Context(
            "masking",
            tmp_path / "exp",
            quick=False,
            seeds=[0],
            model="m",
            quiet=True,
            settings=masking.defining_settings(args),
        )

    claim()
    (tmp_path / "exp" / "runs").mkdir()  # a run has started
    monkeypatch.setitem(masking.FULL, "heldout", 24)  # a later version's default
    with pytest.raises(UserError, match="holds experiment 'masking'"):
        claim()


def test_a_weight_with_nan_is_one_line_naming_the_matrix_not_an_svd_traceback():
    from deltatune.analysis.decompose import matrix_pairs
    from deltatune.errors import UserError

    adapted = apply_methods(tiny_model(), [MethodSpec(name="lora", rank=2, targets="q_proj")])
    with torch.no_grad():
        adapted.model.model.layers[1].self_attn.q_proj.lora_B.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match=r"'model.layers.1.self_attn.q_proj' holds NaN or inf"):
        matrix_pairs(adapted.model)
