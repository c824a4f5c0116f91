"""The training-speed benchmark's fairness claim: every contender trains the same examples in the same order.

benchmarks/train_speed.py hands the lean loop and TRL the batches it computes; deltatune draws its own from
its loader. This checks, on the real GSM8K file and the tiny tokenizer, that the two agree example by example,
and that a mismatch is caught rather than silently timed."""

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def train_speed(shared_data, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import train_speed

    monkeypatch.setattr(train_speed, "GSM8K", shared_data / "gsm8k" / "train.jsonl")
    yield train_speed
    sys.modules.pop("train_speed", None)


def test_deltatune_draws_the_benchmark_batches_in_order(train_speed):
    from deltatune.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    records, examples, batches = train_speed.benchmark_data(tok, 24)
    assert len(records) == len(examples) == 24 and [len(b) for b in batches] == [4] * 6
    assert all(train_speed.MAX_LEN // 2 < len(ex) <= train_speed.MAX_LEN and not ex.truncated for ex in examples)
    assert sorted(i for b in batches for i in b) == list(range(24)) and batches[0] != [0, 1, 2, 3]  # shuffled
    train_speed.check_same_order(tok, records, examples, batches)  # raises SystemExit on a mismatch

    swapped = [batches[1], batches[0], *batches[2:]]
    with pytest.raises(SystemExit, match="other examples, or in another order"):
        train_speed.check_same_order(tok, records, examples, swapped)


def test_a_larger_batch_keeps_the_order_and_the_examples(train_speed):
    """`--batch` (a GPU's batch): the same first examples in the same shuffled order, cut into larger steps, and
    deltatune's loader draws those steps too."""
    from deltatune.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    records, examples, batches = train_speed.benchmark_data(tok, 24, batch=8)
    assert [len(b) for b in batches] == [8] * 3
    _, _, by_four = train_speed.benchmark_data(tok, 24)
    assert [i for b in batches for i in b] == [i for b in by_four for i in b]
    train_speed.check_same_order(tok, records, examples, batches, 8)
    with pytest.raises(SystemExit, match="other examples, or in another order"):
        train_speed.check_same_order(tok, records, examples, batches, 4)


def test_loss_check_tolerances(train_speed):
    ref = [2.0, 1.9, 1.8, 1.7, 1.6]
    assert train_speed.loss_check([2.001, 1.9, 1.8, 1.7, 1.6], ref, 0.001)["ok"]
    assert not train_speed.loss_check([2.01, 1.9, 1.8, 1.7, 1.6], ref, 0.001)["ok"]  # another batch at step 1
    assert not train_speed.loss_check([2.0, 1.9, 1.9, 1.8, 1.7], ref, 0.001)["ok"]  # 6% apart at the end
    assert not train_speed.loss_check([2.0, 1.9], ref, 0.001)["ok"]
