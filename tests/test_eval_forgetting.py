"""Learn vs forget: the aggregation by hand, and `deltatune forgetting` end to end on tiny runs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from deltatune.evaluate.forgetting import learn_forget


def test_learn_forget_is_a_plain_mean_of_task_differences():
    base = {"gsm8k": 0.10, "mmlu": 0.40, "bbh": 0.30, "arc": 0.50}
    run = {"gsm8k": 0.35, "mmlu": 0.34, "bbh": 0.31, "arc": 0.41}
    lf = learn_forget("lora r=8", base, run, targets=["gsm8k"], sources=["mmlu", "bbh", "arc"])
    assert lf.learning == pytest.approx(0.25)
    # drops 0.06, -0.01 (a gain counts negative), 0.09 -> mean 0.04666...
    assert lf.forgetting == pytest.approx((0.06 - 0.01 + 0.09) / 3)
    assert lf.as_row() == {"label": "lora r=8", "learning": lf.learning, "forgetting": lf.forgetting, **run}
    with pytest.raises(KeyError):
        learn_forget("x", base, run, ["missing"], ["mmlu"])


def _make_run(root, base_model, name, rank, std, method="lora"):
    from deltatune.methods import MethodSpec
    from deltatune.methods.apply import apply_methods

    import copy

    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"method": method, "rank": rank, "alpha": 2.0 * rank}))
    adapted = apply_methods(copy.deepcopy(base_model), MethodSpec(method, targets="all-linear", rank=rank,
                                                                   alpha=2.0 * rank))
    torch.manual_seed(rank)
    for m in adapted.model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=std)
    adapted.save_adapter(run / "final")
    return run


def test_forgetting_cli_end_to_end(tmp_path, tiny_lm, tiny_tok):
    from deltatune.cli import main
    from deltatune.evaluate.runner import EvalOptions, evaluate_task
    from deltatune.evaluate.tasks import resolve_task
    from deltatune.methods.apply import load_adapter

    import copy

    base_dir = tmp_path / "base"
    tiny_lm.save_pretrained(base_dir)
    tiny_tok.save_pretrained(base_dir)
    r1 = _make_run(tmp_path, tiny_lm, "run_a", 2, 0.0)    # B = 0: exactly the base model
    r2 = _make_run(tmp_path, tiny_lm, "run_b", 4, 0.5)
    tgt, src = tmp_path / "target.jsonl", tmp_path / "source.jsonl"
    tgt.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n"
                           for q, a in [("What is 2 + 3?", "5"), ("Say fox", "the fox")]))
    src.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n"
                           for q, a in [("Say dog", "lazy dog"), ("Natalia sold", "48 clips")]))
    out = tmp_path / "lf"
    rc = main(["forgetting", "--base", str(base_dir), "--run", str(r1), "--run", str(r2), "--target",
               f"file:{tgt}", "--source", f"file:{src}", "--max-new-tokens", "5", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    res = json.loads((out / "forgetting.json").read_text())
    assert set(res["runs"]) == {"lora r=2", "lora r=4"}
    a = res["runs"]["lora r=2"]
    assert a["learning"] == 0.0 and a["forgetting"] == 0.0 and a["rank"] == 2  # a zero update changes nothing
    # run_b's numbers equal a direct evaluation of base + adapter
    model = load_adapter(copy.deepcopy(tiny_lm), r2 / "final").model
    opts = EvalOptions(max_new_tokens=5, progress=False)
    direct = {f"file:{p}": evaluate_task(model, tiny_tok, resolve_task(f"file:{p}"), opts).score for p in (tgt, src)}
    base = res["base_scores"]
    b = res["runs"]["lora r=4"]
    assert b["learning"] == pytest.approx(direct[f"file:{tgt}"] - base[f"file:{tgt}"])
    assert b["forgetting"] == pytest.approx(base[f"file:{src}"] - direct[f"file:{src}"])
    assert (out / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "forgetting.md").read_text()
    assert "| lora r=2 |" in md and "| lora r=4 |" in md and "| base |" in md


def test_forgetting_cli_run_without_final_exits_2(tmp_path, capsys):
    from deltatune.cli import main

    run = tmp_path / "run"
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    (run / "config.yaml").write_text("method: lora\nrank: 8\n")
    src = tmp_path / "s.jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\n')
    rc = main(["forgetting", "--run", str(run), "--target", f"file:{src}", "--source", f"file:{src}",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "no final/" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_learn_forget_for_a_loss_metric():
    # held-out loss falls 2.0 -> 1.5 on the target (a gain of 0.5), rises 1.0 -> 1.2 on the source (forgot 0.2)
    lf = learn_forget("r", {"t": 2.0, "s": 1.0}, {"t": 1.5, "s": 1.2}, ["t"], ["s"], lower_is_better={"t", "s"})
    assert lf.learning == pytest.approx(0.5) and lf.forgetting == pytest.approx(0.2)
