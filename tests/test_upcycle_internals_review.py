"""Review of the sparse-upcycling internals: capacities as the user wrote them, aux losses under torchrun."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("router", ["topk", "expert-choice"])
def test_padding_takes_no_capacity_slot_and_no_part_in_the_routing(router):
    """Two rows: a short one padded to the length of the other. Routing only the real tokens gives the real
    tokens exactly what the same tokens get without padding; the padding's output is zero (its residual)."""
    from deltatune.upcycle.losses import balance_loss
    from deltatune.upcycle.moe import routed_tokens

    block = _block(router, capacity=1.0)
    g = torch.Generator().manual_seed(3)
    short, full = (
        torch.randn(3, 8, generator=g, dtype=torch.float64),
        torch.randn(8, 8, generator=g, dtype=torch.float64),
    )
    pad = torch.randn(5, 8, generator=g, dtype=torch.float64)  # whatever the padding's hidden states are
    alone = block(torch.cat([short, full])[None])[0]
    want_routing = block.last_routing
    batch = torch.stack([torch.cat([short, pad]), full])  # [2, 8, 8]
    mask = torch.tensor([[True] * 3 + [False] * 5, [True] * 8])
    with routed_tokens([block], mask):
        out = block(batch)
    assert block.token_mask is None  # cleared after the block
    torch.testing.assert_close(out[0, :3], alone[:3], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1], alone[3:], rtol=0, atol=1e-12)
    assert torch.equal(out[0, 3:], torch.zeros(5, 8, dtype=torch.float64))
    got = block.last_routing
    assert got["logits"].shape[0] == 11 and torch.equal(got["processed"], want_routing["processed"])
    assert balance_loss(got["logits"], got["assigned"]) == balance_loss(
        want_routing["logits"], want_routing["assigned"]
    )
    # a mask of other rows is refused (a shorter one per row reads as prompt tuning's prepended virtual tokens)
    with routed_tokens([block], mask[:1]), pytest.raises(RuntimeError, match="token mask has 8 entries"):
        block(batch)


def test_the_train_loop_and_its_eval_loss_route_only_real_tokens(tmp_path, tiny_dir, monkeypatch):
    """Padded batches (packing off) in the loop: every routing call, training and held-out loss, sees exactly
    the step's real tokens (the count the loop logs), not the padded batch."""
    import json

    from deltatune.cli import main
    from deltatune.config import load_config
    from deltatune.train.loop import train

    moe = tmp_path / "moe"
    assert main(["upcycle", "--model", str(tiny_dir), "--experts", "4", "--router", "expert-choice",
                 "--layers", "all", "--out", str(moe)]) == 0  # fmt: skip
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": "say " + "a " * n, "output": "b " * (1 + n % 3)} for n in (1, 9, 2, 14, 5, 11, 3, 7)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    routed: list[tuple[bool, int]] = []
    route = MoEBlock.route

    def recording_route(self, logits):
        routed.append((self.training, logits.shape[0]))
        return route(self, logits)

    monkeypatch.setattr(MoEBlock, "route", recording_route)
    from deltatune.train import loop

    batches: list[tuple[int, int]] = []  # (real tokens, padded size) of each batch the loop lays out
    batch_of = loop.batch_of

    def recording_batch_of(*args, **kwargs):
        batch = batch_of(*args, **kwargs)
        batches.append((batch["n_real_tokens"], batch["input_ids"].numel()))
        return batch

    monkeypatch.setattr(loop, "batch_of", recording_batch_of)
    cfg = dict(model=str(moe), data=str(data), output=str(tmp_path / "run"), method="full", batch_size=4, seq_len=64,
               precision="fp32", steps=1, eval_fraction=0.5, warmup_steps=0, log_every=1, packing=False)  # fmt: skip
    train(load_config(overrides=cfg), quiet=True)
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    (train_real, train_size), (eval_real, eval_size) = batches  # one training batch, one held-out batch
    assert train_real == logged["tokens"] and train_size > train_real and eval_size > eval_real  # both padded
    layers = 2  # the tiny model's decoder layers, both upcycled
    assert routed == [(True, train_real)] * layers + [(False, eval_real)] * layers


@pytest.mark.parametrize("flat", [False, True])
def test_held_out_loss_and_option_scores_of_an_expert_choice_model_do_not_depend_on_the_padding(flat):
    """Expert choice looks at the whole batch: the padding's content must not change which real tokens the
    experts take (held-out loss over padded rows or one flat row padded to a multiple; option scoring)."""
    from deltatune.data.segments import Role, TokenizedExample
    from deltatune.evaluate.choice import score_options
    from deltatune.evaluate.loss import heldout_loss
    from deltatune.testing import tiny_tokenizer

    model = upcycle(tiny_model(num_hidden_layers=2), UpcycleSpec(experts=4, layers=[0, 1], router="expert-choice"))
    model = model.double().eval()
    g = torch.Generator().manual_seed(5)
    lengths = (5, 19, 11, 3)
    exs = [
        TokenizedExample(ids, [Role.RESPONSE] * n, [0] * n, weights=[1.0] * n)
        for n in lengths
        for ids in [torch.randint(3, 500, (n,), generator=g).tolist()]
    ]
    losses = {p: heldout_loss(model, exs, batch_size=4, pad_id=p, progress=False, flat=flat).loss for p in (0, 77)}
    assert losses[0] == losses[77]
    if not flat:
        contexts, options = ["a b c d e f g h i j", "k"], [[" x", " y z w"], [" q", " r s"]]
        scores = {}
        for pad in (0, 77):
            tok = tiny_tokenizer()
            tok.pad_token_id = pad
            scores[pad] = [[s.logprob for s in q] for q in score_options(model, tok, contexts, options,
                                                                          progress=False, shared_context=False)]  # fmt: skip
        assert scores[0] == scores[77]


def test_k_with_the_expert_choice_router_is_refused_before_the_model_loads(tmp_path, tiny_dir, capsys):
    """`--router expert-choice --k 9` was accepted: k does nothing there, yet upcycle.json recorded it."""
    from deltatune.cli import main

    code = main(["upcycle", "--model", str(tiny_dir), "--experts", "4", "--router", "expert-choice", "--k", "9",
                 "--out", str(tmp_path / "moe")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "field 'k': --k is the top-k router's option" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "moe").exists()
