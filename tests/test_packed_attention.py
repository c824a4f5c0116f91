"""Packed attention computed example by example equals the 4D block-diagonal mask path, and
therefore each example's solo run (the data tests pin the mask path to solo runs)."""

import torch

from deltatune.data.masking import LossPolicy
from deltatune.data.packing import collate, pack_examples
from deltatune.data.pipeline import prepare_records
from deltatune.testing import tiny_model, tiny_tokenizer
from deltatune.train import packed_attention


def _packed_batch(tok, seq_len=96):
    records = [{"instruction": f"What is {a} + {b}?" * (1 + a % 3), "output": f"The answer is {a + b}."}
               for a in range(4) for b in range(3)]
    examples = prepare_records(records, tok, template="chatml", max_len=seq_len).examples
    rows = pack_examples(examples, seq_len)
    return collate(rows[:3], LossPolicy("response"), seq_len=seq_len, pad_id=tok.pad_token_id, packed=True,
                   template_name="chatml")


def test_spans_follow_position_resets():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert packed_attention.spans_from_position_ids(pos) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]


def test_packed_attention_equals_block_diagonal_mask_in_value_and_gradient():
    tok = tiny_tokenizer()
    model = tiny_model().double()  # float64: any difference is a bug, not rounding
    batch = _packed_batch(tok)
    assert max(len(s) for s in packed_attention.spans_from_position_ids(batch["position_ids"])) > 1
    decoder = model.get_decoder()
    ref = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"]).last_hidden_state
    alone = batch["attention_mask"][:, 0].sum(-1) == 1
    keep = ~(alone & (batch["position_ids"] > 0))
    ref[keep].pow(2).sum().backward()
    ref_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    model.set_attn_implementation(packed_attention.register())
    ours = decoder(input_ids=batch["input_ids"], attention_mask=None, position_ids=batch["position_ids"],
                   packed_spans=packed_attention.spans_from_position_ids(batch["position_ids"])).last_hidden_state
    ours[keep].pow(2).sum().backward()
    # row padding attends to itself alone under the mask, causally within the padding here; it carries
    # no loss and no example sees it, so compare every other position
    alone = batch["attention_mask"][:, 0].sum(-1) == 1
    padding = alone & (batch["position_ids"] > 0)
    assert padding.any() and (~padding).sum() > 100
    assert torch.allclose(ours[~padding], ref[~padding], atol=1e-10)
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight.grad, ref_grad, atol=1e-10)


def test_without_spans_it_is_plain_sdpa():
    tok = tiny_tokenizer()
    model = tiny_model()
    ids = torch.tensor([tok("What is 2 + 3?")["input_ids"]])
    ref = model(input_ids=ids).logits
    model.set_attn_implementation(packed_attention.register())
    assert torch.equal(model(input_ids=ids).logits, ref)
