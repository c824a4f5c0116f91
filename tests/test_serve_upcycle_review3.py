"""Serving and upcycling defects found in review 3, each pinned by a test."""

import pytest
import torch

from deltatune.methods.apply import load_adapter
from deltatune.methods.base import MethodSpec
from deltatune.serve import Engine, GenRequest, MultiAdapterModel, SamplingParams
from deltatune.serve.testing import random_adapter
from deltatune.testing import tiny_model, tiny_tokenizer
from deltatune.upcycle.convert import UpcycleSpec, upcycle

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def upcycled_base():
    model = tiny_model(0, initializer_range=0.2)
    upcycle(model, UpcycleSpec(experts=4, layers=[0, 1], k=2), seed=3)
    return model.eval()


def _each_row_as_alone(make_base, folder) -> MultiAdapterModel:
    """Adapters `a` and `b` (saved in `folder`) served on `make_base()` in one mixed batch: each row's logits are
    those of its adapter (or the base) run alone."""
    multi = MultiAdapterModel(make_base())
    multi.load("a", folder / "a")
    multi.load("b", folder / "b")
    names = ["a", "b", None, "a"]
    ids = torch.tensor([[1, 5, 77, 300, 12, 9, 45, 2]] * len(names))
    with torch.no_grad(), multi.route(names):
        mixed = multi.model(input_ids=ids).logits
    for k, name in enumerate(names):
        model = make_base() if name is None else load_adapter(make_base(), folder / name).model.eval()
        with torch.no_grad():
            alone = model(input_ids=ids[:1]).logits[0]
        torch.testing.assert_close(mixed[k], alone, rtol=1e-5, atol=1e-5)
    return multi


@pytest.mark.parametrize("other", ["lora", "dora"])
def test_a_mixed_batch_on_an_upcycled_model_gives_each_row_its_adapter_alone(tmp_path, other):
    """Adapters on the router and the experts (all-linear) of an upcycled model, three rows of a batch
    on two adapters and the base: the router and experts see tokens regrouped by expert, not batch rows, so
    the mixed batch failed with all its requests (bmm sizes 27 vs 3 for LoRA; an index error while decoding
    beside DoRA) or gave rows other rows' adapters (DoRA's prefill logits)."""
    random_adapter(tmp_path / "a", MethodSpec(name="lora", rank=4, alpha=8), upcycled_base(), seed=1)
    random_adapter(tmp_path / "b", MethodSpec(name=other, rank=4, alpha=8), upcycled_base(), seed=2)
    multi = _each_row_as_alone(upcycled_base, tmp_path)

    tok = tiny_tokenizer()
    engine = Engine(multi, tok)
    prompts = ["The quick brown fox", "What is 2 + 3? The answer", "user assistant", "Natalia sold"]

    def run(rows):
        reqs = [
            GenRequest(prompt_ids=engine.encode(p), adapter=n, params=SamplingParams(max_tokens=8)) for p, n in rows
        ]
        return [r.token_ids for r in engine.generate(reqs)]

    rows = list(zip(prompts, ["a", "b", None, "a"]))  # the names _each_row_as_alone routes
    assert run(rows) == [run([row])[0] for row in rows]


def tiny_qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        initializer_range=0.2,
    )
    return Qwen2MoeForCausalLM(config).eval()


@pytest.mark.parametrize("other", ["lora", "dora"])
def test_a_mixed_batch_on_a_transformers_qwen2_moe_gives_each_row_its_adapter_alone(tmp_path, other):
    """Qwen2-MoE's shared expert and its gate see the batch flattened to tokens, (rows x tokens, d): in a mixed
    batch two LoRA adapters failed (bmm sizes 32 vs 4), and LoRA beside DoRA gave rows other rows' adapters
    (logits off by 8.0)."""
    random_adapter(tmp_path / "a", MethodSpec(name="lora", rank=4, alpha=8), tiny_qwen2_moe(), seed=1)
    random_adapter(tmp_path / "b", MethodSpec(name=other, rank=4, alpha=8), tiny_qwen2_moe(), seed=2)
    multi = _each_row_as_alone(tiny_qwen2_moe, tmp_path)
    assert "shared_expert_gate" in str(multi.model.model.layers[0].mlp)  # an adapted flattened linear


@pytest.mark.parametrize("router", ["topk", "expert-choice"])
def test_an_upcycled_model_trains_with_gradient_checkpointing_as_without(tmp_path, tiny_dir, router):
    """Activation checkpointing recomputes each layer in the backward pass, after `routed_tokens` has exited:
    the MoE blocks then routed the padding too, saved other tensors, and training stopped at the first step
    with torch's CheckpointError ("88 tensors saved during forward, 85 during recomputation")."""
    import json

    from deltatune.cli import main
    from deltatune.config import load_config
    from deltatune.train.loop import train

    moe = tmp_path / "moe"
    capacity = ["--capacity", "1.0"] if router == "topk" else []  # top-k drops while training
    assert main(["upcycle", "--model", str(tiny_dir), "--experts", "4", "--router", router, "--layers", "all",
                 "--out", str(moe), *capacity]) == 0  # fmt: skip
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": "say " + "a " * n, "output": "b " * (1 + n % 3)} for n in (1, 9, 2, 14, 5, 11, 3, 7)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for checkpointing in (False, True):
        run = tmp_path / f"run-{checkpointing}"
        cfg = dict(model=str(moe), data=str(data), output=str(run), method="full", batch_size=4, seq_len=64,
                   precision="fp32", steps=2, eval_fraction=0.0, warmup_steps=0, log_every=1, packing=False,
                   gradient_checkpointing=checkpointing, seed=3)  # fmt: skip
        train(load_config(overrides=cfg), quiet=True)
        losses[checkpointing] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[True] == losses[False] and len(losses[True]) == 2


def test_an_expert_choice_model_serves_each_row_as_it_is_served_alone(tmp_path):
    """Expert choice ranks every token a block sees: served in a batch, a row's greedy text changed with the
    other requests and their left padding (' Instruction#al\\x02 comp Writeist requestli' alone, ' Instruction#
    \\ufffd\\ufffd< 2 of01\\ufffd' beside a longer prompt). Each row now routes its own real tokens."""
    from deltatune.evaluate.generate import stop_token_ids

    def base():
        model = tiny_model(0, initializer_range=0.2)
        upcycle(model, UpcycleSpec(experts=4, layers=[0, 1], router="expert-choice"), seed=3)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # experts that differ, a router that prefers some: routing matters
            for name, p in model.named_parameters():
                if "experts" in name or "router" in name:
                    p.add_(torch.randn(p.shape, generator=g) * (0.2 if "experts" in name else 0.5))
        return model.eval()

    random_adapter(tmp_path / "a", MethodSpec(name="lora", rank=4, alpha=8, targets="q_proj,v_proj"), base(), seed=1)
    multi = MultiAdapterModel(base())
    multi.load("a", tmp_path / "a")
    tok = tiny_tokenizer()
    engine = Engine(multi, tok)
    p, q = engine.encode("The quick brown fox"), engine.encode("What is 2 + 3? The answer is 5. Natalia sold clips")

    def run(rows):
        reqs = [GenRequest(prompt_ids=ids, adapter=n, params=SamplingParams(max_tokens=10)) for ids, n in rows]
        return [r.token_ids for r in engine.generate(reqs)]

    alone = run([(p, None)])[0]
    reference = base().generate(  # transformers' own generate on the model alone, greedy
        input_ids=torch.tensor([p]),
        attention_mask=torch.ones(1, len(p), dtype=torch.long),
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=stop_token_ids(tok),
        pad_token_id=stop_token_ids(tok)[0],
    )
    assert alone == reference[0, len(p) :].tolist()
    assert run([(p, None), (q, None)])[0] == alone
    assert run([(q, "a"), (p, None), (p, "a")]) == [run([(q, "a")])[0], alone, run([(p, "a")])[0]]
