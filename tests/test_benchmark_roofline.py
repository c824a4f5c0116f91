"""The roofline's product list against a hand count: a limit that forgets a product (or counts one twice)
would make every "fraction of the roofline" in docs/benchmarks.md wrong.

Hand count for one step of T tokens through L layers with linear weights of P parameters per layer:
forward 2TP, input gradient 2TP, and for full finetuning the weight gradient 2TP more; LoRA adds
6 T r (in + out) per projection (two factors forward, each factor's weight and input gradient)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def roofline(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import roofline

    yield roofline
    sys.modules.pop("roofline", None)


CONFIG = SimpleNamespace(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=160,
    num_hidden_layers=3,
    vocab_size=500,
)
STEP = {"T": 400, "spans": [40, 60, 300], "n_loss": 64, "real_tokens": 400}


def flops(products, prefix: str) -> int:
    return sum(2 * m * k * n * b * count for (kind, m, k, n, b), count in products.items() if kind.startswith(prefix))


def projections(c) -> list[tuple[int, int]]:
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    h, i = c.hidden_size, c.intermediate_size
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


@pytest.mark.parametrize("full", [False, True])
def test_step_products_match_a_hand_count(roofline, full):
    c, T, L, r = CONFIG, STEP["T"], CONFIG.num_hidden_layers, 8
    products = roofline.step_products(STEP, c, r, full=full)
    params = sum(i * o for i, o in projections(c))
    assert flops(products, "base") == L * T * params * (6 if full else 4)
    assert flops(products, "lora") == (0 if full else L * sum(6 * T * r * (i + o) for i, o in projections(c)))
    head = 2 * STEP["n_loss"] * c.hidden_size * c.vocab_size
    assert flops(products, "head") == head * (3 if full else 2)
    # attention per example span, all heads: QK^T and PV forward, then dP, dV, dQ, dK; spans of up to 256
    # tokens whole, with their probabilities kept from forward (6 products), the 300-token one by blocks of
    # 128 query rows against the keys each sees, recomputing each block's QK^T in backward (7 products)
    d = c.hidden_size // c.num_attention_heads
    kept, recomputed = 40 * 40 + 60 * 60, 128 * 128 + 128 * 256 + 44 * 300
    assert flops(products, "attn") == L * 2 * (6 * kept + 7 * recomputed) * d * c.num_attention_heads
    assert flops(products, "attn QK recompute") == L * 2 * recomputed * d * c.num_attention_heads
