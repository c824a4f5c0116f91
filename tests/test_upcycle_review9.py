"""Review 9 of upcycling. Each test failed before its fix."""

from __future__ import annotations

import json

import pytest
import torch

from deltatune.testing import tiny_model, tiny_tokenizer
from deltatune.upcycle.convert import UpcycleSpec, upcycle


def _expert_choice(seed: int = 3):
    model = upcycle(tiny_model(0, initializer_range=0.2), UpcycleSpec(experts=4, layers=[0, 1], router="expert-choice"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "router" in name:
                p.add_(torch.randn(p.shape, generator=g) * (0.2 if "experts" in name else 0.5))
    return model.double().eval()


def test_expert_choice_option_scores_do_not_depend_on_padding_or_the_batch():
    # the shared-context path (the default) routed the padding and the other questions with each question's tokens
    from deltatune.evaluate.choice import score_options

    model = _expert_choice()
    contexts, options = ["a b c d e f g h i j", "k"], [[" x", " y z w"], [" q", " r s"]]
    scores = {}
    for pad in (0, 77):
        tok = tiny_tokenizer()
        tok.pad_token_id = pad
        scores[pad] = [[s.logprob for s in q] for q in score_options(model, tok, contexts, options, progress=False)]
    assert scores[0] == scores[77]
    alone = [s.logprob for s in score_options(model, tiny_tokenizer(), contexts[1:], options[1:], progress=False)[0]]
    assert alone == scores[0][1]


def test_expert_choice_generation_does_not_depend_on_the_batch():
    from deltatune.evaluate.generate import GenerationConfig, generate

    model, tok = _expert_choice(), tiny_tokenizer()
    cfg = GenerationConfig(max_new_tokens=10, do_sample=False)
    p, q = "The quick brown fox", "What is 2 + 3? The answer is 5. Natalia sold clips"
    alone = generate(model, tok, [p], cfg, progress=False)[0]
    assert generate(model, tok, [p, q], cfg, batch_size=2, progress=False)[0] == alone


def test_an_fsdp_gathered_model_keeps_the_runs_balancing_weight(tmp_path):
    # the gathered copy rebuilt its blocks with the default 0.01: the export wrote router_aux_loss_coef 0.005
    from deltatune.train.distributed import _gather_plain_model
    from deltatune.upcycle.losses import RouterLosses
    from deltatune.upcycle.moe import moe_blocks

    model = upcycle(tiny_model(num_hidden_layers=2), UpcycleSpec(experts=4, layers=[1]))
    RouterLosses(model, aux_weight=0.2, z_weight=0.0)  # the loop records the run's weight on the blocks

    def full_state(sharded, options=None):
        return sharded.state_dict()

    import torch.distributed.checkpoint.state_dict as dcp_state

    original = dcp_state.get_model_state_dict
    dcp_state.get_model_state_dict = full_state  # a one-process stand-in for the sharded gather
    try:
        plain = _gather_plain_model(model, model)
    finally:
        dcp_state.get_model_state_dict = original
    assert [b.aux_loss_weight for _, b in moe_blocks(plain)] == [0.2]


def test_bitfit_merge_of_an_upcycled_model_is_one_line_not_a_key_error(tmp_path):
    from deltatune.errors import ConfigError
    from deltatune.methods.apply import apply_methods, export_merged
    from deltatune.methods.base import MethodSpec

    model = upcycle(tiny_model(num_hidden_layers=2), UpcycleSpec(experts=4, layers=[1]))
    adapted = apply_methods(model, [MethodSpec(name="bitfit", targets=r"model\.layers\.0\.mlp\.(gate|up|down)_proj")])
    with pytest.raises(ConfigError, match="would add 'model.layers.1.mlp.down_proj.bias', which this model does not"):
        export_merged(adapted, tiny_tokenizer(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model = upcycle(tiny_model(num_hidden_layers=2), UpcycleSpec(experts=4, layers=[1]))
    adapted = apply_methods(model, [MethodSpec(name="bitfit", targets="q_proj,v_proj")])  # attention: fine
    out = export_merged(adapted, tiny_tokenizer(), tmp_path / "ok")
    assert json.loads((out / "config.json").read_text())["attention_bias"] is True
