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
    import copy

    from deltatune.methods import MethodSpec
    from deltatune.methods.apply import apply_methods

    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"method": method, "rank": rank, "alpha": 2.0 * rank}))
    adapted = apply_methods(
        copy.deepcopy(base_model), MethodSpec(method, targets="all-linear", rank=rank, alpha=2.0 * rank)
    )
    torch.manual_seed(rank)
    for m in adapted.model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=std)
    adapted.save_adapter(run / "final")
    return run


def _write_task(path, pairs):
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in pairs))


def test_forgetting_cli_end_to_end(tmp_path, tiny_tok):
    import copy

    from deltatune.cli import main
    from deltatune.evaluate.runner import EvalOptions, evaluate_task
    from deltatune.evaluate.tasks import resolve_task
    from deltatune.methods.apply import load_adapter
    from deltatune.testing import tiny_model

    # larger random weights than tiny_lm's: greedy text with words in it (tiny_lm only writes newlines, so every
    # score would be 0 and "run - base" would hold for any run, the adapter applied or not)
    base_lm = tiny_model(0, initializer_range=0.2)
    base_dir = tmp_path / "base"
    base_lm.save_pretrained(base_dir)
    tiny_tok.save_pretrained(base_dir)
    r1 = _make_run(tmp_path, base_lm, "run_a", 2, 0.0)  # B = 0: exactly the base model
    r2 = _make_run(tmp_path, base_lm, "run_b", 4, 0.5)
    opts = EvalOptions(max_new_tokens=5, progress=False)
    questions = ["What is 2 + 3?", "Say fox", "Say dog", "Natalia sold"]
    probe = tmp_path / "probe.jsonl"
    _write_task(probe, [(q, "x") for q in questions])

    def outputs(model):
        res = evaluate_task(model, tiny_tok, resolve_task(f"file:{probe}"), opts)
        return [r["output"] for r in res.predictions]

    model = load_adapter(copy.deepcopy(base_lm), r2 / "final").model
    base_says, run_says = outputs(base_lm), outputs(model)
    # the target's answers are what run_b says (it learned them), the source's what the base says (run_b forgot)
    tgt, src = tmp_path / "target.jsonl", tmp_path / "source.jsonl"
    _write_task(tgt, zip(questions[:2], run_says[:2]))
    _write_task(src, zip(questions[2:], base_says[2:]))
    out = tmp_path / "lf"
    rc = main(
        [
            "forgetting",
            "--base",
            str(base_dir),
            "--run",
            str(r1),
            "--run",
            str(r2),
            "--target",
            f"file:{tgt}",
            "--source",
            f"file:{src}",
            "--max-new-tokens",
            "5",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.loads((out / "forgetting.json").read_text())
    assert set(res["runs"]) == {"lora r=2", "lora r=4"}
    assert (res["dtype"], res["batch_size"]) == ("fp32", 8)  # what the scores depend on, recorded
    a = res["runs"]["lora r=2"]
    assert a["learning"] == 0.0 and a["forgetting"] == 0.0 and a["rank"] == 2  # a zero update changes nothing
    # run_b's numbers equal a direct evaluation of base + adapter, and they are not the base's
    direct = {f"file:{p}": evaluate_task(model, tiny_tok, resolve_task(f"file:{p}"), opts).score for p in (tgt, src)}
    base = res["base_scores"]
    b = res["runs"]["lora r=4"]
    assert b["learning"] == pytest.approx(direct[f"file:{tgt}"] - base[f"file:{tgt}"])
    assert b["forgetting"] == pytest.approx(base[f"file:{src}"] - direct[f"file:{src}"])
    assert direct[f"file:{tgt}"] == 1.0 and base[f"file:{src}"] == 1.0  # each scores what it said itself
    assert b["learning"] > 0.5 and b["forgetting"] > 0.5
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
    rc = main(
        [
            "forgetting",
            "--run",
            str(run),
            "--target",
            f"file:{src}",
            "--source",
            f"file:{src}",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "no final/" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_loss_tasks_are_reported_apart_never_averaged():
    # accuracy drops 0.40 -> 0.30 on one source; held-out loss rises 1.0 -> 1.7 nats on another
    base = {"t": 0.10, "acc_src": 0.40, "loss_src": 1.0}
    run = {"t": 0.30, "acc_src": 0.30, "loss_src": 1.7}
    lf = learn_forget("r", base, run, ["t"], ["acc_src", "loss_src"], loss_tasks={"loss_src"})
    assert lf.learning == pytest.approx(0.20)
    assert lf.forgetting == pytest.approx(0.10)  # the accuracy drop alone, not (0.10 + 0.7) / 2
    assert lf.losses == {"loss_src": {"base": 1.0, "run": 1.7, "change": pytest.approx(0.7)}}
    assert "loss_src" not in lf.as_row()
    only_loss = learn_forget("r", base, run, ["t"], ["loss_src"], loss_tasks={"loss_src"})
    assert only_loss.forgetting != only_loss.forgetting  # nan: nothing fraction-valued to average
    from deltatune.cli.forgetting import forgetting_markdown

    text = forgetting_markdown(base, [only_loss.as_row()], ["t"], ["loss_src"], loss_tasks={"loss_src"})
    assert "nan" not in text and "| r | 0.2000 | - |" in text  # shown as nothing to average, not as nan


def test_a_loss_passed_as_a_fraction_is_refused():
    with pytest.raises(ValueError, match="outside"):
        learn_forget("r", {"t": 0.1, "s": 2.3}, {"t": 0.2, "s": 2.5}, ["t"], ["s"])


def test_forgetting_cli_takes_adapter_and_model_folders_and_a_loss_source(tmp_path, tiny_lm, tiny_tok):
    from deltatune.cli import main

    base_dir = tmp_path / "base"
    tiny_lm.save_pretrained(base_dir)
    tiny_tok.save_pretrained(base_dir)
    run = _make_run(tmp_path, tiny_lm, "run_b", 4, 0.5)
    tgt = tmp_path / "target.jsonl"
    tgt.write_text(json.dumps({"instruction": "Say fox", "output": "the fox"}) + "\n")
    out = tmp_path / "lf"
    rc = main(
        [
            "forgetting",
            "--base",
            str(base_dir),
            "--run",
            str(run / "final"),
            "--run",
            str(base_dir),
            "--target",
            f"file:{tgt}",
            "--source",
            f"file:{tgt},loss:{tgt}",
            "--max-new-tokens",
            "3",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.loads((out / "forgetting.json").read_text())
    assert set(res["runs"]) == {"lora r=4", "full"} and res["loss_tasks"] == [f"loss:{tgt}"]
    same = res["runs"]["full"]  # the base model folder passed as a run: nothing learned, forgot or changed
    assert same["learning"] == 0.0 and same["forgetting"] == 0.0
    assert same["losses"][f"loss:{tgt}"]["change"] == 0.0
    lora = res["runs"]["lora r=4"]
    # forgetting is the ROUGE-L drop on the file source alone; the loss change sits in its own table
    assert lora["forgetting"] == pytest.approx(res["base_scores"][f"file:{tgt}"] - lora[f"file:{tgt}"])
    change = lora["losses"][f"loss:{tgt}"]["change"]
    assert change == pytest.approx(lora["losses"][f"loss:{tgt}"]["run"] - res["base_scores"][f"loss:{tgt}"])
    md = (out / "forgetting.md").read_text()
    assert "## Held-out loss (nats per token" in md and "(rouge_l)" in md


def _permuted_copy(model, tokenizer, folder):
    """The same model under other token ids: the ordinary tokens' ids reversed in the tokenizer and the
    embedding rows (the head is tied) moved with them, so that on text it computes exactly as `model`."""
    import copy

    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    special = set(tokenizer.all_special_ids)
    ordinary = sorted(i for i in state["model"]["vocab"].values() if i not in special)
    new_id = dict(zip(ordinary, reversed(ordinary)))
    state["model"]["vocab"] = {t: new_id.get(i, i) for t, i in state["model"]["vocab"].items()}
    (folder / "tokenizer.json").parent.mkdir(parents=True)
    (folder / "tokenizer.json").write_text(json.dumps(state))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **tokenizer.special_tokens_map)
    tok.chat_template = tokenizer.chat_template
    moved = copy.deepcopy(model)
    assert moved.config.tie_word_embeddings
    with torch.no_grad():
        old = model.get_input_embeddings().weight
        for i, j in new_id.items():
            moved.get_input_embeddings().weight[j] = old[i]
    moved.save_pretrained(folder)
    tok.save_pretrained(folder)
    assert tok("the fox said")["input_ids"] != tokenizer("the fox said")["input_ids"]


def test_forgetting_scores_a_full_model_with_its_own_tokenizer(tmp_path, tiny_lm, tiny_tok):
    """A full model folder was scored with the base's tokenizer: a model whose tokenizer maps text to other ids
    (finetuned elsewhere with tokens added, or re-ordered) was fed ids it does not know. The same model under
    other ids now scores as the base exactly."""
    from deltatune.cli import main

    base_dir = tmp_path / "base"
    tiny_lm.save_pretrained(base_dir)
    tiny_tok.save_pretrained(base_dir)
    _permuted_copy(tiny_lm, tiny_tok, tmp_path / "moved")
    task = tmp_path / "task.jsonl"
    _write_task(task, [("Say fox", "the fox jumps"), ("Count to three", "one two three")])
    out = tmp_path / "lf"
    args = ["forgetting", "--base", str(base_dir), "--run", str(tmp_path / "moved"), "--target", f"file:{task}"]
    rc = main([*args, "--source", f"loss:{task}", "--max-new-tokens", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "forgetting.json").read_text())
    run = res["runs"]["full"]
    assert run[f"file:{task}"] == res["base_scores"][f"file:{task}"]
    assert run["losses"][f"loss:{task}"]["run"] == pytest.approx(res["base_scores"][f"loss:{task}"], abs=1e-5)


def test_forgetting_compares_with_the_base_the_runs_were_trained_from(tmp_path, tiny_tok, capsys):
    """Without --base every run was compared with the default model, whatever it had been trained from (a full
    finetune of the tiny model "forgot" 0.5 and its loss rose 4.2 nats where it fell 0.8), and an adapter run that
    did not fit failed only after the base had been scored."""
    from deltatune.cli import main
    from deltatune.testing import tiny_model

    bases = {}
    for seed in (0, 1):
        bases[seed] = tmp_path / f"base{seed}"
        tiny_model(seed).save_pretrained(bases[seed])
        tiny_tok.save_pretrained(bases[seed])
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        runs[name] = _make_run(tmp_path, tiny_model(seed), name, 2, 0.3)
        config = yaml.safe_load((runs[name] / "config.yaml").read_text())
        (runs[name] / "config.yaml").write_text(yaml.safe_dump({**config, "model": str(bases[seed])}))
    _write_task(tmp_path / "t.jsonl", [("What is 2 + 3?", "5"), ("Say fox", "fox")])
    task = f"loss:{tmp_path / 't.jsonl'}"

    def forgetting(*run_names, base=None, out="lf"):
        args = ["forgetting", "--target", task, "--source", task, "--out", str(tmp_path / out), "--no-progress"]
        args += [a for n in run_names for a in ("--run", str(runs[n]))] + (["--base", str(base)] if base else [])
        return main(args)

    assert forgetting("a", "b") == 0
    inferred = json.loads((tmp_path / "lf" / "forgetting.json").read_text())
    assert inferred["base"] == str(bases[0])
    assert forgetting("a", "b", base=bases[0], out="given") == 0
    given = json.loads((tmp_path / "given" / "forgetting.json").read_text())
    assert inferred["base_scores"] == given["base_scores"] and inferred["runs"] == given["runs"]
    capsys.readouterr()
    assert forgetting("a", "c", out="mixed") == 2  # two bases, one base row: refused before anything loads
    assert "trained from" in capsys.readouterr().err and not (tmp_path / "mixed").exists()
    # a --base of other shapes than an adapter: refused before the base is scored; of the same shapes: a warning
    other = tmp_path / "wide"
    tiny_model(0, hidden_size=96, intermediate_size=128).save_pretrained(other)
    tiny_tok.save_pretrained(other)
    assert forgetting("a", base=other, out="wide") == 2
    captured = capsys.readouterr()
    assert "has shape" in captured.err and "evaluating base model" not in captured.out
    assert forgetting("c", base=bases[0], out="warned") == 0
    assert f"{runs['c']} was trained from {bases[1]}, not {bases[0]}" in capsys.readouterr().err
