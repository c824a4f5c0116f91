"""Review 9 of training under torchrun, the pieces without processes. Each test failed before its fix."""

from __future__ import annotations

import random

import torch

from deltatune.errors import TrainingError
from deltatune.train.checkpoint import _rng_state, restore_rng
from deltatune.train.distributed import Distributed


def test_a_stand_in_row_routes_no_token_through_an_upcycled_model():
    # a rank whose share carried no loss ran a zero-weight row whose tokens were still routed: they counted in the
    # expert load and the router losses, which a single process never sees (expert_load 0.0069 apart)
    def collate(rows):
        if not any(r["w"] for r in rows):
            raise TrainingError("no loss")
        ids = torch.tensor([[r["id"]] * 3 for r in rows])
        return {
            "input_ids": ids,
            "loss_weights": torch.tensor([[0.0, 0.0, r["w"]] for r in rows]),
            "token_mask": torch.ones_like(ids, dtype=torch.bool),
        }

    stand_in = Distributed(rank=1, world=2, active=True).local_batch([{"id": 7, "w": 1.0}], collate)
    assert stand_in["input_ids"].tolist() == [[7, 7, 7]]
    assert not stand_in["token_mask"].any() and stand_in["token_mask"].shape == (1, 3)
    own = Distributed(rank=0, world=2, active=True).local_batch([{"id": 7, "w": 1.0}], collate)
    assert own["token_mask"].all()


def test_router_losses_count_nothing_for_a_batch_that_routed_no_token():
    from deltatune.upcycle.losses import RouterLosses
    from deltatune.upcycle.moe import MoEBlock, routed_tokens

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = MoEBlock(torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(4)), 4, k=2)

    model = Experts()
    losses = RouterLosses(model, aux_weight=0.01, z_weight=0.001)
    with routed_tokens([model.moe], torch.zeros(1, 3, dtype=torch.bool)):
        model.moe(torch.randn(1, 3, 4))
    assert float(losses.collect()) == 0.0 and losses.n == 0  # the mean over steps counted an empty one
    with routed_tokens([model.moe], torch.ones(1, 3, dtype=torch.bool)):
        model.moe(torch.randn(1, 3, 4))
    assert float(losses.collect()) > 0 and losses.n == 1


def test_a_resume_under_another_process_count_gives_each_rank_its_own_stream():
    # a single-process checkpoint resumed by 2 processes: both ranks restored its one stream and drew the same
    # dropout masks for different rows
    torch.manual_seed(11)
    random.seed(11)
    state = {"rng": _rng_state()}
    expected = torch.rand(4)
    draws = []
    for rank in (0, 1, 0):
        restore_rng(state, rank, 2)
        draws.append((torch.rand(4), random.random()))
    assert not torch.equal(draws[0][0], draws[1][0]) and draws[0][1] != draws[1][1]
    assert torch.equal(draws[0][0], draws[2][0])  # the same resume draws the same streams
    restore_rng(state, 0, 1)  # one process: exactly the checkpoint's stream
    assert torch.equal(torch.rand(4), expected)
    per_rank = {"rng": state["rng"], "rng_ranks": [state["rng"], _rng_state()]}
    restore_rng(per_rank, 0, 2)  # the same process count: each rank's own saved stream
    assert torch.equal(torch.rand(4), expected)


def test_compiled_layers_stay_off_when_torchrun_resumes_a_compiled_checkpoint(tiny_lm):
    # compile_layers: auto resumed as the checkpoint ran, also under torchrun, which never compiles them
    from deltatune.config import TrainConfig
    from deltatune.train.loop import use_compiled_layers

    said = []
    cfg = TrainConfig(compile_layers="auto")
    kw = dict(planned_tokens=10**6, resumed=True, say=said.append)
    assert use_compiled_layers(cfg, tiny_lm, [], torch.device("cpu"), distributed=True, **kw) is False
    assert "off under torchrun" in said[-1]
    assert use_compiled_layers(cfg, tiny_lm, [], torch.device("cpu"), distributed=False, **kw) is True


def test_a_stand_in_row_routes_no_prompt_tuning_token_either():
    # prompt tuning's virtual tokens were routed in a row whose token mask was all false (review of the fix)
    from deltatune.upcycle.moe import MoEBlock, routed_tokens

    block = MoEBlock(torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(4)), 4, k=2)
    mask = torch.tensor([[False, False, False], [True, True, False]])
    with routed_tokens([block], mask, virtual_tokens=2):
        block(torch.randn(2, 5, 4))
    assert int(block.last_routing["processed"].sum()) == 2 * (2 + 2)  # the real row's 2 virtual + 2 real tokens
