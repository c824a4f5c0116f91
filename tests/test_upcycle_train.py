"""Upcycled models end to end: the command, training with aux losses and metrics, export and reload."""

import json

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.config import load_config
from deltatune.models import load_model
from deltatune.train.loop import train
from deltatune.upcycle.moe import MoEBlock


@pytest.fixture(scope="module")
def moe_dir(tiny_dir, tmp_path_factory):
    """The tiny model upcycled to 4 experts on layer 1 (every other layer), top-2, raw softmax weights."""
    out = tmp_path_factory.mktemp("up") / "moe"
    assert main(["upcycle", "--model", str(tiny_dir), "--experts", "4", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ec_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("up") / "ec"
    assert (
        main(
            [
                "upcycle",
                "--model",
                str(tiny_dir),
                "--experts",
                "4",
                "--layers",
                "all",
                "--router",
                "expert-choice",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def _cfg(model, data_file, out, **kw):
    base = dict(
        model=str(model),
        data=str(data_file),
        output=str(out),
        method="full",
        lr=1e-3,
        batch_size=4,
        seq_len=64,
        precision="fp32",
        steps=4,
        seed=3,
        eval_fraction=0.1,
        warmup_steps=0,
        log_every=2,
    )
    base.update(kw)
    return load_config(overrides=base)


def _ids():
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def test_upcycle_command_writes_qwen2_moe_with_same_logits(moe_dir, tiny_dir):
    from transformers import AutoModelForCausalLM

    meta = json.loads((moe_dir / "upcycle.json").read_text())
    assert meta["format"] == "qwen2_moe" and meta["spec"]["layers"] == [1] and meta["spec"]["experts"] == 4
    ours, _ = load_model(str(moe_dir))
    theirs = AutoModelForCausalLM.from_pretrained(str(moe_dir))
    assert type(theirs).__name__ == "Qwen2MoeForCausalLM"
    assert isinstance(ours.model.layers[1].mlp, MoEBlock)
    dense, _ = load_model(str(tiny_dir))
    assert torch.equal(ours.model.layers[1].mlp.experts[3].down_proj.weight, dense.model.layers[1].mlp.down_proj.weight)
    with torch.no_grad():
        a, b = ours(_ids()).logits, theirs(_ids()).logits
    assert (a - b).abs().max() < 1e-5


def test_upcycle_refuses_existing_output_and_bad_layers(tiny_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["upcycle", "--model", str(tiny_dir), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["upcycle", "--model", str(tiny_dir), "--layers", "5", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("deltatune upcycle: error: field 'layers': layer 5 does not exist")
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_full_finetune_logs_routing_metrics_and_reloads_in_transformers(moe_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    result = train(_cfg(moe_dir, data_file, tmp_path / "run", moe_z_loss=1e-3), quiet=True)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if "expert_load" in m]
    assert [m["step"] for m in logged] == [2, 4]
    for m in logged:
        assert len(m["expert_load"]) == 1 and abs(sum(m["expert_load"][0]) - 1) < 1e-3
        assert m["moe_aux_loss"] >= 1 - 1e-6 and m["moe_z_loss"] > 0 and m["router_entropy"] > 0
        assert m["moe_dropped"] == 0  # no capacity limit
    final = tmp_path / "run" / "final"
    ours, _ = load_model(str(final))
    theirs = AutoModelForCausalLM.from_pretrained(str(final))
    with torch.no_grad():
        assert (ours(_ids()).logits - theirs(_ids()).logits).abs().max() < 1e-5
    assert result.eval_loss is not None
    start, _ = load_model(str(moe_dir))
    assert not torch.equal(start.model.layers[1].mlp.router.weight, ours.model.layers[1].mlp.router.weight)


def test_balancing_loss_weight_changes_the_router_update(moe_dir, data_file, tmp_path):
    runs = {}
    for w in (0.0, 10.0):
        train(_cfg(moe_dir, data_file, tmp_path / f"w{w}", steps=1, moe_aux_loss=w), quiet=True)
        runs[w], _ = load_model(str(tmp_path / f"w{w}" / "final"))
    r0, r1 = (runs[w].model.layers[1].mlp.router.weight for w in (0.0, 10.0))
    assert (r0 - r1).abs().max() > 1e-6
    # the balancing loss also reaches what comes before the router (embeddings, tied to the LM head)
    assert not torch.equal(runs[0.0].lm_head.weight, runs[10.0].lm_head.weight)


@pytest.mark.parametrize(
    "targets,expect",
    [("q_proj,v_proj", "self_attn.q_proj"), (r".*mlp\.experts\.\d+\.(gate|up|down)_proj", "mlp.experts.3.down_proj")],
)
def test_lora_on_attention_or_experts_then_merge_and_generate(moe_dir, data_file, tmp_path, targets, expect):
    run = tmp_path / "lora"
    train(_cfg(moe_dir, data_file, run, method="lora", rank=4, alpha=8, lr=1e-2, targets=targets), quiet=True)
    keys = list(load_file(str(run / "final" / "adapter_model.safetensors")))
    assert any(expect in k for k in keys) and all(("experts" in k) == ("experts" in expect) for k in keys)
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run / "final"), "--out", str(merged)]) == 0
    base, tok = load_model(str(moe_dir), adapter=str(run / "final"))
    back, _ = load_model(str(merged))
    with torch.no_grad():
        assert (base(_ids()).logits - back(_ids()).logits).abs().max() < 1e-4
    assert main(["generate", "--model", str(merged), "--prompt", "What is 2 + 3?", "--max-new-tokens", "4"]) == 0


def test_expert_choice_trains_saves_own_format_and_eval_accepts_it(ec_dir, data_file, tmp_path, capsys):
    meta = json.loads((ec_dir / "upcycle.json").read_text())
    assert meta["format"] == "deltatune" and meta["spec"]["capacity"] == 2.0
    assert (ec_dir / "upcycled.safetensors").exists() and not (ec_dir / "model.safetensors").exists()
    train(_cfg(ec_dir, data_file, tmp_path / "run", steps=2), quiet=True)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert len(logged["expert_load"]) == 2 and logged["expert_load"][0] == [0.25] * 4  # T tokens each
    assert logged["moe_dropped"] >= 0 and logged["moe_aux_loss"] == pytest.approx(1.0, abs=1e-5)
    final = tmp_path / "run" / "final"
    model, _ = load_model(str(final))
    assert all(b.router_type == "expert-choice" for b in model.modules() if isinstance(b, MoEBlock))
    capsys.readouterr()
    assert main(["eval", "--model", str(final), "--task", f"loss:{data_file}", "--limit", "4", "--no-progress"]) == 0
    assert main(["generate", "--model", str(final), "--prompt", "hi", "--max-new-tokens", "2"]) == 0


def test_plan_counts_upcycled_parameters_and_active_per_token(moe_dir, tiny_dir, capsys):
    from deltatune.analysis.memory import plan_finetune
    from deltatune.methods.base import MethodSpec
    from deltatune.upcycle.convert import count_parameters

    real, _ = load_model(str(moe_dir))
    counts = count_parameters(real)
    spec = MethodSpec(name="lora", targets="all-linear", rank=4, alpha=8)
    plan = plan_finetune(str(moe_dir), [spec], dtype="fp32")
    assert plan.moe["total"] == counts["total"] and plan.moe["active_per_token"] == counts["active_per_token"]
    assert plan.params.total - plan.params.trainable == counts["total"]
    dense = plan_finetune(str(tiny_dir), [spec], dtype="fp32")
    lora_per_expert = 4 * (64 + 128) * 2 + 4 * (128 + 64)  # gate, up (64 -> 128) and down (128 -> 64)
    router_lora = 4 * (64 + 4)
    assert plan.params.trainable - dense.params.trainable == 3 * lora_per_expert + router_lora
    assert plan.activation_bytes > dense.activation_bytes
    assert main(["plan", "--model", str(moe_dir), "--dtype", "fp32"]) == 0
    assert "active per token" in capsys.readouterr().out


def test_a_resume_between_logged_steps_logs_the_routing_metrics_of_the_straight_run(moe_dir, data_file, tmp_path):
    """Routing metrics are averaged over the steps since the last log; a checkpoint at step 3 of a 4-step log
    window now carries them, so the resumed run's step-4 line equals the uninterrupted run's (it averaged
    step 4 alone)."""
    import shutil

    kw = dict(steps=4, log_every=4, save_every=3, moe_z_loss=1e-3)
    train(_cfg(moe_dir, data_file, tmp_path / "straight", **kw), quiet=True)
    train(_cfg(moe_dir, data_file, tmp_path / "resumed", **kw), quiet=True)
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-0000004")  # as if killed after step 3's checkpoint
    train(_cfg(moe_dir, data_file, tmp_path / "resumed", resume=True, **kw), quiet=True)

    def logged(run):
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        keys = ("step", "expert_load", "moe_aux_loss", "router_entropy")
        return [{k: m[k] for k in keys} for m in lines if "expert_load" in m]

    assert logged(tmp_path / "straight") and logged(tmp_path / "resumed") == logged(tmp_path / "straight")


def test_the_last_step_logs_the_routing_metrics_of_its_window(moe_dir, data_file, tmp_path):
    """Routing metrics were logged only at multiples of log_every: a run shorter than log_every logged none, and
    the steps after the last multiple were never reported (review)."""
    train(_cfg(moe_dir, data_file, tmp_path / "run", steps=3, log_every=2), quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "expert_load" in m] == [2, 3]
