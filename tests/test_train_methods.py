"""Every method (and a combination) trains through `deltatune train` and its saved output reloads."""

import json

import pytest
import torch

from deltatune.config import load_config
from deltatune.testing import tiny_model, tiny_tokenizer
from deltatune.train.loop import train

METHODS = [
    "lora",
    "full",
    "dora",
    "mora",
    "ia3",
    "qlora",
    "vera",
    "bitfit",
    "adapter",
    "prompt",
    "prefix",
    "lora+bitfit",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    tiny_model().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    rows = [{"instruction": f"Add {a} and {b}.", "output": f"{a + b}"} for a in range(5) for b in range(5)]
    (root / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_its_output_reloads(setup, tmp_path, method):
    cfg = load_config(
        overrides=dict(
            model=str(setup / "model"),
            data=str(setup / "d.jsonl"),
            output=str(tmp_path),
            method=method,
            rank=4,
            alpha=8,
            lr=1e-2 if method != "full" else 1e-3,
            steps=6,
            batch_size=4,
            seq_len=64,
            precision="fp32",
            eval_fraction=0.0,
            warmup_steps=0,
            method_options={"num_virtual_tokens": 4} if method in ("prompt", "prefix") else {},
        )
    )
    result = train(cfg, quiet=True)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    final = tmp_path / "final"
    assert final.exists()
    # the saved output gives the trained model's logits again
    from deltatune.models import load_model

    model, tok = load_model(
        str(final) if method == "full" else str(setup / "model"), adapter=None if method == "full" else str(final)
    )
    ids = torch.tensor([tok("Add 1 and 2.")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    base, _ = load_model(str(setup / "model"))
    with torch.no_grad():
        assert not torch.allclose(logits, base(input_ids=ids).logits, atol=1e-6), "training changed nothing"


@pytest.mark.parametrize(
    "method,extra",
    [
        ("mora", {"method_options": {"remora_every": 2, "remora_warmup": 1}}),
        ("full", {"fused_update": "lomo", "max_grad_norm": 1.0}),
    ],
)
def test_whole_model_outputs_remora_and_lomo(setup, tmp_path, method, extra):
    """ReMoRA merges into the base weights, so its run writes a whole model; LOMO trains full weights."""
    from deltatune.models import load_model

    cfg = load_config(
        overrides=dict(
            model=str(setup / "model"),
            data=str(setup / "d.jsonl"),
            output=str(tmp_path),
            method=method,
            rank=4,
            lr=1e-2,
            steps=4,
            batch_size=4,
            seq_len=64,
            precision="fp32",
            eval_fraction=0.0,
            warmup_steps=0,
            **extra,
        )
    )
    result = train(cfg, quiet=True)
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in result.history])))
    assert (tmp_path / "final" / "config.json").exists() and not (tmp_path / "final" / "adapter_config.json").exists()
    model, tok = load_model(str(tmp_path / "final"))
    base, _ = load_model(str(setup / "model"))
    ids = torch.tensor([tok("Add 1 and 2.")["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)


def test_remora_refuses_resume_in_one_line(setup, tmp_path):
    from deltatune.errors import ConfigError

    kw = dict(
        model=str(setup / "model"),
        data=str(setup / "d.jsonl"),
        output=str(tmp_path),
        method="mora",
        rank=4,
        steps=2,
        save_every=1,
        batch_size=4,
        seq_len=64,
        precision="fp32",
        eval_fraction=0.0,
        warmup_steps=0,
        method_options={"remora_every": 1},
    )
    # its checkpoints could never be resumed: save_every is refused before anything is written
    with pytest.raises(ConfigError, match="method 'mora' cannot resume from checkpoints \\(ReMoRA merges"):
        train(load_config(overrides=kw), quiet=True)
    assert not any(tmp_path.iterdir())
    train(load_config(overrides={**kw, "save_every": None}), quiet=True)
    with pytest.raises(ConfigError, match="nothing to resume from"):
        train(load_config(overrides={**kw, "save_every": None, "steps": 3, "resume": True}), quiet=True)
