"""`loss_reduction: example`: each example's weighted mean first, then the mean over examples."""

import pytest
import torch

from deltatune.config import load_config
from deltatune.train.loss import per_example_weights


def test_per_example_weights_hand_worked():
    # one packed row: example A (3 tokens, 2 loss-bearing), example B (5 tokens, 4), then 2 padding tokens
    w = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 1, 0, 0]], dtype=torch.float32)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]])
    out = per_example_weights(w, pos)
    assert out.tolist() == [[0, 0.5, 0.5, 0, 0.25, 0.25, 0.25, 0.25, 0, 0]]
    # per-token losses: A 1, 3 (mean 2); B 1, 2, 3, 6 (mean 3). Token mean 16/6; example mean (2 + 3) / 2
    nll = torch.tensor([[0, 1, 3, 0, 1, 2, 3, 6, 9, 9]], dtype=torch.float32)
    assert float((w * nll).sum() / w.sum()) == pytest.approx(16 / 6)
    assert float((out * nll).sum() / out.sum()) == pytest.approx(2.5)


def test_per_example_weights_rows_fractional_and_empty():
    # two unpacked rows (one example each, right-padded), λ weights, and an example without loss weight
    w = torch.tensor([[0, 0.1, 0.1, 1.0], [0, 0, 0, 0], [0, 2.0, 0, 0]])
    pos = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1]])
    out = per_example_weights(w, pos)
    torch.testing.assert_close(out, torch.tensor([[0, 0.1 / 1.2, 0.1 / 1.2, 1 / 1.2], [0, 0, 0, 0], [0, 1.0, 0, 0]]))
    assert float(out.sum()) == pytest.approx(2.0)  # two loss-bearing examples


@pytest.mark.parametrize("reduction", ["token", "example"])
def test_first_step_loss_matches_each_reduction(tiny_dir, tmp_path, reduction):
    """The first logged loss (before any update) is the token mean or the mean of per-example means."""
    from deltatune.data.masking import LossPolicy, policy_weights
    from deltatune.data.pipeline import prepare_records
    from deltatune.evaluate.loss import heldout_loss
    from deltatune.models import load_model
    from deltatune.train.loop import train

    records = [{"instruction": f"Say {i}", "output": " ".join(["seven"] * (1 + 3 * i))} for i in range(4)]
    cfg = load_config(
        overrides=dict(
            model=str(tiny_dir),
            output=str(tmp_path / "run"),
            method="lora",
            rank=2,
            steps=1,
            batch_size=4,
            seq_len=64,
            precision="fp32",
            eval_fraction=0.0,
            loss_reduction=reduction,
            fused_norms="off",
        )
    )
    result = train(cfg, quiet=True, records=records)
    model, tok = load_model(str(tiny_dir))
    examples = prepare_records(records, tok, template="chatml").examples
    for ex in examples:
        ex.weights = policy_weights(ex, LossPolicy("response"))
    per_example = [heldout_loss(model, [ex], progress=False, pad_id=tok.pad_token_id) for ex in examples]
    assert len({r.tokens for r in per_example}) == 4  # the responses differ in length, so the reductions differ
    token_mean = sum(r.loss * r.tokens for r in per_example) / sum(r.tokens for r in per_example)
    example_mean = sum(r.loss for r in per_example) / 4
    expected = token_mean if reduction == "token" else example_mean
    assert abs(token_mean - example_mean) > 1e-3
    assert result.history[0]["loss"] == pytest.approx(expected, abs=1e-5)


def test_loss_reduction_is_validated():
    from deltatune.errors import ConfigError

    with pytest.raises(ConfigError, match="loss_reduction"):
        load_config(overrides={"loss_reduction": "batch"})


@pytest.mark.parametrize("reduction", ["token", "count"])
def test_a_weighted_policy_normalises_by_the_weights_or_by_the_token_count(tiny_dir, tmp_path, reduction):
    """methods.md section 7: normalise by sum(w) (default) or by the token count (option; it was missing)."""
    from deltatune.data.masking import parse_policy, policy_weights
    from deltatune.data.pipeline import prepare_records
    from deltatune.models import load_model
    from deltatune.train.loop import train

    records = [{"instruction": f"Say the word {i} times", "output": " ".join(["seven"] * (1 + i))} for i in range(4)]
    cfg = load_config(
        overrides=dict(
            model=str(tiny_dir),
            output=str(tmp_path / "run"),
            method="lora",
            rank=2,
            steps=1,
            batch_size=4,
            seq_len=64,
            precision="fp32",
            eval_fraction=0.0,
            policy="weighted:0.25",
            loss_reduction=reduction,
            fused_norms="off",
        )
    )
    result = train(cfg, quiet=True, records=records)
    model, tok = load_model(str(tiny_dir))
    total, weight, count = 0.0, 0.0, 0
    for ex in prepare_records(records, tok, template="chatml").examples:
        w = torch.tensor(policy_weights(ex, parse_policy("weighted:0.25")), dtype=torch.float64)[1:]
        with torch.no_grad():
            logits = model(torch.tensor([ex.input_ids])).logits[0, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ex.input_ids[1:]), reduction="none")
        total, weight, count = total + float((w * nll).sum()), weight + float(w.sum()), count + int((w > 0).sum())
    assert count > weight  # instruction tokens weigh 0.25: the two normalisers differ
    expected = total / (count if reduction == "count" else weight)
    assert result.history[0]["loss"] == pytest.approx(expected, abs=1e-5)
