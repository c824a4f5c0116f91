"""Packing isolates examples exactly; collate's weights give the documented normalised loss."""

import pytest
import torch

from deltatune.data.masking import LossPolicy
from deltatune.data.packing import collate, pack_examples, padding_waste
from deltatune.data.pipeline import prepare_records
from deltatune.data.segments import Role, TokenizedExample
from deltatune.errors import ConfigError, TrainingError

RECORDS = [
    {"instruction": "What is 2 + 3?", "output": "The answer is 5."},
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Natalia sold clips to 48 of her friends in April."},
            {"role": "assistant", "content": "She sold half as many clips in May."},
        ]
    },
    {"instruction": "The quick brown fox?", "input": "jumps over the lazy dog", "output": "#### 72"},
]


@pytest.fixture
def examples(tiny_tok):
    exs = []
    for r in RECORDS:  # records of different formats in one batch
        exs += prepare_records([r], tiny_tok, template="chatml").examples
    return exs


def _nll_sum(logits, ids, w):
    """Σ_t w_t · nll_t with position t-1 predicting token t, in float64."""
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (nll * w[:, 1:].double()).sum()


@pytest.mark.parametrize("policy", [LossPolicy("response"), LossPolicy("instruction"), LossPolicy("weighted", lam=0.3)])
def test_packed_row_loss_and_logits_equal_solo_runs(tiny_lm, examples, policy):
    seq_len = sum(len(e) for e in examples) + 7  # one row, with padding at the end
    rows = pack_examples(examples, seq_len)
    assert len(rows) == 1 and [e.source for e in rows[0]] == [e.source for e in examples]
    batch = collate(rows, policy, seq_len=seq_len, pad_id=2, packed=True, template_name="chatml")
    assert batch["attention_mask"].dtype == torch.bool and batch["attention_mask"].shape == (1, 1, seq_len, seq_len)
    with torch.no_grad():
        packed = tiny_lm(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
        assert torch.isfinite(packed).all()  # padding rows attend to themselves: no NaN
        off, solo_total = 0, 0.0
        for ex in examples:
            solo = collate([ex], policy, seq_len=seq_len, pad_id=2, packed=False)
            logits = tiny_lm(input_ids=solo["input_ids"]).logits
            n = len(ex)
            assert torch.allclose(packed[0, off : off + n], logits[0], atol=1e-5)
            solo_total += _nll_sum(logits, solo["input_ids"], solo["loss_weights"])
            off += n
        packed_total = _nll_sum(packed, batch["input_ids"], batch["loss_weights"])
        assert abs(packed_total.item() - solo_total.item()) < 1e-5
        assert packed_total.item() > 1.0
        # The check can fail: without the block mask, later examples see earlier ones.
        leaky = tiny_lm(input_ids=batch["input_ids"]).logits
        n0 = len(examples[0])
        assert (leaky[0, n0 : n0 + len(examples[1])] - packed[0, n0 : n0 + len(examples[1])]).abs().max() > 1e-3


def test_collate_fields_exact(examples):
    a, b = examples[0], examples[2]
    seq = len(a) + len(b) + 3
    batch = collate([[a, b]], LossPolicy("response"), seq_len=seq, pad_id=2, packed=True, template_name="chatml")
    na, nb = len(a), len(b)
    assert batch["position_ids"][0].tolist() == list(range(na)) + list(range(nb)) + [0, 1, 2]
    assert batch["input_ids"][0].tolist() == a.input_ids + b.input_ids + [2, 2, 2]
    assert batch["n_real_tokens"] == na + nb and batch["n_examples"] == 2
    w = batch["loss_weights"][0]
    assert w[na:].tolist()[:nb] == [float(r == Role.RESPONSE) for r in b.roles]
    assert w[na + nb :].tolist() == [0.0, 0.0, 0.0]
    m = batch["attention_mask"][0, 0]
    assert m[na, na] and not m[na, na - 1]  # b's first token sees only itself
    assert m[na - 1, :na].all() and not m[na - 1, na:].any()
    assert m[na + nb + 1].tolist() == [j == na + nb + 1 for j in range(seq)]  # padding: itself only
    # the first token of an example never carries weight, even under "all"
    batch = collate([[a, b]], LossPolicy("all"), seq_len=seq, pad_id=2, packed=True)
    assert (
        batch["loss_weights"][0, 0] == 0 and batch["loss_weights"][0, na] == 0 and batch["loss_weights"][0, na + 1] == 1
    )
    padded = collate([a, b], LossPolicy("all"), seq_len=seq, pad_id=2, packed=False)
    T = max(na, nb)
    assert padded["attention_mask"].dtype == torch.long and padded["attention_mask"].shape == (2, T)
    assert padded["attention_mask"].sum().item() == na + nb


def test_flat_collate_lays_rows_end_to_end_padded_to_a_multiple(examples):
    from deltatune.data.packing import FLAT_MULTIPLE

    a, b, c = examples[0], examples[1], examples[2]
    seq = max(len(a) + len(c), len(b)) + 5
    rows = [[a, c], [b]]
    padded = collate(rows, LossPolicy("response"), seq_len=seq, pad_id=2, packed=True, template_name="chatml")
    flat = collate(rows, LossPolicy("response"), seq_len=seq, pad_id=2, packed=True, template_name="chatml", flat=True)
    na, nb, nc = len(a), len(b), len(c)
    n = na + nc + nb
    T = -(-n // FLAT_MULTIPLE) * FLAT_MULTIPLE
    assert n % FLAT_MULTIPLE and flat["attention_mask"] is None and flat["input_ids"].shape == (1, T)
    assert flat["input_ids"][0].tolist() == a.input_ids + c.input_ids + b.input_ids + [2] * (T - n)
    # positions restart per example, and once more for the padding (its own span)
    assert flat["position_ids"][0].tolist() == list(range(na)) + list(range(nc)) + list(range(nb)) + list(range(T - n))
    assert flat["n_real_tokens"] == n and flat["n_examples"] == 3
    # the same weights as the padded rows, padding removed
    real = torch.zeros_like(padded["loss_weights"], dtype=torch.bool)
    real[0, : na + nc] = True
    real[1, :nb] = True
    assert flat["loss_weights"][0, :n].tolist() == padded["loss_weights"][real].tolist()
    assert flat["loss_weights"][0, n:].sum() == 0
    assert flat["loss_weights"][0, na] == 0 and flat["loss_weights"][0, na + nc] == 0  # every first token


def test_response_policy_loss_equals_hf_loss_with_ignore_index(tiny_lm, examples):
    batch = collate(examples, LossPolicy("response"), seq_len=512, pad_id=2, packed=False)
    labels = batch["input_ids"].masked_fill(batch["loss_weights"] == 0, -100)
    with torch.no_grad():
        out = tiny_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        ours = _nll_sum(out.logits, batch["input_ids"], batch["loss_weights"]) / batch["loss_weights"][:, 1:].sum()
    assert abs(ours.item() - out.loss.item()) < 1e-5


def test_weighted_normalisation_over_the_batch(tiny_lm, examples):
    lam = 0.25
    batch = collate(examples, LossPolicy("weighted", lam=lam), seq_len=512, pad_id=2, packed=False)
    with torch.no_grad():
        logits = tiny_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ours = _nll_sum(logits, batch["input_ids"], batch["loss_weights"]) / batch["loss_weights"][:, 1:].sum()
    # by hand: (λ Σ_instruction nll + Σ_response nll) / (λ n_instruction + n_response), over all examples
    lp = torch.log_softmax(logits.double(), -1)
    num = den = 0.0
    for b, ex in enumerate(examples):
        for t in range(1, len(ex)):
            nll = -lp[b, t - 1, ex.input_ids[t]].item()
            w = {Role.INSTRUCTION: lam, Role.INPUT: lam, Role.RESPONSE: 1.0}.get(ex.roles[t], 0.0)
            num, den = num + w * nll, den + w
    assert abs(ours.item() - num / den) < 1e-9


def test_zero_weight_batch_is_refused_naming_policy_and_template():
    ex = TokenizedExample([5, 6, 7], [Role.ROLE, Role.INSTRUCTION, Role.INSTRUCTION], [0, 0, 0], source="f.jsonl:3")
    with pytest.raises(TrainingError, match=r"policy 'response' with template 'alpaca'.*f.jsonl:3"):
        collate([ex], LossPolicy("response"), seq_len=8, pad_id=2, packed=False, template_name="alpaca")
    # a response that is only the first token is not a target either
    only_first = TokenizedExample([5, 6], [Role.RESPONSE, Role.ROLE], [0, 0])
    with pytest.raises(TrainingError):
        collate([[only_first]], LossPolicy("response"), seq_len=4, pad_id=2, packed=True, template_name="raw")


def test_pack_examples_best_fit_and_limits():
    mk = lambda n: TokenizedExample([3] * n, [Role.RESPONSE] * n, [0] * n, source=f"len{n}")  # noqa: E731
    exs = [mk(n) for n in (6, 5, 4, 3, 2)]
    rows = pack_examples(exs, 8)
    assert [[e.source for e in r] for r in rows] == [["len6", "len2"], ["len5", "len3"], ["len4"]]
    assert sorted(len(e) for r in pack_examples(exs, 8, shuffle_seed=1) for e in r) == [2, 3, 4, 5, 6]
    with pytest.raises(ConfigError, match="len6 has 6 tokens"):
        pack_examples(exs, 5)
    waste = padding_waste(exs, 8, batch_size=2)
    assert waste["packed_waste"] == pytest.approx(1 - 20 / 24)
    assert waste["padded_waste"] == pytest.approx(1 - 20 / (2 * 6 + 2 * 4 + 1 * 2))
