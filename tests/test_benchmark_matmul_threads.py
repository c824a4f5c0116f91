"""benchmarks/matmul_threads.py: the row halves compute the same product, and idle zones are runs of rows."""

import pytest
import torch


@pytest.fixture
def matmul_threads(benchmark_module):
    return benchmark_module("matmul_threads")


def test_halves_is_the_product_in_place(matmul_threads):
    a, b = torch.randn(200, 24, dtype=torch.float64), torch.randn(24, 40, dtype=torch.float64)
    out = torch.full((200, 40), float("nan"), dtype=torch.float64)
    assert matmul_threads.halves(a, b, out) is out  # first block 128 rows (100 rounded up to 32), then 72
    torch.testing.assert_close(out, a @ b, rtol=0, atol=1e-12)


def test_idle_zones_join_consecutive_rows_only(matmul_threads):
    speedups = {128: 1.9, 192: 1.0, 256: 1.1, 320: 1.8, 384: 0.9, 448: 1.5}
    rows, prev = [], None
    for m, x in speedups.items():
        rows.append({"m": m, "x_one_thread": x, "prev_m": prev})
        prev = m
    assert matmul_threads.idle_zones(rows, 1.2) == [(192, 256), (384, 384)]
