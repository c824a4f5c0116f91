"""Review 6 of the command line: an adapter on a loaded upcycled model names the upcycled folder, a config file
kept in the output folder is never replaced, `upcycle --out` is checked as merge's is, and one-line errors for a
base that is not a string and a NaN temperature."""

import json
import shutil

import pytest
import torch

import deltatune
from deltatune.cli import main
from deltatune.models import save_model
from deltatune.testing import tiny_model, tiny_tokenizer

IDS = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64]])


def _err(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_adapter_on_a_loaded_upcycled_model_merges_into_that_model(tmp_path, capsys):
    """The upcycled skeleton kept the dense source's name: the adapter recorded the dense folder as its base, and
    `merge` without --model wrote a dense model with other logits (0.008 off), silently."""
    save_model(tiny_model(), tiny_tokenizer(), tmp_path / "dense")
    assert main(["upcycle", "--model", str(tmp_path / "dense"), "--experts", "4", "--out", str(tmp_path / "moe")]) == 0
    model, _ = deltatune.load_model(str(tmp_path / "moe"))
    adapted = deltatune.apply(model, "lora", rank=4, targets="q_proj,v_proj")
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        expected = adapted.model.eval()(input_ids=IDS).logits
    adapted.save_adapter(tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tmp_path / "moe")
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "upcycle.json").exists()
    merged, _ = deltatune.load_model(str(tmp_path / "merged"))
    with torch.no_grad():
        assert (merged(input_ids=IDS).logits - expected).abs().max() < 1e-5


def test_a_config_file_in_the_output_folder_is_never_replaced(tiny_dir, data_file, tmp_path, capsys):
    """It read as an earlier run's record: the error said to pass --overwrite, which then deleted it."""
    out = tmp_path / "exp"
    out.mkdir()
    config = out / "config.yaml"
    text = f"# my notes\nmodel: {tiny_dir}\nmethod: lora\ndata: {data_file}\noutput: {out}\nsteps: 1\nseq_len: 64\n"
    config.write_text(text)
    for extra in ([], ["--overwrite"]):
        assert main(["train", str(config), "--quiet", *extra]) == 2
        assert "the configuration file being read" in _err(capsys)
        assert config.read_text() == text and sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_resuming_from_the_config_a_run_recorded_still_works(tiny_dir, data_file, tmp_path):
    out = tmp_path / "run"
    args = ["--model", str(tiny_dir), "--data", str(data_file), "--output", str(out), "--quiet"]
    assert main(["train", *args, "--set", "steps=2", "--set", "save_every=1", "--set", "seq_len=64"]) == 0
    assert main(["train", str(out / "config.yaml"), "--resume", "--quiet", "--set", "steps=3"]) == 0
    assert (out / "final").exists()


@pytest.mark.parametrize("where", ["under-a-file", "inside-the-model", "current-folder"])
def test_upcycle_out_is_checked_before_the_model_loads(tiny_dir, tmp_path, monkeypatch, capsys, where):
    """A parent that is a file ended in a FileExistsError traceback after the upcycling; an --out inside the model
    folder was written there; the current folder was refused only after the work."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    before = sorted(p.name for p in model.iterdir())
    (tmp_path / "afile").write_text("x")
    empty = tmp_path / "here"
    empty.mkdir()
    monkeypatch.chdir(empty)
    out = {"under-a-file": tmp_path / "afile" / "moe", "inside-the-model": model / "moe", "current-folder": "."}[where]
    loads = []
    monkeypatch.setattr("deltatune.models.load_model", lambda *a, **k: loads.append(1))
    assert main(["upcycle", "--model", str(model), "--experts", "4", "--out", str(out)]) == 2
    assert "field 'out'" in _err(capsys) and loads == []
    assert sorted(p.name for p in model.iterdir()) == before and not any(empty.iterdir())


@pytest.mark.parametrize("base", [5, ["a", "b"]])
def test_an_adapter_whose_base_is_not_a_string_is_one_line(tmp_path, capsys, base):
    from deltatune.methods.base import MethodSpec
    from deltatune.serve.testing import random_adapter

    folder = random_adapter(tmp_path / "a", MethodSpec(name="lora", rank=2, alpha=4), tiny_model(), seed=1)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
    for command in (["merge", "--out", str(tmp_path / "m")], ["generate", "--prompt", "hi"]):
        assert main([command[0], "--adapter", str(folder), *command[1:]]) == 2
        assert "field 'base_model_name_or_path'" in _err(capsys)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_generate_refuses_a_temperature_that_is_not_a_finite_number_at_least_0(tiny_dir, capsys, value):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--temperature", value]) == 2
    assert "field 'temperature'" in _err(capsys)
