"""Review of the sparse-upcycling internals: capacities as the user wrote them, aux losses under torchrun."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from deltatune.testing import tiny_model
from deltatune.upcycle.convert import UpcycleSpec, upcycle
from deltatune.upcycle.losses import RouterLosses
from deltatune.upcycle.moe import MoEBlock

REPO = Path(__file__).resolve().parent.parent


def _block(router, capacity, k=1, experts=4, hidden=8):
    torch.manual_seed(0)
    ex = [torch.nn.Linear(hidden, hidden, bias=False).double() for _ in range(experts)]
    return MoEBlock(ex, hidden, router=router, k=k, capacity=capacity).double().train()


def test_topk_capacity_is_the_exact_ceiling_not_one_more_from_float_rounding():
    """C = 1.1, k = 1, n = 200, E = 4: capacity ceil(1.1 * 200 / 4) = 55; in floats 1.1 * 200 / 4 is
    55.00000000000001, whose ceiling 56 let one assignment too many through."""
    block = _block("topk", capacity=1.1)
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[0, 0] = 10.0  # every token's choice: expert 0
    x = torch.zeros(200, 8, dtype=torch.float64)
    x[:, 0] = 1.0
    block(x[None])
    r = block.last_routing
    assert r["processed"].tolist() == [55, 0, 0, 0]
    assert int(r["dropped"]) == 200 - 55


def test_expert_choice_takes_exactly_T_tokens_for_a_decimal_capacity():
    block = _block("expert-choice", capacity=1.1)  # n = 200, E = 4: T = 1.1 * 200 / 4 = 55 exactly
    block(torch.randn(2, 100, 8, dtype=torch.float64))
    assert block.last_routing["processed"].tolist() == [55] * 4


WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from deltatune.testing import tiny_model
    from deltatune.train.distributed import _DDP, _sum_allreduce_hook
    from deltatune.upcycle.convert import UpcycleSpec, upcycle
    from deltatune.upcycle.losses import RouterLosses

    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = upcycle(tiny_model(num_hidden_layers=2), UpcycleSpec(experts=4, layers=[0, 1]), seed=1).train()
    ddp = _DDP(model, find_unused_parameters=False)
    ddp.register_comm_hook(None, _sum_allreduce_hook)  # as the train loop: gradients summed over ranks
    losses = RouterLosses(model, aux_weight=1.0, z_weight=0.5)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))  # same rows on both ranks
    logits = ddp(input_ids=ids).logits
    (logits.float().mean() * 0 + losses.collect()).backward()
    if rank == 0:
        torch.save(model.model.layers[0].mlp.router.weight.grad, out)
    dist.destroy_process_group()
    """
)


def test_router_loss_gradient_under_torchrun_is_that_of_one_process(tmp_path):
    """The train loop sums gradients over ranks (its LM loss is divided by the global weight); each rank's
    aux/z-loss must then count 1/world, or two processes train the router with twice the set weights."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), port, str(tmp_path / "grad.pt")], env=env)
        for r in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    two = torch.load(tmp_path / "grad.pt", weights_only=True)

    model = upcycle(tiny_model(num_hidden_layers=2), UpcycleSpec(experts=4, layers=[0, 1]), seed=1).train()
    losses = RouterLosses(model, aux_weight=1.0, z_weight=0.5)
    model(torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1)))
    losses.collect().backward()
    one = model.model.layers[0].mlp.router.weight.grad
    assert torch.allclose(two, one, rtol=1e-5, atol=1e-8), float((two / one).nanmean())
