"""Review 9 of training runs. Each test failed before its fix."""

from __future__ import annotations

import json

import pytest
from reliability_helpers import cli, train_args


def test_a_finished_run_records_its_final_losses_in_summary_json(capsys, tiny_dir, data_file, tmp_path):
    # the final held-out loss was only printed: a script reading the run folder found it nowhere
    run = tmp_path / "run"
    rc, _, err = cli(capsys, *train_args(tiny_dir, data_file, run, "--eval-every", "1", steps=2))
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in steps if "eval_loss" in r]
    assert [r["step"] for r in steps if "eval_loss" in r] == [1, 2]
    # the final evaluation sees the weights of step 2, evaluated there already: the same loss
    assert summary["eval_loss"] == evals[-1]
    assert summary["best_eval_loss"] == min(evals)
    assert summary["steps"] == 2 and summary["eval_examples"] == 3
    assert summary["train_loss"] == pytest.approx(steps[-1]["loss"], abs=1e-6)  # the log keeps 6 decimals
    assert summary["real_tokens"] > 0 and summary["tokens_per_s"] > 0


def test_a_resumed_run_drops_the_summary_of_its_earlier_finish(capsys, tiny_dir, data_file, tmp_path, monkeypatch):
    # a resumed run stopped before its end must not leave a summary.json describing the weights of the earlier end
    from deltatune.train import run_folder

    run = tmp_path / "run"
    assert cli(capsys, *train_args(tiny_dir, data_file, run, "--save-every", "1", steps=2))[0] == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    seen = []
    real = run_folder.write_summary
    monkeypatch.setattr(
        run_folder, "write_summary", lambda out, *a: seen.append((out / "summary.json").exists()) or real(out, *a)
    )
    rc, _, err = cli(capsys, *train_args(tiny_dir, data_file, run, "--save-every", "1", "--resume", steps=3))
    assert rc == 0, err
    assert seen == [False]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_loss"] is not None and summary["best_eval_loss"] is None


def test_resume_refuses_other_weights_at_the_model_path(capsys, tiny_dir, data_file, tmp_path):
    # resume compared the model's path only: a folder re-exported with other weights trained on silently
    import shutil

    from deltatune.testing import tiny_model

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    run = tmp_path / "run"
    assert cli(capsys, *train_args(model, data_file, run, "--save-every", "1", steps=2))[0] == 0
    tiny_model(seed=123).save_pretrained(model)  # the same architecture, other weights
    rc, _, err = cli(capsys, *train_args(model, data_file, run, "--save-every", "1", "--resume", steps=3))
    assert rc == 2 and "Traceback" not in err
    assert "model content: model.safetensors changed" in err and len(err.strip().splitlines()) == 1
    shutil.rmtree(model)
    shutil.copytree(tiny_dir, model)  # the weights it trained on: resumes
    rc, _, err = cli(capsys, *train_args(model, data_file, run, "--save-every", "1", "--resume", steps=3))
    assert rc == 0, err


def test_the_model_fingerprint_sees_what_loads_and_nothing_else(tiny_dir, tmp_path):
    # review of the fingerprint: a re-saved config.json (another transformers_version) or a file beside the weights
    # refused a resume of the same model, and a change to mid-file tensors (a merge into q_proj alone) passed
    import shutil

    from safetensors.torch import load_file, save_file

    from deltatune.train.run_folder import model_fingerprint

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    before = model_fingerprint(model)
    assert set(before) == {"model.safetensors", "config.json"}
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9"}, indent=4))
    (model / "other.gguf").write_bytes(b"GGUF" + bytes(100))  # never loaded
    (model / "README.md").write_text("notes")
    assert model_fingerprint(model) == before
    (model / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))
    assert model_fingerprint(model)["config.json"] != before["config.json"]
    (model / "config.json").write_text(json.dumps(config))
    weights = load_file(str(model / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"  # one tensor in the middle of the file
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert model_fingerprint(model)["model.safetensors"] != before["model.safetensors"]
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(bytes(range(256)) * 4096)
    first = model_fingerprint(gguf)
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2 + 7] ^= 1  # a GGUF file: blocks across it, not only its ends
    gguf.write_bytes(bytes(data))
    assert model_fingerprint(gguf) != first
    assert model_fingerprint(tmp_path / "missing") is None


def test_resume_refuses_another_chat_template_at_the_model_path(capsys, tiny_dir, data_file, tmp_path):
    # review of the fingerprint: only weights and config were compared, so a rewritten chat template (the same
    # records read as other tokens) resumed silently; a re-save of the same tokenizer must still resume
    import shutil

    from deltatune.testing import tiny_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    run = tmp_path / "run"
    args = ["--save-every", "1", "--template", "tokenizer"]
    assert cli(capsys, *train_args(model, data_file, run, *args, steps=2))[0] == 0
    tiny_tokenizer().save_pretrained(model)  # the same tokenizer written again
    rc, _, err = cli(capsys, *train_args(model, data_file, run, *args, "--resume", steps=3))
    assert rc == 0, err
    tok = tiny_tokenizer()
    changed = tok.chat_template.replace("'<|im_end|>' + '\n'", "'<|im_end|>' + '\n\n'")  # a blank line a turn
    assert changed != tok.chat_template
    tok.chat_template = changed
    tok.save_pretrained(model)
    rc, _, err = cli(capsys, *train_args(model, data_file, run, *args, "--resume", steps=4))
    assert rc == 2 and "was trained on other tokens from this data" in err and "Traceback" not in err


def test_an_upcycled_folder_in_deltatunes_format_has_its_weights_fingerprinted(tiny_dir, tmp_path):
    from deltatune.testing import tiny_model
    from deltatune.train.run_folder import model_fingerprint
    from deltatune.upcycle.convert import UpcycleSpec, upcycle
    from deltatune.upcycle.io import WEIGHTS_FILE, save_upcycled

    spec = UpcycleSpec(experts=4, layers=[1], router="expert-choice")  # written in deltatune's own format
    save_upcycled(upcycle(tiny_model(num_hidden_layers=2), spec), None, tmp_path / "moe")
    assert (tmp_path / "moe" / WEIGHTS_FILE).is_file()
    before = model_fingerprint(tmp_path / "moe")
    assert WEIGHTS_FILE in before and "upcycle.json" in before
    save_upcycled(upcycle(tiny_model(seed=5, num_hidden_layers=2), spec), None, tmp_path / "moe")
    assert model_fingerprint(tmp_path / "moe")[WEIGHTS_FILE] != before[WEIGHTS_FILE]
