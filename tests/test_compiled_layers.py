"""`compile_layers: true`: decoder layers under torch.compile train like the eager layers, compile once for
all batch lengths, come back eager afterwards, and refuse the combinations they do not support."""

from __future__ import annotations

import pytest
import torch

from deltatune.errors import ConfigError


def _cfg(tiny_dir, data_file, out, **kw):
    from deltatune.testing import tiny_train_config

    settings = dict(batch_size=2, steps=6, eval_fraction=0.0, warmup_steps=1, num_threads=1)
    return tiny_train_config(tiny_dir, data_file, out, **{**settings, **kw})


@pytest.fixture
def varied_data(tmp_path):
    """Answers of 5 to 59 words: with 256-token rows, one a step, the flat rows differ in length (192-256)."""
    import json

    words = "one two three four five six seven eight nine ten".split()
    rows = [
        {"instruction": f"Count to {n}.", "output": " ".join(words[i % 10] for i in range(n))} for n in range(5, 60, 3)
    ]
    path = tmp_path / "varied.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_compiled_layers_train_like_eager_compile_once_and_restore(tiny_dir, varied_data, tmp_path):
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    from deltatune.train.loop import train

    seen, graphs = {}, []

    def inspect(step, total, model):  # inside training: the layers are compiled; graphs compiled so far
        seen.setdefault("compiled", all(layer._compiled_call_impl is not None for layer in model.model.layers))
        graphs.append(counters["stats"]["unique_graphs"])
        return {}

    torch._dynamo.reset()
    sizes = dict(seq_len=256, batch_size=1)
    eager = train(_cfg(tiny_dir, varied_data, tmp_path / "eager", fused_norms="off", **sizes), quiet=True)
    counters.clear()
    compiled = train(
        _cfg(tiny_dir, varied_data, tmp_path / "compiled", compile_layers=True, **sizes), quiet=True, on_step=inspect
    )
    assert seen["compiled"]
    # the same losses to float rounding (inductor may order a reduction differently), step by step
    for a, b in zip(eager.history, compiled.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    want = load_file(str(tmp_path / "eager" / "final" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "compiled" / "final" / "adapter_model.safetensors"))
    assert all(torch.allclose(want[k], got[k], rtol=1e-3, atol=1e-5) for k in want)
    # one set of graphs for every row length (dynamic shapes, spans hidden from the guards), not one per batch:
    # after the first steps (layer 0 and the others, each split at the attention; the backward) nothing new
    assert len({len(ids) for ids in _step_rows(tiny_dir, varied_data, tmp_path, **sizes)}) > 1  # the lengths do vary
    assert graphs[1] >= 1 and graphs[1] == graphs[-1], graphs


def _step_rows(tiny_dir, data_file, tmp_path, **sizes) -> list[list[int]]:
    """The flat rows the 6 training steps see (the loop's own data order)."""
    from deltatune.data.masking import parse_policy
    from deltatune.data.packing import collate
    from deltatune.data.pipeline import prepare_dataset
    from deltatune.models import load_tokenizer
    from deltatune.train.checkpoint import Position
    from deltatune.train.loop import MicroBatches

    cfg = _cfg(tiny_dir, data_file, tmp_path / "unused", **sizes)
    tok = load_tokenizer(str(tiny_dir))
    examples = list(prepare_dataset(cfg.data, tok, template=cfg.template, max_len=cfg.seq_len).examples)
    data, pos, policy = MicroBatches(examples, cfg), Position(), parse_policy(cfg.policy)
    rows = []
    for _ in range(cfg.steps):
        batch = collate(data.take(pos, 1)[0], policy, seq_len=cfg.row_len, pad_id=0, packed=True, flat=True)
        rows.append(batch["input_ids"][0].tolist())
    return rows


@pytest.mark.parametrize(
    "clash, message",
    [
        (dict(gradient_checkpointing=True), "gradient_checkpointing"),
        (dict(fused_norms="on"), "fused_norms: on"),
        (dict(fused_update="lomo"), "fused_update"),
    ],
)
def test_compile_layers_refuses_what_it_does_not_support(tiny_dir, data_file, tmp_path, clash, message):
    from deltatune.train.loop import train

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message) as err:
        train(_cfg(tiny_dir, data_file, out, compile_layers=True, **clash), quiet=True)
    assert err.value.field == "compile_layers"
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize(
    "method",
    [
        "full",
        "prefix",
        # compiling their own forwards takes 35-70 s each on 2 cores: `make test-slow` runs them
        pytest.param("dora", marks=pytest.mark.slow),
        pytest.param("mora", marks=pytest.mark.slow),
        pytest.param("qlora", marks=pytest.mark.slow),
    ],
)
def test_other_methods_train_under_compiled_layers_like_eager(tiny_dir, data_file, tmp_path, method):
    """Methods with their own forward (DoRA's magnitude, MoRA's compress/decompress, the NF4 base), full
    finetuning and a method on the mask path (prefix tuning's virtual tokens) compile and match eager."""
    from deltatune.train.loop import train

    torch._dynamo.reset()
    kw = dict(method=method, steps=3)
    eager = train(_cfg(tiny_dir, data_file, tmp_path / "eager", fused_norms="off", **kw), quiet=True)
    compiled = train(_cfg(tiny_dir, data_file, tmp_path / "compiled", compile_layers=True, **kw), quiet=True)
    assert [h["loss"] for h in compiled.history] == pytest.approx([h["loss"] for h in eager.history], rel=1e-4)


# ----------------------------------------------------------------------------- compile_layers: auto (the default)
def _declines(**kw):
    """compiled_layers.auto_declines for a 1M-token single-process CPU LoRA run, with `kw` changed."""
    from types import SimpleNamespace

    from deltatune.train import compiled_layers

    cfg = dict(fused_update=False, gradient_checkpointing=False, fused_norms="auto")
    args = dict(device=torch.device("cpu"), distributed=False, methods=["lora"], planned_tokens=10**6, moe=False)
    for key, value in kw.items():
        (cfg if key in cfg else args)[key] = value
    return compiled_layers.auto_declines(SimpleNamespace(**cfg), **args)


def test_auto_compiles_long_single_process_cpu_runs_of_tested_methods_only(monkeypatch):
    from deltatune.train import compiled_layers

    monkeypatch.setattr(compiled_layers, "compiler_problem", lambda: None)
    assert compiled_layers.AUTO_MIN_TOKENS == 500_000
    assert _declines() is None  # 1M tokens of LoRA on one CPU process: compiled
    assert _declines(methods=["full"]) is None and _declines(methods=["dora", "prefix"]) is None
    assert "tokens planned" in _declines(planned_tokens=499_999)  # the demo, the tests: eager
    assert "CPU only" in _declines(device=torch.device("meta"))
    assert "several processes" in _declines(distributed=True)
    assert "MoE" in _declines(moe=True)
    assert "bitfit not tested" in _declines(methods=["lora", "bitfit"])
    for clash in (dict(gradient_checkpointing=True), dict(fused_update="lomo"), dict(fused_norms="on")):
        assert _declines(**clash) is not None  # what `true` refuses, auto leaves eager
    monkeypatch.setattr(compiled_layers, "compiler_problem", lambda: "torch.compile failed (no C++ compiler)")
    assert _declines() == "torch.compile failed (no C++ compiler)"


def test_auto_resumes_as_the_checkpoint_ran(tmp_path):
    from deltatune.train.run_folder import compiled_layers_at

    assert compiled_layers_at(tmp_path, {"compiled_layers": True}) is True
    assert compiled_layers_at(tmp_path, {"compiled_layers": False, "config": {"compile_layers": True}}) is False
    # checkpoints written before auto existed ran as their config said
    assert compiled_layers_at(tmp_path, {"config": {"compile_layers": True}}) is True
    assert compiled_layers_at(tmp_path, {"config": {"compile_layers": False}}) is False
    assert compiled_layers_at(tmp_path, {"config": {}}) is False


def test_a_short_run_stays_eager_records_it_and_its_resume_stays_eager(tiny_dir, data_file, tmp_path, monkeypatch):
    """The default on a short run is the eager step; resumed with auto after the threshold fell to nothing (as
    if the run had been lengthened past it), the run goes on eager, as its checkpoint ran."""
    from deltatune.train import compiled_layers
    from deltatune.train.checkpoint import list_checkpoints, read_meta
    from deltatune.train.loop import train

    seen = []

    def inspect(step, total, model):
        seen.append(any(layer._compiled_call_impl is not None for layer in model.model.layers))
        return {}

    out = tmp_path / "run"
    first = _cfg(tiny_dir, data_file, out, steps=2, save_every=1)
    assert first.compile_layers == "auto"
    train(first, quiet=True, on_step=inspect)
    assert seen == [False, False]
    assert read_meta(list_checkpoints(out)[-1])["compiled_layers"] is False
    monkeypatch.setattr(compiled_layers, "AUTO_MIN_TOKENS", 0)
    monkeypatch.setattr(compiled_layers, "compiler_problem", lambda: None)
    train(_cfg(tiny_dir, data_file, out, steps=4, save_every=1, resume=True), quiet=True, on_step=inspect)
    assert seen == [False] * 4
    assert read_meta(list_checkpoints(out)[-1])["compiled_layers"] is False


def test_auto_compiles_a_long_run(tiny_dir, data_file, tmp_path, monkeypatch, capsys):
    """Past the threshold (lowered here to the tiny run's size) auto compiles, says so, and records it."""
    from deltatune.train import compiled_layers
    from deltatune.train.checkpoint import list_checkpoints, read_meta
    from deltatune.train.loop import train

    seen = []

    def inspect(step, total, model):
        seen.append(all(layer._compiled_call_impl is not None for layer in model.model.layers))
        return {}

    torch._dynamo.reset()
    monkeypatch.setattr(compiled_layers, "AUTO_MIN_TOKENS", 100)
    out = tmp_path / "run"
    train(_cfg(tiny_dir, data_file, out, steps=2, save_every=2), on_step=inspect)
    assert seen == [True, True]
    assert "compiled decoder layers: on" in capsys.readouterr().out
    assert read_meta(list_checkpoints(out)[-1])["compiled_layers"] is True


def test_compile_layers_accepts_auto_true_and_false_and_resume_accepts_auto_over_a_recorded_value():
    from deltatune.config import load_config, parse_overrides

    assert load_config(overrides={}).compile_layers == "auto"
    assert load_config(overrides=parse_overrides(["compile_layers=true"])).compile_layers is True
    assert load_config(overrides=parse_overrides(["compile_layers=false"])).compile_layers is False
    assert load_config(overrides=parse_overrides(["compile_layers=auto"])).compile_layers == "auto"
    with pytest.raises(ConfigError, match="compile_layers"):
        load_config(overrides=parse_overrides(["compile_layers=sometimes"]))


@pytest.mark.parametrize("setting", [True, "auto"])
def test_a_compilation_that_fails_inside_training_is_one_line_naming_the_way_out(
    tiny_dir, data_file, tmp_path, monkeypatch, setting
):
    from deltatune.errors import TrainingError
    from deltatune.train import compiled_layers
    from deltatune.train.loop import train

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    def install(model):  # as compiled_layers.install, with a backend that fails as a missing compiler would
        targets = compiled_layers.compile_targets(model)
        for module in targets:
            module.compile(backend=broken_backend)
        return lambda: [setattr(module, "_compiled_call_impl", None) for module in targets]

    torch._dynamo.reset()
    monkeypatch.setattr(compiled_layers, "install", install)
    monkeypatch.setattr(compiled_layers, "AUTO_MIN_TOKENS", 0)
    monkeypatch.setattr(compiled_layers, "compiler_problem", lambda: None)  # the probe passed, the layers fail
    with pytest.raises(TrainingError, match="compiling the decoder layers failed") as err:
        train(_cfg(tiny_dir, data_file, tmp_path / "out", compile_layers=setting, steps=2), quiet=True)
    assert "no C++ compiler found" in str(err.value) and str(err.value).endswith("set compile_layers: false")
    assert "\n" not in str(err.value)
    torch._dynamo.reset()
