"""benchmarks/step_products.py: each product call is recorded with its strides, and replayed with them."""

import pytest
import torch


@pytest.fixture
def step_products(benchmark_module):
    return benchmark_module("step_products")


def test_the_clock_records_products_only_while_on_with_their_layout(step_products):
    a, w = torch.randn(6, 4), torch.randn(3, 4)
    clock = step_products.ProductClock()
    with clock:
        a @ w.t()  # before `on`: not recorded
        clock.on = True
        y = a @ w.t()
        torch.addmm(torch.zeros(6, 3), a, w.t())
        (a + 1).sum()  # not a product
    assert torch.equal(y, a @ w.t())
    keys = {(step_products.signature(func, tensors), len(times)) for (func, _, tensors), times in clock.calls.items()}
    assert keys == {("mm [6, 4] ; [4, 3] (strided)", 1), ("addmm [6, 3] ; [6, 4] ; [4, 3] (strided)", 1)}
    (func, dtype, tensors) = next(iter(clock.calls))
    assert step_products.replay(func, dtype, tensors, repeats=1, iters=1) > 0


def test_allocator_env_reads_variables_and_refuses_a_bare_name(benchmark_module):
    import argparse

    allocator_env = benchmark_module("allocator_env")

    parser = argparse.ArgumentParser()
    assert allocator_env.parse_vars(parser, "OMP_PROC_BIND=close,OMP_PLACES=cores") == {
        "OMP_PROC_BIND": "close",
        "OMP_PLACES": "cores",
    }
    with pytest.raises(SystemExit):
        allocator_env.parse_vars(parser, "OMP_WAIT_POLICY")
